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
    return folder / f"SOB_{cls}_{ttype}_{year}-{slide}" / f"{mag}X" / f"SOB_{cls}_{ttype}-{year}-{slide}-{mag}-{seq:03d}.png"


def write_png(path: Path, seed: int, size: tuple[int, int] = (35, 23), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path)
    return path


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A grayscale PNG of zeros, a few kB that decode to ``width * height`` bytes (``rows``: encode only the first rows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height if rows is None else rows)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


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


TINY = {("A", "22549AB"): 2, ("A", "22549CD"): 2, ("F", "9133"): 2, ("F", "21998CD"): 2,
        ("DC", "16184"): 2, ("DC", "16184CD"): 2, ("LC", "12204"): 2, ("PC", "190EF"): 2}  # 190EF is filed under year 15 in the archive; here 14


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

    return generate(tmp_path_factory.mktemp("synth-data"), patients=10, seed=1, size=(48, 32), images_per_mag=3,
                    workers=1)


def tiny_config(data_root: Path, out: Path, *overrides: str):
    """A seconds-fast config: random paper CNN frozen as a feature extractor on 32x48 images."""
    from smse.config import load_config

    return load_config(None, [f"data.root={data_root}", f"out={out}", "data.image_size=[32, 48]",
                              "model.backbone=paper-cnn", "model.pretrained=false", "model.embedding_dim=16",
                              "model.views=2", "train.epochs=3", "sampler.batch_size=16", "train.device=cpu",
                              "data.split.val_fraction=0.25", *overrides])


def invoke(*args) -> str:
    """Runs the CLI in process with these arguments (str() of each); asserts exit 0 and returns the output."""
    from typer.testing import CliRunner

    from smse.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output
