import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smse.config import DataConfig
from smse.data.breakhis import TYPE_CLASS, parse_name
from smse.data.loading import load_data
from smse.errors import ConfigError
from smse.synth import generate
from smse.synth.generator import ZOOM, allocate, nested_fields, parse_proportions, plan_patients
from smse.synth.slide import VirtualSlide


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth"), patients=9, seed=3, size=(48, 32), images_per_mag=2, workers=1)


def test_tree_loads_with_the_breakhis_loader(synth_root, tmp_path):
    data = load_data(DataConfig(root=str(synth_root), cache_dir=str(tmp_path)))
    assert len(data.records) == 9 * 2 * 4
    assert {r.magnification for r in data.records} == {40, 100, 200, 400}
    assert len({r.patient for r in data.records}) == 9
    assert {r.split for r in data.records} <= {"train", "val", "test"}
    for r in data.records:
        info = parse_name(Path(r.path).name)
        assert TYPE_CLASS[info["type"]] == r.label[0].upper()
        image = Image.open(r.path)
        assert image.size == (48, 32) and image.mode == "RGB"


@pytest.mark.slow
def test_deterministic_per_seed_and_worker_count(tmp_path, synth_root):
    again = generate(tmp_path / "b", patients=9, seed=3, size=(48, 32), images_per_mag=2, workers=2)
    files = sorted(p.relative_to(synth_root) for p in synth_root.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    for rel in files[::7]:
        assert (synth_root / rel).read_bytes() == (again / rel).read_bytes()
    other = generate(tmp_path / "c", patients=9, seed=4, size=(48, 32), images_per_mag=2, workers=1)
    assert sorted(p.name for p in other.rglob("*.png")) != [p.name for p in files]


def test_proportions_follow_breakhis_and_can_change():
    counts = allocate(32, parse_proportions(None))
    assert sum(counts.values()) == 32 and min(counts.values()) >= 1
    assert max(counts, key=counts.get) == "DC" and counts["PT"] <= 2
    benign = sum(counts[t] for t in ("A", "F", "PT", "TA"))
    assert 1.7 <= (32 - benign) / benign <= 2.8
    assert set(allocate(16, parse_proportions("balanced")).values()) == {2}
    assert allocate(5, parse_proportions("DC=1,F=1")) == {
        "A": 0,
        "F": 3,
        "PT": 0,
        "TA": 0,
        "DC": 2,
        "LC": 0,
        "MC": 0,
        "PC": 0,
    }
    with pytest.raises(ConfigError, match="unknown tumour type 'XX'"):
        parse_proportions("XX=1")


def test_slide_ids_unique_and_valid():
    patients = plan_patients(60, seed=1)
    ids = [p.slide for p in patients]
    assert len(set(ids)) == 60
    for p in patients:
        assert parse_name(p.file_name(400, 1))["patient"] == f"{p.year}-{p.slide}"


def test_magnification_fields_nest():
    slide = VirtualSlide("DC", 5)
    rng = np.random.default_rng(0)
    for chain in nested_fields(slide, 1.5, 5, rng):
        for wide, narrow in ((40, 100), (100, 200), (200, 400)):
            wx, wy, ww, wh = chain[wide]
            nx, ny, nw, nh = chain[narrow]
            assert wx - 1e-6 <= nx and nx + nw <= wx + ww + 1e-6 and wy - 1e-6 <= ny and ny + nh <= wy + wh + 1e-6
        assert chain[40][2] / chain[400][2] == pytest.approx(ZOOM[400])
        assert chain[40][2] / chain[100][2] == pytest.approx(2.5)


def test_geometry_recorded_for_every_file(synth_root):
    meta = json.loads((synth_root / "smse-synth.json").read_text())
    assert len(meta["fields"]) == 72
    by_patient = Counter(v["patient"] for v in meta["fields"].values())
    assert set(by_patient.values()) == {8}


def test_same_field_renders_same_tissue_at_two_scales():
    """A 400X field rendered directly matches the same region cut out of a 200X render (shared geometry)."""
    slide = VirtualSlide("TA", 2)
    rng = np.random.default_rng(0)
    big = slide.render((500.0, 500.0, 300.0, 200.0), (96, 64), rng, supersample=1).astype(float)
    small = slide.render((500.0, 500.0, 150.0, 100.0), (96, 64), rng, supersample=1).astype(float)
    crop = big[:32, :48]
    down = small.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
    corr = np.corrcoef(crop.mean(axis=2).ravel(), down.mean(axis=2).ravel())[0, 1]
    unrelated = slide.render((2000.0, 1500.0, 150.0, 100.0), (96, 64), rng, supersample=1).astype(float)
    other = np.corrcoef(crop.mean(axis=2).ravel(), unrelated.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3, 4)).ravel())[
        0, 1
    ]
    assert corr > 0.6 and corr > other + 0.3


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="--patients"):
        plan_patients(0, 0)
    with pytest.raises(ConfigError, match="--size"):
        generate("/tmp/never", patients=1, size=(8, 8))
