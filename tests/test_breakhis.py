from pathlib import Path

import pytest

from smse.data.breakhis import find_breast_root, parse_name, scan_breakhis
from smse.errors import DataError
from tests.conftest import breakhis_path, make_tree, sample_facts, write_png


def test_parse_name_keeps_suffixes_and_fields():
    info = parse_name("SOB_B_A-14-22549AB-100-001.png")
    assert info == {
        "cls": "B",
        "type": "A",
        "year": "14",
        "slide": "22549AB",
        "magnification": 100,
        "seq": 1,
        "patient": "14-22549AB",
        "slide_folder": "SOB_B_A_14-22549AB",
    }
    assert parse_name("SOB_B_A-14-22549CD-100-001.png")["patient"] != info["patient"]
    assert parse_name("SOB_B_TA-14-16184-40-001.png")["patient"] == "14-16184"
    assert parse_name("SOB_B_TA-14-16184CD-40-001.png")["patient"] == "14-16184CD"
    assert parse_name("SOB_M_MC-14-18842D-400-012.png")["patient"] == "14-18842D"


def test_parse_name_year_15():
    info = parse_name("SOB_M_PC-15-190EF-200-003.png")
    assert (info["year"], info["patient"], info["slide_folder"]) == ("15", "15-190EF", "SOB_M_PC_15-190EF")


@pytest.mark.parametrize(
    "name, words",
    [
        ("IMG_0001.png", "not a BreakHis file name"),
        ("SOB_B_A-14-22549AB-300-001.png", "unknown magnification 300X"),
        ("SOB_B_DC-14-22549AB-100-001.png", "does not belong to class B"),
        ("SOB_B_A-14-22549AB-100-1.png", "not a BreakHis file name"),
        ("SOB_B_XX-14-22549AB-100-001.png", "not a BreakHis file name"),
    ],
)
def test_parse_name_errors_name_the_file(name, words):
    with pytest.raises(DataError, match=words) as err:
        parse_name(name)
    assert name in str(err.value)


def test_scan_finds_every_image_with_right_fields(tiny_tree):
    records, skipped = scan_breakhis(tiny_tree)
    assert len(records) == 8 * 4 * 2 and not skipped
    assert len({r.patient for r in records}) == 8
    by_path = {Path(r.path).name: r for r in records}
    r = by_path["SOB_M_DC-14-16184CD-400-002.png"]
    assert (r.label, r.tumor_type, r.patient, r.magnification) == ("malignant", "DC", "14-16184CD", 400)
    assert by_path["SOB_B_A-14-22549AB-40-001.png"].label == "benign"


def test_scan_accepts_nested_copy_and_breast_folder(tmp_path):
    make_tree(tmp_path / "kaggle" / "BreaKHis_v1", {("F", "9133"): 1})
    assert find_breast_root(tmp_path / "kaggle").parts[-4:] == (
        "BreaKHis_v1",
        "BreaKHis_v1",
        "histology_slides",
        "breast",
    )
    records, _ = scan_breakhis(tmp_path / "kaggle")
    assert len(records) == 4
    breast = find_breast_root(tmp_path / "kaggle")
    assert len(scan_breakhis(breast)[0]) == 4


def test_relative_root_gives_absolute_paths(tiny_tree, monkeypatch):
    monkeypatch.chdir(tiny_tree.parent)
    records, _ = scan_breakhis(tiny_tree.name)
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in records)


def test_scan_selects_magnifications(tiny_tree):
    records, _ = scan_breakhis(tiny_tree, magnifications=[40, 400])
    assert {r.magnification for r in records} == {40, 400} and len(records) == 32
    with pytest.raises(DataError, match="unknown magnification"):
        scan_breakhis(tiny_tree, magnifications=[300])


def test_scan_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_breakhis(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no BreakHis tree"):
        scan_breakhis(tmp_path / "empty")
    (tmp_path / "e2" / "BreaKHis_v1" / "histology_slides" / "breast").mkdir(parents=True)
    with pytest.raises(DataError, match="no BreakHis images"):
        scan_breakhis(tmp_path / "e2")


def test_scan_bad_name_and_misfiled_image(tiny_tree):
    good = breakhis_path(tiny_tree, "F", "9133", 40, 1)
    bad = write_png(good.parent / "holiday.png", 1)
    with pytest.raises(DataError, match="holiday.png"):
        scan_breakhis(tiny_tree)
    records, skipped = scan_breakhis(tiny_tree, skip_bad=True)
    assert len(records) == 64 and skipped == [
        (str(bad), "not a BreakHis file name (expected SOB_<B|M>_<type>-<yy>-<slide>-<mag>-<nnn>.png)")
    ]
    bad.unlink()
    misfiled = good.parent.parent / "100X" / "SOB_B_F-14-9133-40-009.png"
    write_png(misfiled, 2)
    with pytest.raises(DataError, match="magnification folder '100X'"):
        scan_breakhis(tiny_tree)


def test_sample_parsed_exactly(sample_root):
    facts = sample_facts(sample_root)
    records, skipped = scan_breakhis(sample_root)
    assert len(records) == facts["images"] and not skipped
    assert len({Path(r.path).parent.parent for r in records}) == facts["slide_folders"] == 39
    assert len({r.patient for r in records}) == 38
    both = {r.tumor_type for r in records if r.patient == "14-13412"}
    assert both == {"DC", "LC"}
    assert "15-190EF" in {r.patient for r in records}
    for r in records:
        info = parse_name(Path(r.path).name)
        assert (r.tumor_type, r.magnification) == (info["type"], info["magnification"])
        assert Path(r.path).parts[-6] == r.label
