"""Hostile but ordinary inputs: each class of fault ends in a clear error (or a listed skip), never in wrong work."""

import csv
import dataclasses
import errno
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import typing
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smse.config import Config, DataConfig, SplitConfig, _ranged_fields, load_config
from smse.cv import check_folds, cross_validate
from smse.data.images import read_image
from smse.data.loading import load_data
from smse.data.manifest import read_manifest
from smse.engine import train
from smse.errors import (
    ConfigError,
    DataError,
    ImageError,
    OutputError,
    RunLockedError,
    TrainingDiverged,
)
from smse.evaluate import evaluate_run
from smse.predict import predict
from smse.report import html, write_report
from smse.runfolder import check_finite_weights, locked
from tests.conftest import breakhis_path, invoke, make_tree, subprocess_env, tiny_config, write_png

TINY = [
    "data.image_size=[32, 48]",
    "model.backbone=paper-cnn",
    "model.pretrained=false",
    "model.embedding_dim=16",
    "model.views=2",
    "train.epochs=1",
    "sampler.batch_size=16",
    "train.device=cpu",
    "data.split.val_fraction=0.25",
]


def smse(*args, **kwargs) -> subprocess.CompletedProcess:
    """The real command line in a child process: exit code and stderr as a user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "smse.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        **kwargs,
    )


PROGRESS_LINE = re.compile(r"^[^:]+: \d+/\d+ .* \(\d+%\), \d+ s, about \d+ s left$")


def one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    # progress lines of the steps that ran before the error may come first (smse.progress, through a pipe)
    lines = [line for line in proc.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def manifest(path: Path, rows: list[str], header: str = "path,label,patient,magnification", encoding="utf-8") -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding=encoding)
    return path


def image_set(folder: Path, n: int = 8) -> list[str]:
    """``n`` small PNGs; returns their names."""
    for i in range(n):
        write_png(folder / f"i{i}.png", i)
    return [f"i{i}.png" for i in range(n)]


@pytest.fixture(scope="module")
def linked_run(synth_data, tmp_path_factory):
    """A run trained, evaluated and reported from a data root given as a relative path through a symlink and ``..``."""
    base = tmp_path_factory.mktemp("linked")
    (base / "mount").symlink_to(synth_data, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patched:  # a module fixture: the function-scoped monkeypatch is not at hand
        patched.chdir(base)
        output = invoke("train", "data.root=mount/BreaKHis_v1/..", f"out={base / 'run'}", *TINY)
    assert "report:" in output
    return base / "run"


# -- one spelling of every path ------------------------------------------------------------------


@pytest.mark.slow
def test_data_root_through_symlink_and_dotdot_trains_evaluates_and_reports(linked_run, synth_data):
    split = list(csv.DictReader(open(linked_run / "split.csv")))
    preds = list(csv.DictReader(open(linked_run / "eval" / "predictions.csv")))
    real = str(synth_data.resolve())
    assert all(r["path"].startswith(real + os.sep) for r in split + preds)
    assert {p["path"] for p in preds} <= {r["path"] for r in split}
    assert (linked_run / "report" / "report.html").stat().st_size > 10_000


def test_manifest_paths_are_canonical_and_a_repeated_row_counts_once(tmp_path):
    names = image_set(tmp_path / "imgs", 4)
    (tmp_path / "link").symlink_to(tmp_path / "imgs", target_is_directory=True)
    rows = [f"link/../imgs/{n},{'a' if i % 2 else 'b'},p{i},40" for i, n in enumerate(names)]
    m = manifest(tmp_path / "m.csv", rows + [f"link/{names[0]},b,p0,40X"])  # the same image again, spelled another way
    records, _ = read_manifest(m)
    assert [r.path for r in records] == [str((tmp_path / "imgs" / n).resolve()) for n in names]


def test_manifest_rows_that_disagree_name_both_lines(tmp_path):
    names = image_set(tmp_path, 2)
    m = manifest(tmp_path / "m.csv", [f"{names[0]},a,p0,40", f"{names[1]},b,p1,40", f"{names[0]},b,p0,40"])
    with pytest.raises(DataError, match=r"m.csv:4: .*i0.png is also listed on line 2, with label 'b' here and 'a' "):
        read_manifest(m)


# -- wrong results reported as success -----------------------------------------------------------


def test_one_class_is_refused_by_name(tmp_path):
    names = image_set(tmp_path, 4)
    m = manifest(tmp_path / "m.csv", [f"{n},benign,p{i // 2},40" for i, n in enumerate(names)])
    with pytest.raises(DataError, match=r"one class for data.task=binary: 'benign' \(4 images, 2 patients\)"):
        load_data(DataConfig(root=str(m), cache_dir=str(tmp_path / "cache")))


@pytest.mark.parametrize("column, spellings", [("label", ("Benign", "benign")), ("patient", ("P 1", "p  1"))])
def test_names_differing_only_in_case_or_spaces_are_refused(tmp_path, column, spellings):
    names = image_set(tmp_path, 4)
    rows = []
    for i, n in enumerate(names):
        label = spellings[i % 2] if column == "label" else ("benign", "malignant")[i % 2]
        patient = spellings[i % 2] if column == "patient" else f"q{i}"
        rows.append(f"{n},{label},{patient},40")
    with pytest.raises(
        DataError,
        match=rf"{column} '{spellings[0]}' \(line 2\) and '{spellings[1]}' \(line 3\) "
        "differ only in case or spaces",
    ):
        read_manifest(manifest(tmp_path / "m.csv", rows))


def split_manifest(tmp_path: Path) -> Path:
    names = image_set(tmp_path, 12)
    split = ["train"] * 4 + ["val"] * 4 + ["test"] * 4
    return manifest(
        tmp_path / "m.csv",
        [f"{n},{'ab'[i % 2]},p{i // 2},40,{split[i]}" for i, n in enumerate(names)],
        header="path,label,patient,magnification,split",
    )


def test_a_manifest_split_column_is_used_by_default_and_never_dropped_silently(tmp_path, caplog):
    m = split_manifest(tmp_path)
    cache = str(tmp_path / "cache")
    data = load_data(DataConfig(root=str(m), cache_dir=cache))
    assert [r.split for r in data.records] == ["train"] * 4 + ["val"] * 4 + ["test"] * 4
    with caplog.at_level(logging.WARNING):
        load_data(DataConfig(root=str(m), cache_dir=cache, split=SplitConfig(method="seeded")))
    assert "split column is not used, since data.split.method is seeded" in caplog.text
    cfg = load_config(None, [f"data.root={m}"])
    with pytest.raises(ConfigError, match="fixes one split in its split column"):
        check_folds(cfg, 2)
    check_folds(cfg, 1)


def test_resume_after_the_data_changed_is_refused_naming_the_change(synth_data, tmp_path):
    rows = [
        f"{p},{'benign' if '_B_' in p.name else 'malignant'},{p.parent.parent.name},{p.parent.name}"
        for p in sorted(synth_data.rglob("*.png"))
    ]
    m = manifest(tmp_path / "m.csv", rows)
    run = train(tiny_config(m, tmp_path / "run", "train.epochs=1"), progress=False)
    before = (run / "split.csv").read_bytes()
    gone = rows[0].split(",")[2]
    manifest(m, [r for r in rows if f",{gone}," not in r])
    with pytest.raises(
        DataError,
        match=r"the data changed since this run started \(12 image\(s\) gone, e\.g\. .*"
        r"patient\(s\) moved between splits",
    ):
        train(tiny_config(m, tmp_path / "run", "train.epochs=2"), progress=False)
    assert (run / "split.csv").read_bytes() == before  # nothing of the refused run was written
    assert json.loads((run / "history.json").read_text())[-1]["epoch"] == 1


@pytest.mark.slow
def test_a_second_training_into_a_locked_run_folder_fails_at_once(synth_data, tmp_path):
    # the lock dies with its process: test_engine's SIGKILL test resumes into the killed run's folder
    with locked(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=rf"{tmp_path / 'run'}: another training \(process {os.getpid()}\)"):
            train(tiny_config(synth_data, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()
    train(tiny_config(synth_data, tmp_path / "run", "train.epochs=1"), progress=False)  # free again


def test_a_refused_training_leaves_no_out_folder_and_no_lock(tmp_path):
    out = tmp_path / "runs" / "new"
    with pytest.raises(DataError):
        train(tiny_config(tmp_path / "no-such-data", out), progress=False)
    assert not out.exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays, without a stray lock
    with pytest.raises(DataError):
        train(tiny_config(tmp_path / "no-such-data", tmp_path / "kept"), progress=False)
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


INTERRUPT_SCRIPT = textwrap.dedent("""
    import functools, os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell may have left Ctrl-C ignored
    import smse.engine as engine
    def ctrl_c(epoch, step, parts):
        if epoch == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGINT)
    engine.train = functools.partial(engine.train, callbacks=[ctrl_c])
    from smse.cli import main
    sys.argv = ["smse", "train", "--no-evaluate", *{args!r}]
    main()
""")


@pytest.mark.slow
def test_ctrl_c_exits_130_saying_how_to_resume_and_the_run_resumes(synth_data, tmp_path):
    out = tmp_path / "run"
    args = [f"data.root={synth_data}", f"out={out}", *TINY, "train.epochs=2"]
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPT_SCRIPT.format(args=args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: interrupted; {out} holds the run after epoch 1 "
        "(state.pt, last.safetensors): run the same command again to "
        "resume from there"
    )
    assert "Traceback" not in proc.stderr
    resumed = invoke("train", "--no-evaluate", *args)
    assert f"resuming {out} after epoch 1" in resumed
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2]


def test_cv_refuses_zero_folds_and_one_fixed_fold_file(synth_data, tmp_path):
    with pytest.raises(ConfigError, match="--folds: must be at least 1, got 0"):
        cross_validate(tiny_config(synth_data, tmp_path / "cv"), 0)
    fixed = tmp_path / "dsfold1.txt"
    fixed.write_text("")
    cfg = tiny_config(synth_data, tmp_path / "cv", "data.split.method=fold-file", f"data.split.fold_file={fixed}")
    with pytest.raises(ConfigError, match=r"dsfold1.txt holds one split, so all 3 folds would score it; .*\{fold\}"):
        cross_validate(cfg, 3)
    for ok in (str(tmp_path / "dsfold{fold}.txt"), str(tmp_path / "Folds.csv")):  # a Folds.csv holds every fold
        check_folds(
            tiny_config(synth_data, tmp_path / "cv", "data.split.method=fold-file", f"data.split.fold_file={ok}"), 3
        )
    assert not (tmp_path / "cv").exists()


# -- numbers: every spelling, every range --------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("1e-3", 1e-3), ("1E-3", 1e-3), (".5", 0.5), ("5.", 5.0), ("2", 2.0), ("1.0e+0", 1.0), ("+3e-1", 0.3)],
)
def test_every_float_spelling_is_a_number(text, value):
    assert load_config(None, [f"train.lr={text}"]).train.lr == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "1e", "1.2.3", "1,5", ".nan", ".inf", "true"])
def test_non_numbers_are_refused_by_name(text):
    with pytest.raises(ConfigError, match=r"train.lr: expected a (finite )?number"):
        load_config(None, [f"train.lr={text}"])


def numeric_fields(cls: type, prefix: str = ""):
    """(dotted name, int or float) of every numeric field of a config section and its subsections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint, f"{prefix}{f.name}.")
        elif hint in (int, float, int | None, float | None):
            yield f"{prefix}{f.name}", float if hint in (float, float | None) else int


def test_every_numeric_field_has_a_range_and_values_outside_it_are_refused():
    kinds = dict(numeric_fields(Config))
    ranges = {name: allowed for name, allowed, _ in _ranged_fields(Config())}
    assert sorted(ranges) == sorted(kinds)
    for name, r in ranges.items():
        outside = [r.low if r.low_open else r.low - 1] if r.low is not None else []
        outside += [r.high if r.high_open else r.high + 1] if r.high is not None else []
        for value in outside:
            with pytest.raises(ConfigError, match=rf"^{name}: must be "):
                load_config(None, [f"{name}={kinds[name](value)}"])
    for bad in ("train.batches_per_epoch=-3", "seed=-1", "data.split.seed=-1", "train.lr=1.0e+38"):
        with pytest.raises(ConfigError, match=rf"^{bad.split('=')[0]}: must be in "):
            load_config(None, [bad])


# -- the command line: usage errors in one line ---------------------------------------------------


@pytest.mark.parametrize(
    "args, parts",
    [
        (["predict", "RUN"], ["Missing argument", "predict --help"]),
        (["train", "--x"], ["No such option: --x"]),
        (["predict", "RUN", "a.png", "--k", "-1"], ["'--k'"]),
        (["cv", "--folds", "0"], ["'--folds'"]),
        (["predict", "RUN", "a.png", "--out", "."], ["'--out'", "is a directory"]),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, parts):
    one_line_error(smse(*args), *parts)


# -- images that cannot be decoded ---------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path) -> Path:
    """A valid PNG header claiming 14,000 x 13,000 pixels (182 megapixels) over a few bytes of data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 14000, 13000, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + png_chunk(b"IEND", b"")
    )
    return path


def damage(tree: Path) -> list[Path]:
    """Three files that pass a header and checksum check but fail to decode or are too small."""
    victims = [breakhis_path(tree, "F", "9133", 40, i) for i in (1, 2)] + [breakhis_path(tree, "DC", "16184", 40, 1)]
    arr = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    victims[0].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a truncated JPEG named .png
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    n = struct.unpack(">I", data[at - 4 : at])[0]
    payload = bytes(b ^ 0xFF if 10 <= k < 60 else b for k, b in enumerate(data[at + 4 : at + 4 + n]))
    data[at + 4 : at + 8 + n] = payload + struct.pack(">I", zlib.crc32(b"IDAT" + payload))  # corrupt, CRC intact
    victims[1].write_bytes(bytes(data))
    Image.fromarray(arr[:4, :4]).save(victims[2])
    return victims


def test_damage_found_only_by_decoding_is_skipped_and_listed(tmp_path):
    tree = tmp_path / "data"
    make_tree(tree, {("F", "9133"): 2, ("DC", "16184"): 2, ("A", "22549AB"): 1})
    victims = damage(tree)
    with pytest.raises(ImageError, match="SOB_B_F-14-9133-40-001.png: corrupt or truncated image"):
        load_data(DataConfig(root=str(tree)), split=False)
    data = load_data(DataConfig(root=str(tree), skip_bad=True), split=False)
    reasons = dict(data.skipped)
    assert sorted(reasons) == sorted(map(str, victims))
    assert "truncated" in reasons[str(victims[0])] and "image is only 4x4 pixels" in reasons[str(victims[2])]
    assert len(data.records) == 20 - 3


def test_an_old_inspection_cache_is_not_trusted(tmp_path):
    tree = tmp_path / "data"
    make_tree(tree, {("F", "9133"): 1, ("DC", "16184"): 1})
    victim = damage(tree)[0]
    cache = Path(os.environ["SMSE_CACHE_DIR"])
    cache.mkdir(parents=True, exist_ok=True)
    st = victim.stat()
    (cache / "files.json").write_text(json.dumps({str(victim): [st.st_size, st.st_mtime_ns, "x", 48, 32, "RGB", None]}))
    with pytest.raises(ImageError, match="truncated"):
        load_data(DataConfig(root=str(tree)), split=False)


@pytest.mark.slow
def test_a_decompression_bomb_is_a_bad_file_in_train_summary_and_predict(linked_run, tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="bomb.png: too large to decode safely"):
        read_image(bomb)
    tree = tmp_path / "data"
    make_tree(tree, {("F", "9133"): 1, ("DC", "16184"): 1})
    write_bomb(breakhis_path(tree, "F", "9133", 100, 1))
    one_line_error(
        smse("data", "summary", tree, "--json", tmp_path / "s.json"), "SOB_B_F-14-9133-100-001.png: too large"
    )
    data = load_data(DataConfig(root=str(tree), skip_bad=True), split=False)
    assert [Path(p).name for p, _ in data.skipped] == ["SOB_B_F-14-9133-100-001.png"]
    rows = predict(linked_run, [bomb], tmp_path / "p.csv", device="cpu")
    assert "too large to decode safely" in rows[0]["error"]


def test_an_unreadable_folder_stops_the_scan_by_name(tiny_tree, monkeypatch):
    hidden = breakhis_path(tiny_tree, "F", "9133", 40, 1).parent
    real = os.scandir

    def scandir(path="."):
        if Path(path) == hidden:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=rf"{hidden}: cannot read this folder \(Permission denied\)"):
        load_data(DataConfig(root=str(tiny_tree)), split=False)


def test_manifest_with_a_byte_order_mark_or_another_encoding(tmp_path):
    names = image_set(tmp_path, 2)
    m = manifest(tmp_path / "bom.csv", [f"{names[0]},a,p0,40", f"{names[1]},b,p1,40"], encoding="utf-8-sig")
    assert m.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [r.label for r in read_manifest(m)[0]] == ["a", "b"]
    latin = manifest(tmp_path / "latin.csv", [f"{names[0]},tumeur bénigne,p0,40"], encoding="latin-1")
    with pytest.raises(DataError, match="latin.csv: not UTF-8 text"):
        read_manifest(latin)


# -- places that cannot be written ---------------------------------------------------------------


def test_a_cache_folder_that_is_a_file_or_read_only_is_named(tiny_tree, tmp_path, monkeypatch):
    blocker = tmp_path / "cachefile"
    blocker.write_text("")
    with pytest.raises(
        OutputError,
        match=rf"cache folder {blocker}: cannot write there .*a file stands where a folder "
        r"is needed.*data.cache_dir, --cache-dir or \$SMSE_CACHE_DIR",
    ):
        load_data(DataConfig(root=str(tiny_tree), cache_dir=str(blocker)), split=False)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = tempfile.TemporaryFile

    def no_write(*args, dir=None, **kwargs):  # what a read-only folder does (chmod cannot stop root)
        if dir is not None and Path(dir) == read_only:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", no_write)
    monkeypatch.setenv("SMSE_CACHE_DIR", str(read_only))
    with pytest.raises(
        OutputError,
        match=rf"cache folder {read_only}: cannot write there \(Permission denied; no "
        "permission",
    ):
        load_data(DataConfig(root=str(tiny_tree)), split=False)


def test_an_out_that_is_a_file_is_named(synth_data, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "run"):
        with pytest.raises(OutputError, match=rf"out folder {out}: cannot write there .*choose another out"):
            train(tiny_config(synth_data, out), progress=False)
    assert blocker.read_text() == "keep me"
    with pytest.raises(OutputError, match=r"cannot write \(it is a folder: give a file name\)"):
        from smse.io import write_text

        write_text(tmp_path, "x")


def test_a_full_disk_while_writing_a_checkpoint_names_it_and_keeps_the_old_one(synth_data, tmp_path, monkeypatch):
    run = train(tiny_config(synth_data, tmp_path / "run", "train.epochs=1"), progress=False)
    last = (run / "last.safetensors").read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("smse.checkpoint.save_file", full_disk)
    with pytest.raises(
        OutputError,
        match=rf"{run / 'last.safetensors'}: cannot write \(No space left on device; the "
        "disk is full: free some space and run again\\)",
    ):
        train(tiny_config(synth_data, tmp_path / "run", "train.epochs=2"), progress=False)
    assert (run / "last.safetensors").read_bytes() == last
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    resumed = train(tiny_config(synth_data, tmp_path / "run", "train.epochs=2"), progress=False)
    assert [h["epoch"] for h in json.loads((resumed / "history.json").read_text())] == [1, 2]


# -- non-finite numbers --------------------------------------------------------------------------


def test_non_finite_weights_stop_training_before_they_are_saved(tmp_path):
    layer = torch.nn.Linear(2, 2)
    check_finite_weights(layer, 1, tmp_path)
    with torch.no_grad():
        layer.bias[0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"weights bias became non-finite in epoch 3; the last good checkpoint"):
        check_finite_weights(layer, 3, tmp_path)


@pytest.mark.slow
def test_non_finite_embeddings_never_reach_the_report(linked_run, tmp_path, caplog, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(linked_run, run)
    npz = run / "eval" / "test-embeddings.npz"
    arrays = dict(np.load(npz))
    arrays["embeddings"][:3] = np.nan
    np.savez(npz, **arrays)
    mapped = []

    def project(emb, seed):  # stands in for t-SNE, which ended the process with a segmentation fault on NaN
        mapped.append(emb)
        return np.zeros((len(emb), 2)), "none"

    monkeypatch.setattr(html, "_project", project)
    with caplog.at_level(logging.WARNING):
        assert write_report(run).exists()
    assert len(mapped[0]) == len(arrays["embeddings"]) - 3 and np.isfinite(mapped[0]).all()
    assert f"left 3 of {len(arrays['paths'])} test images with non-finite embeddings out" in caplog.text
    best = run / "best.safetensors"
    with safe_open(str(best), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(str(best))
    weights["heads.embed.weight"][:] = float("nan")
    save_file(weights, str(best), metadata=metadata)
    before = (run / "eval" / "metrics.json").read_bytes()
    with pytest.raises(TrainingDiverged, match=rf"{best}: the model gives non-finite embeddings for \d+ of "):
        evaluate_run(run, progress=False)
    assert (run / "eval" / "metrics.json").read_bytes() == before  # nothing of it was written
    with pytest.raises(TrainingDiverged, match=rf"{best}: the model gives non-finite embeddings for 1 of 1 images"):
        predict(run, [arrays["paths"][0]], tmp_path / "p.csv", device="cpu")
    assert not (tmp_path / "p.csv").exists()
