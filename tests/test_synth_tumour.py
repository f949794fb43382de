"""Synthetic slides with tumour regions (``smse synth --wsi --tumour-fraction``): share, mask, pixels, CLI."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from smse.data.breakhis import TYPE_CLASS
from smse.synth.wsi import (
    MASK_STEP,
    generate_slides,
    load_slides,
    parse_tumour_fraction,
    plan_slides,
    render_slide,
    tumour_mask,
    tumour_share,
)

# small slides (1200 x 900 um at 2 um per pixel) so that the module runs in seconds; two benign, two malignant
ARGS = {"patients": 4, "seed": 0, "size": (600, 450), "mpp": 2.0, "proportions": "A=1,F=1,DC=1,MC=1"}
RANGE = (0.05, 0.3)


def plan_args(**extra) -> dict:
    """``ARGS`` as ``plan_slides`` names them."""
    args = {("n" if k == "patients" else k): v for k, v in ARGS.items()}
    return {**args, **extra}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_slides(tmp_path_factory.mktemp("tumour"), workers=1, tumour_fraction=RANGE, **ARGS)


@pytest.fixture(scope="module")
def slides(root) -> list:
    return load_slides(root)


def pixel_grid(slide) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the level-0 pixels in micrometres."""
    w, h = slide.size
    return (np.arange(w) + 0.5) * slide.mpp, (np.arange(h) + 0.5)[:, None] * slide.mpp


def level0(root: Path, slide) -> np.ndarray:
    return tifffile.imread(root / "slides" / f"{slide.name}.tiff", key=0)


def test_malignant_slides_hold_their_drawn_share_of_tumour_and_benign_ones_none(slides):
    malignant = [s for s in slides if s.label == "malignant"]
    benign = [s for s in slides if s.label == "benign"]
    assert len(malignant) == 2 and len(benign) == 2
    for s in malignant:
        assert RANGE[0] <= s.tumour_fraction <= RANGE[1]
        assert TYPE_CLASS[s.tumor_type] == "M" and TYPE_CLASS[s.background_type] == "B"
        for step in (2.0, MASK_STEP):  # finer and coarser than the grid the threshold was found on
            assert abs(tumour_share(s, step) - s.tumour_fraction) <= 0.03, (s.name, step, s.tumour_fraction)
        xs, ys = pixel_grid(s)
        tumour, tissue = s.tumour(xs, ys), s.tissue(xs, ys)
        assert tumour.shape == tissue.shape and tumour.any() and not (tumour & ~tissue).any()
    for s in benign:
        assert s.tumour_fraction == 0.0 and s.background_type is None and s.tumour_threshold is None
        assert not s.tumour(*pixel_grid(s)).any() and tumour_share(s) == 0.0
    # broadcasting like tissue: a single point, and rows against columns
    s = malignant[0]
    assert s.tumour(1.0, 2.0).shape == () and s.tumour(np.zeros(3), np.zeros((2, 1))).shape == (2, 3)


def test_tumour_regions_are_a_few_compact_blobs(slides):
    """Not confetti: most of the tumour lies in its largest few connected regions."""
    from scipy import ndimage

    for s in slides:
        if s.label != "malignant":
            continue
        regions, n = ndimage.label(tumour_mask(s, 2.0))
        sizes = np.sort(np.bincount(regions.ravel())[1:])[::-1]
        assert 1 <= n <= 8 and sizes[:3].sum() >= 0.8 * sizes.sum(), (s.name, n, sizes)


def test_masks_are_written_beside_the_slides_and_match_tumour(root, slides):
    meta = json.loads((root / "smse-synth-wsi.json").read_text())
    assert meta["tumour_fraction"] == list(RANGE) and meta["mask_step"] == MASK_STEP
    assert {"tumour_fraction", "mask_step", "masks", "tumour_scale", "tumour_threshold"} <= set(meta["units"])
    assert f"one pixel per {MASK_STEP:g} micrometres" in meta["units"]["masks"]
    for s in slides:
        mask = np.asarray(Image.open(root / "masks" / f"{s.name}-tumour.png"))
        w, h = s.size[0] * s.mpp, s.size[1] * s.mpp
        assert mask.dtype == np.uint8 and mask.shape == (math.ceil(h / MASK_STEP), math.ceil(w / MASK_STEP))
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, tumour_mask(s))
        ys, xs = np.nonzero(mask)  # pixel [i, j] is centred at ((j + 0.5) * step, (i + 0.5) * step)
        assert s.tumour((xs + 0.5) * MASK_STEP, (ys + 0.5) * MASK_STEP).all()
    labels = (root / "labels.csv").read_text().splitlines()
    assert labels[0] == "slide,label,patient,tumor_type"
    assert labels[1:] == [f"{s.name},{s.label},{s.name},{s.tumor_type}" for s in slides]


def test_slides_load_back_as_planned(slides):
    assert slides == plan_slides(**plan_args(tumour_fraction=RANGE))
    assert all(isinstance(s.size, tuple) and isinstance(s.blobs, tuple) for s in slides)


def test_the_same_arguments_give_the_same_json_and_pixels(root, slides, tmp_path):
    again = generate_slides(tmp_path / "again", workers=1, tumour_fraction=RANGE, **ARGS)
    assert (again / "smse-synth-wsi.json").read_text() == (root / "smse-synth-wsi.json").read_text()
    for s in slides:
        np.testing.assert_array_equal(level0(again, s), level0(root, s))
        assert (again / "masks" / f"{s.name}-tumour.png").read_bytes() == (
            root / "masks" / f"{s.name}-tumour.png"
        ).read_bytes()


def block_features(image: np.ndarray, block: int = 16) -> np.ndarray:
    """Mean R, G, B and the spread of grey of each ``block`` x ``block`` block, in row-major block order."""
    h, w = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    px = image[:h, :w].astype(np.float64).reshape(h // block, block, w // block, block, 3).swapaxes(1, 2)
    px = px.reshape(-1, block * block, 3)
    return np.c_[px.mean(1), px.mean(2).std(1)]


def blocks_all(mask: np.ndarray, block: int = 16) -> np.ndarray:
    h, w = (mask.shape[0] // block) * block, (mask.shape[1] // block) * block
    return mask[:h, :w].reshape(h // block, block, w // block, block).all(axis=(1, 3)).ravel()


def test_tumour_pixels_look_unlike_the_tissue_around_them(root, slides):
    """Colour and texture differ more between tumour and the benign tissue than between two halves of the latter."""
    for s in slides:
        if s.label != "malignant":
            continue
        xs, ys = pixel_grid(s)
        tumour, tissue = s.tumour(xs, ys), s.tissue(xs, ys)
        features = block_features(level0(root, s))
        inside, around = blocks_all(tumour), blocks_all(tissue & ~tumour)
        assert inside.sum() >= 10 and around.sum() >= 40, (s.name, inside.sum(), around.sum())
        scale = features[around].std(0) + 1e-9  # in units of the block-to-block spread of the benign tissue
        column = np.tile(np.arange(tumour.shape[1] // 16), tumour.shape[0] // 16)
        left = column < np.median(column[around])
        between = np.linalg.norm((features[inside].mean(0) - features[around].mean(0)) / scale)
        within = np.linalg.norm((features[around & left].mean(0) - features[around & ~left].mean(0)) / scale)
        assert between > 1.5 * within, (s.name, s.tumor_type, s.background_type, between, within)


def test_without_tumour_fraction_slides_are_as_before(slides):
    """None plans and draws exactly what a plan without the argument does; benign slides are the same either way."""
    legacy = plan_slides(**plan_args())
    assert plan_slides(**plan_args(tumour_fraction=None)) == legacy
    for old, new in zip(legacy, slides, strict=True):
        assert (old.name, old.tumor_type, old.label, old.seed, old.blobs) == (
            new.name,
            new.tumor_type,
            new.label,
            new.seed,
            new.blobs,
        )
        assert old.background_type is None and old.tumour_fraction is None and old.tumour_threshold is None
        xs, ys = pixel_grid(old)
        # one rule for every slide: a malignant slide without regions is all tumour, a benign one has none
        expected = old.tissue(xs, ys) if old.label == "malignant" else np.zeros_like(old.tissue(xs, ys))
        np.testing.assert_array_equal(old.tumour(xs, ys), expected)
    benign_old = next(s for s in legacy if s.label == "benign")
    benign_new = next(s for s in slides if s.name == benign_old.name)
    np.testing.assert_array_equal(render_slide(benign_old), render_slide(benign_new))
    malignant = next(s for s in legacy if s.label == "malignant")
    stripped = replace(next(s for s in slides if s.name == malignant.name), background_type=None)
    stripped = replace(stripped, tumour_fraction=None, tumour_threshold=None, tumour_scale=None, tumour_seed=None)
    assert stripped == malignant
    np.testing.assert_array_equal(render_slide(stripped), render_slide(malignant))


def test_json_without_tumour_fraction_has_only_neutral_new_keys(tmp_path):
    root = generate_slides(tmp_path / "plain", patients=1, seed=1, size=(160, 120), mpp=2.0, workers=1)
    meta = json.loads((root / "smse-synth-wsi.json").read_text())
    assert meta["tumour_fraction"] is None and meta["mask_step"] is None and not (root / "masks").exists()
    new = {"background_type": None, "tumour_fraction": None, "tumour_threshold": None, "tumour_scale": None}
    assert all(s.items() >= new.items() for s in meta["slides"])
    assert load_slides(root) == plan_slides(1, seed=1, size=(160, 120), mpp=2.0)


@pytest.mark.parametrize(
    "text, expected",
    [("0.05-0.3", (0.05, 0.3)), ("0.1", (0.1, 0.1)), (" 0.1 - 0.2 ", (0.1, 0.2)), ("1e-2-5e-1", (0.01, 0.5))],
)
def test_tumour_fraction_is_lo_hi_or_one_share(text, expected):
    assert parse_tumour_fraction(text) == expected


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The command line in this process: its exit code and what it wrote to standard error."""
    from smse import cli as command

    monkeypatch.setattr(sys, "argv", ["smse", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        command.main()
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "0", "1", "0.3-0.1", "-0.1-0.2", "0.1-0.2-0.3", "nan", "0.2-inf", "1.5"])
def test_cli_refuses_tumour_fractions_that_cannot_be(value, tmp_path, monkeypatch, capsys):
    out = tmp_path / "wsi"
    code, err = cli(monkeypatch, capsys, "synth", "--wsi", "--out", out, "--patients", 1, f"--tumour-fraction={value}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: --tumour-fraction") and repr(value) in lines[0], err
    assert not out.exists()


def test_cli_tumour_fraction_needs_wsi(tmp_path, monkeypatch, capsys):
    out = tmp_path / "images"
    code, err = cli(monkeypatch, capsys, "synth", "--out", out, "--tumour-fraction", "0.1")
    assert code == 2 and err.startswith("error: --tumour-fraction 0.1") and "--wsi" in err, err
    assert not out.exists()


def test_cli_writes_slides_with_tumour_regions_and_masks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "wsi"
    args = ["synth", "--wsi", "--out", out, "--patients", 2, "--size", "160x120", "--mpp", 2, "--workers", 1]
    code, err = cli(monkeypatch, capsys, *args, "--tumour-fraction", "0.1-0.2")
    assert code == 0, err
    meta = json.loads((out / "smse-synth-wsi.json").read_text())
    assert meta["tumour_fraction"] == [0.1, 0.2]
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(
        f"{s['name']}-tumour.png" for s in meta["slides"]
    )
