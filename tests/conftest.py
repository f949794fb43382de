"""Shared fixtures: tiny BreakHis-layout trees built on the fly, and the real sample when present."""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smse.data.breakhis import CLASS_FOLDERS, TYPE_CLASS, TYPE_FOLDERS

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "breakhis-sample"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python that imports this checkout's smse (not another install) and its tests."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), **extra}


def breakhis_path(root: Path, ttype: str, slide: str, mag: int, seq: int, year: str = "14") -> Path:
    cls = TYPE_CLASS[ttype]
    folder = root / "BreaKHis_v1" / "histology_slides" / "breast" / CLASS_FOLDERS[cls] / "SOB" / TYPE_FOLDERS[ttype]
    return (
        folder
        / f"SOB_{cls}_{ttype}_{year}-{slide}"
        / f"{mag}X"
        / f"SOB_{cls}_{ttype}-{year}-{slide}-{mag}-{seq:03d}.png"
    )


def write_png(path: Path, seed: int, size: tuple[int, int] = (35, 23), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path)
    return path


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A grayscale PNG of zeros, a few kB that decode to ``width * height`` bytes (``rows``: only the first rows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height if rows is None else rows)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def make_tree(root: Path, slides: dict[tuple[str, str], int], mags=(40, 100, 200, 400)) -> list[Path]:
    """``slides``: (type, slide id) -> images per magnification. Returns the written paths."""
    paths = []
    seed = 0
    for (ttype, slide), n in slides.items():
        for mag in mags:
            for seq in range(1, n + 1):
                seed += 1
                paths.append(write_png(breakhis_path(root, ttype, slide, mag, seq), seed))
    return paths


TINY = {
    ("A", "22549AB"): 2,
    ("A", "22549CD"): 2,
    ("F", "9133"): 2,
    ("F", "21998CD"): 2,
    ("DC", "16184"): 2,
    ("DC", "16184CD"): 2,
    ("LC", "12204"): 2,
    ("PC", "190EF"): 2,
}  # 190EF is filed under year 15 in the archive; here 14


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    make_tree(tmp_path / "data", TINY)
    return tmp_path / "data"


@pytest.fixture
def sample_root() -> Path:
    if not (SAMPLE / "BreaKHis_v1").is_dir():
        pytest.skip(f"the real BreakHis sample is not at {SAMPLE} (only present beside the project's own checkout)")
    return SAMPLE


def sample_facts(root: Path) -> dict:
    """What the sample's README states: total images, slide folders, and images per size."""
    readme = (root / "README.md").read_text()
    total_row = next(line for line in readme.splitlines() if line.startswith("| all |"))
    cells = [c.strip() for c in total_row.strip("|").split("|")]
    sizes = {f"{m[2]} RGB": int(m[1]) for m in re.finditer(r"(\d+) are (\d+x\d+)", readme)}
    return {"images": int(cells[-2]), "slide_folders": int(cells[-1]), "sizes": sizes}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SMSE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A tiny synthetic BreakHis-layout set shared by the training tests (generated once)."""
    from smse.synth import generate

    return generate(
        tmp_path_factory.mktemp("synth-data"), patients=10, seed=1, size=(48, 32), images_per_mag=3, workers=1
    )


def tiny_config(data_root: Path, out: Path, *overrides: str):
    """A seconds-fast config: random paper CNN frozen as a feature extractor on 32x48 images."""
    from smse.config import load_config

    return load_config(
        None,
        [
            f"data.root={data_root}",
            f"out={out}",
            "data.image_size=[32, 48]",
            "model.backbone=paper-cnn",
            "model.pretrained=false",
            "model.embedding_dim=16",
            "model.views=2",
            "train.epochs=3",
            "sampler.batch_size=16",
            "train.device=cpu",
            "data.split.val_fraction=0.25",
            *overrides,
        ],
    )


def invoke(*args) -> str:
    """Runs the CLI in process with these arguments (str() of each); asserts exit 0 and returns the output."""
    from typer.testing import CliRunner

    from smse.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def predictions_by_group(run: Path) -> dict[str, dict]:
    """The test metrics recomputed by plain loops from ``eval/predictions.csv``, for ``all`` and each magnification.

    Also checks that each row's ``predicted`` class is the one of highest probability in its ``p_*`` columns.
    """
    import csv

    with open(Path(run) / "eval" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows, "predictions.csv has no rows"
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    for row in rows:
        probs = {c: float(row[f"p_{c}"]) for c in classes}
        assert probs[row["predicted"]] == max(probs.values()), row
    groups: dict[str, list[dict]] = {"all": rows}
    for row in rows:
        groups.setdefault(f"{row['magnification']}X", []).append(row)
    out = {}
    for name, members in groups.items():
        per_patient: dict[str, list[int]] = {}
        confusion = [[0] * len(classes) for _ in classes]
        for row in members:
            per_patient.setdefault(row["patient"], []).append(int(row["label"] == row["predicted"]))
            confusion[classes.index(row["label"])][classes.index(row["predicted"])] += 1
        right = sum(sum(v) for v in per_patient.values())
        out[name] = {
            "images": len(members),
            "patients": len(per_patient),
            "image_accuracy": right / len(members),
            "patient_accuracy": sum(sum(v) / len(v) for v in per_patient.values()) / len(per_patient),
            "confusion_matrix": confusion,
        }
    return out


def assert_metrics_match_predictions(run: Path, metrics: dict) -> None:
    """``metrics["head"]`` (metrics.json) says what ``eval/predictions.csv`` holds, group by group."""
    import pytest

    expected = predictions_by_group(run)
    assert set(metrics["head"]) == set(expected)
    for name, want in expected.items():
        got = metrics["head"][name]
        assert got["images"] == want["images"] and got["patients"] == want["patients"], name
        assert got["confusion_matrix"] == want["confusion_matrix"], name
        assert got["image_accuracy"] == pytest.approx(want["image_accuracy"], abs=1e-12), name
        assert got["patient_accuracy"] == pytest.approx(want["patient_accuracy"], abs=1e-12), name
