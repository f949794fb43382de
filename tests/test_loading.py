import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from smse.config import DataConfig, SplitConfig
from smse.data.hashing import resolve_duplicates
from smse.data.loading import load_data
from smse.data.manifest import read_manifest, write_manifest
from smse.data.records import Record
from smse.data.splits import check_split, read_fold_file, seeded_split
from smse.errors import ConfigError, DataError, ImageError, LeakageError
from tests.conftest import breakhis_path, make_tree, sample_facts, write_png


def duplicate_pair_tree(root: Path) -> tuple[Path, Path]:
    """The 13412 trap in miniature: one slide filed under DC and LC with identical files."""
    make_tree(
        root,
        {
            ("DC", "13412"): 2,
            ("LC", "13412"): 2,
            ("F", "9133"): 2,
            ("A", "22549AB"): 2,
            ("DC", "2523"): 2,
            ("PC", "12465"): 2,
            ("TA", "16184"): 2,
            ("MC", "18842D"): 2,
        },
    )
    dc = breakhis_path(root, "DC", "13412", 100, 1)
    lc = breakhis_path(root, "LC", "13412", 100, 2)
    shutil.copyfile(dc, lc)
    return dc, lc


def test_duplicates_prefer_ductal_by_default(tmp_path):
    dc, lc = duplicate_pair_tree(tmp_path)
    data = load_data(DataConfig(root=str(tmp_path)), split=False)
    assert data.duplicates.conflicting == [sorted([str(dc), str(lc)])]
    assert data.duplicates.dropped == [str(lc)]
    assert str(dc) in {r.path for r in data.records} and str(lc) not in {r.path for r in data.records}
    assert "1 with conflicting labels; 1 files dropped" in data.summary_line()


def test_duplicate_policies(tmp_path):
    dc, lc = duplicate_pair_tree(tmp_path)
    data = load_data(DataConfig(root=str(tmp_path), duplicates="keep"), split=False)
    kept, report = resolve_duplicates(data.records, data.hashes, "drop-conflicts")
    assert report.dropped == sorted([str(dc), str(lc)])
    assert len(kept) == len(data.records) - 2
    with pytest.raises(ConfigError, match="data.duplicates"):
        resolve_duplicates(data.records, data.hashes, "whatever")


def test_guard_refuses_identical_images_across_split(tmp_path):
    dc, lc = duplicate_pair_tree(tmp_path)
    data = load_data(DataConfig(root=str(tmp_path), duplicates="keep"), split=False)
    # the LC copy gets another patient name, as a careless re-filing would do
    records = [
        Record(
            r.path,
            r.label,
            r.tumor_type,
            "other" if "LC" in r.path else r.patient,
            r.magnification,
            "test" if "LC" in r.path else "train",
        )
        for r in data.records
    ]
    with pytest.raises(LeakageError, match="identical image") as err:
        check_split(records, data.hashes)
    assert str(dc) in str(err.value) and str(lc) in str(err.value)


def test_guard_refuses_patient_on_both_sides():
    recs = [
        Record("a", "benign", "A", "14-1", 40, "train"),
        Record("b", "benign", "A", "14-1", 100, "test"),
        Record("c", "malignant", "DC", "14-2", 40, "test"),
    ]
    with pytest.raises(LeakageError, match=r"14-1 \(test/train\)"):
        check_split(recs)
    check_split(recs[1:])


def test_seeded_split_patient_disjoint_stratified_deterministic(tiny_tree):
    records = load_data(DataConfig(root=str(tiny_tree)), split=False).records
    a = seeded_split(records, 0.3, 0.15, seed=1)
    b = seeded_split(records, 0.3, 0.15, seed=1)
    assert a == b
    check_split(a)
    test_patients = {(r.patient, r.label) for r in a if r.split == "test"}
    assert {lab for _, lab in test_patients} == {"benign", "malignant"}
    assert any(seeded_split(records, 0.3, 0.15, seed=s) != a for s in range(2, 6))


def test_fold_files_pipe_and_kaggle(tiny_tree, tmp_path):
    records = load_data(DataConfig(root=str(tiny_tree)), split=False).records
    names = sorted(Path(r.path).name for r in records)
    test_slides = ("9133", "16184CD")
    grp = {n: "test" if any(f"-{s}-" in n for s in test_slides) else "train" for n in names}
    pipe = tmp_path / "dsfold1.txt"
    pipe.write_text("".join(f"{n}|{n.split('-')[3]}|1|{g}\n" for n, g in grp.items()))
    assert read_fold_file(pipe) == grp
    kaggle = tmp_path / "Folds.csv"
    rel = {Path(r.path).name: Path(r.path).relative_to(tiny_tree).as_posix() for r in records}
    kaggle.write_text(
        "fold,mag,grp,filename\n"
        + "".join(
            f"{f},{n.split('-')[3]},{g if f == 1 else 'train'},{rel[n]}\n" for f in (1, 2) for n, g in grp.items()
        )
    )
    assert read_fold_file(kaggle, fold=1) == grp
    cfg = DataConfig(root=str(tiny_tree), split=SplitConfig(method="fold-file", fold_file=str(kaggle), fold=1))
    data = load_data(cfg)
    assert {r.patient for r in data.records if r.split == "test"} == {"14-9133", "14-16184CD"}
    assert {r.split for r in data.records} == {"train", "val", "test"}
    bad = tmp_path / "dsfold2.txt"
    bad.write_text("SOB_B_F-14-9133-40-001.png|40|1|holdout\n")
    with pytest.raises(DataError, match="dsfold2.txt:1: group 'holdout'"):
        read_fold_file(bad)


def test_fold_file_that_leaks_is_refused(tiny_tree, tmp_path):
    records = load_data(DataConfig(root=str(tiny_tree)), split=False).records
    pipe = tmp_path / "dsfold1.txt"
    # an image-level split: one slide's 40X in test, the rest in train
    pipe.write_text(
        "".join(
            f"{Path(r.path).name}|{r.magnification}|1|{'test' if r.magnification == 40 else 'train'}\n" for r in records
        )
    )
    cfg = DataConfig(root=str(tiny_tree), split=SplitConfig(method="fold-file", fold_file=str(pipe)))
    with pytest.raises(LeakageError, match="patient"):
        load_data(cfg)


def test_bad_images_error_or_skip(tiny_tree):
    victim = breakhis_path(tiny_tree, "F", "9133", 200, 1)
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(ImageError, match="SOB_B_F-14-9133-200-001.png: corrupt or truncated"):
        load_data(DataConfig(root=str(tiny_tree)), split=False)
    data = load_data(DataConfig(root=str(tiny_tree), skip_bad=True), split=False)
    assert [p for p, _ in data.skipped] == [str(victim)]
    assert len(data.records) == 63 and "1 bad file(s) skipped" in data.summary_line()


def test_manifest_any_organ(tmp_path):
    img = tmp_path / "imgs"
    for i in range(6):
        write_png(img / f"p{i}.png", i)
    csv = tmp_path / "liver.csv"
    csv.write_text(
        "path,label,patient,magnification,split\n"
        + "".join(
            f"imgs/p{i}.png,{'tumour' if i % 2 else 'normal'},slide{i // 2},{'20X' if i < 3 else ''},"
            f"{'test' if i >= 4 else 'train'}\n"
            for i in range(6)
        )
    )
    records, skipped = read_manifest(csv)
    assert [r.magnification for r in records] == [20, 20, 20, 0, 0, 0] and not skipped
    assert records[0].path == str((img / "p0.png").resolve()) and records[1].tumor_type == "tumour"
    data = load_data(DataConfig(root=str(csv), split=SplitConfig(method="manifest", val_fraction=0.0)))
    assert Counter(r.split for r in data.records) == {"train": 4, "test": 2}
    out = tmp_path / "again.csv"
    write_manifest(out, data.records)
    assert read_manifest(out)[0] == data.records


def test_manifest_errors_name_line_and_field(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\nx.png,a\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['patient'\]"):
        read_manifest(csv)
    csv.write_text("path,label,patient,magnification\nmissing.png,a,p1,40\n")
    with pytest.raises(DataError, match="m.csv:2: image .*missing.png not found"):
        read_manifest(csv)
    write_png(tmp_path / "x.png", 0)
    csv.write_text("path,label,patient,magnification\nx.png,a,p1,forty\n")
    with pytest.raises(DataError, match="m.csv:2: magnification 'forty'"):
        read_manifest(csv)


@pytest.mark.slow
def test_cli_data_summary_matches_sample_readme(sample_root, tmp_path):
    from typer.testing import CliRunner

    from smse.cli import app

    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["data", "summary", str(sample_root), "--json", str(out)])
    assert result.exit_code == 0, result.output
    readme = (sample_root / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| ")]
    for line in table[1:]:  # rows A..all, same layout as the README's
        assert line in result.output
    summary = json.loads(out.read_text())
    facts = sample_facts(sample_root)
    assert summary["images"] == facts["images"] and summary["slide_folders"] == facts["slide_folders"]
    assert summary["patients"] == 38
    assert summary["image_sizes"] == facts["sizes"]


def test_cli_reports_errors_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "smse.cli", "data", "summary", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: folder does not exist"


def test_type_task_split_keeps_every_type_in_training(tiny_tree):
    records = load_data(DataConfig(root=str(tiny_tree)), split=False).records
    for seed in range(5):
        split = seeded_split(records, 0.3, 0.15, seed=seed, task="type")
        check_split(split)
        assert {r.tumor_type for r in split if r.split == "train"} == {r.tumor_type for r in records}


def test_cli_data_summary_writes_json_only_where_asked(synth_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from smse.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["data", "summary", str(synth_data)])
    assert result.exit_code == 0, result.output
    assert "benign" in result.output and list(tmp_path.iterdir()) == []  # printed; nothing written here
    result = CliRunner().invoke(app, ["data", "summary", str(synth_data), "--json", "s.json"])
    assert result.exit_code == 0 and json.loads((tmp_path / "s.json").read_text())["patients"] == 10
