"""Whole-slide images: readers, resolution, tissue, concentric tiles, the manifest, training, slide prediction."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smse.api import load_model
from smse.cli import main
from smse.data.manifest import read_manifest
from smse.engine import train
from smse.errors import DataError, SlideError
from smse.synth.wsi import generate_slides, load_slides, write_pyramid
from smse.wsi import TileSpec, available_backends, magnification_mpp, open_slide, plan_tiles, reader, write_tiles
from smse.wsi.tiles import cut
from smse.wsi.tissue import otsu_threshold, tissue_mask
from tests.conftest import invoke, tiny_config

BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name not in available_backends(), reason=f"{name} does not import here (pip install 'smse[wsi]')"
        ),
    )
    for name in ("openslide", "tiffslide")
]


def smooth_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def glass(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal([238, 236, 240], 1.5, (h, w, 3)), 0, 255).astype(np.uint8)


def test_breakhis_magnifications_map_to_objective_resolutions():
    # total magnification = objective x 10 eyepiece; whole-slide convention: um/px = 10 / objective
    assert [magnification_mpp(m) for m in (40, 100, 200, 400)] == pytest.approx([2.5, 1.0, 0.5, 0.25])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_gives_resolution_pixels_and_white_outside(backend, tmp_path, monkeypatch):
    image = smooth_image(600, 420)
    path = write_pyramid(tmp_path / "s.tiff", image, mpp=0.5, objective=20)
    with open_slide(path, backend) as slide:
        assert (slide.backend, slide.mpp, slide.mpp_source, slide.objective_power) == (backend, 0.5, "metadata", 20)
        assert slide.dimensions == (600, 420) and slide.level_dimensions[1] == (150, 105)
        assert np.array_equal(slide.read(0, 10, 20, 50, 40), image[20:60, 10:60])
        level1 = np.asarray(Image.fromarray(image).reduce(4))
        assert np.array_equal(slide.read(1, 30, 40, 20, 10), level1[40:50, 30:50])
        edge = slide.read(0, 580, -5, 30, 10)
        assert (
            (edge[:5] == 255).all() and (edge[:, 20:] == 255).all() and np.array_equal(edge[5:, :20], image[:5, 580:])
        )
        whole, scale = slide.thumbnail(200)
        monkeypatch.setattr(reader, "BAND_PIXELS", 600 * 7)  # read in many bands: same thumbnail
        banded, _ = slide.thumbnail(200)
    assert scale == pytest.approx(4.0) and whole.shape == (105, 150, 3) and np.array_equal(whole, banded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_centres_agree_across_magnifications(backend, tmp_path):
    # a 40x scan (0.25 um/px) whose sizes do not divide by 4: levels at ~1.0 and ~4.0 um/px; dark dots on glass
    w, h, radius = 2050, 1538, 16
    dots = [(333, 411), (1201, 905), (1777, 386)]
    image = np.full((h, w, 3), 230, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for cx, cy in dots:
        image[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2] = 20
    path = write_pyramid(tmp_path / "dots.tiff", image, mpp=0.25, objective=40)
    size = (64, 48)
    with open_slide(path, backend) as slide:
        plan_sources = plan_tiles(slide, TileSpec(size=size, min_tissue=0.0)).sources
        # 40X from level 1 resampled 2.5:1, 100X from level 1 (~1:1), 200X from level 0 averaged 2:1, 400X as is
        assert [(s.level, round(s.scale, 2)) for s in plan_sources.values()] == [(1, 2.5), (1, 1.0), (0, 2.0), (0, 1.0)]
        for centre in dots:
            for mag, source in plan_sources.items():
                tile = cut(slide, source, centre, size).astype(float).mean(axis=2)
                weight = np.clip(230 - tile, 0, None)
                found = (np.indices(tile.shape)[::-1] + 0.5).reshape(2, -1) @ weight.ravel() / weight.sum()
                # level pixels are exact 4^level blocks, but a library's downsample is a size ratio (2050 / 513):
                # the tile is centred on centre / downsample, the dot lies at centre / 4^level
                ds = slide.level_downsamples[source.level]
                shift = (np.array(centre) / 4.0**source.level - np.array(centre) / ds) / source.scale
                assert found == pytest.approx(np.array(size) / 2 + shift, abs=0.2), (mag, centre)


def test_otsu_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(40, 12, 3000), rng.normal(170, 25, 1200)]), 0, 255).astype(np.uint8)
    best, best_t = -1.0, 0
    data = values.tolist()
    for t in range(1, 256):
        low = [v for v in data if v < t]
        high = [v for v in data if v >= t]
        if not low or not high:
            continue
        between = len(low) * len(high) * (sum(low) / len(low) - sum(high) / len(high)) ** 2
        if between > best:
            best, best_t = between, t
    assert otsu_threshold(values) == best_t


def test_tissue_mask_ignores_blank_glass_and_dust():
    thumb = glass(300, 200)
    assert not tissue_mask(thumb).any()
    thumb[20:23, 30:33] = 90  # grey dust: dark but not stained
    thumb[100:180, 150:280] = [200, 120, 190]  # stained tissue
    mask = tissue_mask(thumb)
    assert mask[110:170, 160:270].all() and not mask[:90].any() and mask.sum() < 1.1 * 80 * 130


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory) -> Path:
    return generate_slides(tmp_path_factory.mktemp("wsi"), patients=2, seed=5, size=(640, 480), mpp=1.0, workers=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_synthetic_slides_carry_resolution_and_class(small_slides, backend):
    truth = load_slides(small_slides)
    for s in truth:
        with open_slide(small_slides / "slides" / f"{s.name}.tiff", backend) as slide:
            assert (slide.mpp, slide.objective_power) == (1.0, 10.0)
            assert slide.properties["aperio.Class"] == s.label
    rows = list(csv.DictReader(open(small_slides / "labels.csv")))
    assert [(r["slide"], r["label"]) for r in rows] == [(s.name, s.label) for s in truth]
    assert {r["label"] for r in rows} == {"benign", "malignant"}


def test_tissue_selection_puts_no_tile_on_glass(small_slides):
    spec = TileSpec(magnifications=(40, 100), size=(48, 32), grid=100)
    step = 2.0  # micrometres
    inside = []
    for truth in load_slides(small_slides):
        stained = truth.stained(step)  # tissue that is neither fat nor an empty lumen
        yy, xx = (np.indices(stained.shape) + 0.5) * step
        pieces = truth.tissue(xx, yy)  # the tissue pieces, fat and lumina included; the rest is glass

        def share(grid, box, truth=truth):  # share of a level-0 box that is True on a grid of step um
            r0, r1 = np.clip(np.array(box[1::2]) * truth.mpp / step, 0, grid.shape[0]).astype(int)
            c0, c1 = np.clip(np.array(box[0::2]) * truth.mpp / step, 0, grid.shape[1]).astype(int)
            return grid[r0:r1, c0:c1].sum() / ((box[2] - box[0]) * (box[3] - box[1]) * (truth.mpp / step) ** 2)

        with open_slide(small_slides / "slides" / f"{truth.name}.tiff") as slide:
            plan = plan_tiles(slide, spec)
            every_cell = plan_tiles(slide, TileSpec(magnifications=(40, 100), size=(48, 32), grid=100, min_tissue=0.0))
        assert len(plan) > 20
        for x, y in plan.locations:
            for mag in spec.magnifications:
                assert share(pieces, plan.box(mag, (x, y))) > 0.4, (truth.name, x, y, mag)
        # and the tissue is found: the grid cells whose every tile is stained tissue are kept
        kept = {(int(x), int(y)) for x, y in plan.locations}
        inside += [
            (int(x), int(y)) in kept
            for x, y in every_cell.locations
            if all(share(stained, plan.box(m, (x, y))) >= 0.9 for m in spec.magnifications)
        ]
    assert len(inside) >= 10 and np.mean(inside) >= 0.95, (len(inside), np.mean(inside))


def test_slide_without_resolution_needs_mpp(tmp_path, monkeypatch, capsys):
    path = write_pyramid(tmp_path / "bare.tiff", smooth_image(300, 200), mpp=None)
    with pytest.raises(SlideError, match=r"bare\.tiff: .*neither microns per pixel nor objective power.*--mpp"):
        open_slide(path)
    assert open_slide(path, mpp=0.25).mpp_source == "given"
    only_power = write_pyramid(tmp_path / "power.tiff", smooth_image(300, 200), mpp=None, objective=40)
    with open_slide(only_power) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.25, "objective power")
    monkeypatch.setattr(sys, "argv", ["smse", "tiles", str(path), "--out", str(tmp_path / "tiles")])
    capsys.readouterr()  # only the command's own output below
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and "--mpp" in err and err.count("\n") == 1
    assert not (tmp_path / "tiles").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_that_are_not_slides_are_refused(backend, tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    png = tmp_path / "photo.png"
    Image.fromarray(smooth_image(64, 48)).save(png)
    for path in (text, png):
        with pytest.raises(SlideError, match=f"{path.name}: not a whole-slide image {backend} can read"):
            open_slide(path, backend)
    with pytest.raises(SlideError, match="missing.tiff: slide file not found"):
        open_slide(tmp_path / "missing.tiff", backend)


def test_slide_without_tissue_gives_no_tiles_and_a_clear_error(tmp_path):
    path = write_pyramid(tmp_path / "empty.tiff", glass(800, 600), mpp=1.0, objective=10)
    with open_slide(path) as slide:
        assert len(plan_tiles(slide, TileSpec(size=(48, 32)))) == 0
    with pytest.raises(SlideError, match="no tissue found on .*empty.tiff"):
        write_tiles([path], tmp_path / "tiles", TileSpec(size=(48, 32)), progress=False)
    assert not (tmp_path / "tiles" / "manifest.csv").exists()


def test_labels_must_cover_every_slide_and_ids_be_unique(small_slides, tmp_path):
    slides = sorted((small_slides / "slides").glob("*.tiff"))
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide,label\n{slides[0].stem},benign\n")
    with pytest.raises(DataError, match=f"no row for slide.*{slides[1].name}"):
        write_tiles(slides, tmp_path / "t", labels=labels, progress=False)
    other = tmp_path / "other" / slides[0].name
    other.parent.mkdir()
    other.write_bytes(slides[0].read_bytes())
    with pytest.raises(DataError, match="two slides have the id"):
        write_tiles([slides[0], other], tmp_path / "t", progress=False)


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    """Eight slides (tubular adenoma vs mucinous carcinoma), tiled, and a tiny model trained on the manifest."""
    base = tmp_path_factory.mktemp("slide-run")
    root = generate_slides(
        base / "wsi", patients=8, seed=2, size=(800, 600), mpp=2.0, proportions="TA=1,MC=1", workers=1
    )
    spec = TileSpec(magnifications=(40, 100), size=(48, 32), grid=100, max_locations=25)
    result = write_tiles(
        sorted((root / "slides").glob("*.tiff")), base / "tiles", spec, labels=root / "labels.csv", progress=False
    )
    cfg = tiny_config(
        result.manifest, base / "run", "train.epochs=30", "model.views=1", f"data.cache_dir={base / 'cache'}"
    )
    return root, result, train(cfg, progress=False)


@pytest.mark.slow
def test_manifest_is_read_as_it_is_and_splits_keep_slides_whole(slide_run):
    root, result, run = slide_run
    header = result.manifest.read_text().splitlines()[0]
    assert header.startswith("path,label,patient,magnification,slide,x,y")
    records, skipped = read_manifest(result.manifest)
    assert not skipped and len(records) == result.tiles == 8 * 25 * 2
    assert {r.magnification for r in records} == {40, 100}
    labels = {r["slide"]: r["label"] for r in csv.DictReader(open(root / "labels.csv"))}
    assert {(r.patient, r.label) for r in records} == set(labels.items())
    splits: dict[str, set] = {}
    for row in csv.DictReader(open(run / "split.csv")):
        splits.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values()) and {"train", "test"} <= set().union(*splits.values())
    tiling = json.loads((result.manifest.parent / "tiles.json").read_text())["tiling"]
    assert tiling["magnifications"] == [40, 100] and tiling["size"] == [48, 32]


@pytest.mark.slow
def test_model_trained_on_slide_tiles_learns(slide_run):
    _, _, run = slide_run
    held = [r for r in csv.DictReader(open(run / "split.csv")) if r["split"] != "train"]
    assert len({r["patient"] for r in held}) >= 3 and {r["label"] for r in held} == {"benign", "malignant"}
    predicted = load_model(run).predict([r["path"] for r in held])
    accuracy = np.mean([p == r["label"] for p, r in zip(predicted, held)])
    assert accuracy >= 0.75, f"{accuracy:.2f} on {len(held)} tiles of held-out slides (chance 0.5)"


@pytest.mark.slow
def test_synthetic_slides_to_tiles_to_training_to_slide_heat_map(tmp_path):
    """The README's whole-slide walk-through, on tiny slides and a tiny model."""
    invoke(
        "synth", "--wsi", "--out", tmp_path / "wsi", "--patients", 4, "--size", "480x360", "--mpp", 2, "--workers", 1
    )
    slides = sorted((tmp_path / "wsi" / "slides").glob("*.tiff"))
    output = invoke(
        "tiles",
        *slides,
        "--labels",
        tmp_path / "wsi" / "labels.csv",
        "--out",
        tmp_path / "tiles",
        "--tile",
        "48x32",
        "--magnifications",
        "40X,100X",
        "--grid",
        "100X",
        "--max-tiles",
        12,
    )
    assert "from metadata" in output and "manifest.csv" in output
    invoke(
        "train",
        "--no-evaluate",
        f"data.root={tmp_path / 'tiles' / 'manifest.csv'}",
        f"out={tmp_path / 'run'}",
        "data.image_size=[32, 48]",
        "model.backbone=paper-cnn",
        "model.pretrained=false",
        "model.embedding_dim=16",
        "model.views=1",
        "train.epochs=2",
        "sampler.batch_size=16",
        "train.device=cpu",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    output = invoke("predict-slide", tmp_path / "run", slides[0], "--out", tmp_path / "pred")
    assert "mean P(malignant)" in output
    score = json.loads((tmp_path / "pred" / "score.json").read_text())
    assert score["tiling"]["size"] == [48, 32] and score["tiling"]["magnifications"] == [40, 100]
    assert 0 <= score["mean_probability"] <= 1 and 0 <= score["share_above_threshold"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "pred" / "tiles.csv")))
    assert len(rows) == score["tiles"] == 2 * score["locations"] > 0
    assert float(rows[0]["p_benign"]) + float(rows[0]["p_malignant"]) == pytest.approx(1, abs=1e-5)
    with Image.open(tmp_path / "pred" / "heatmap.png") as heat:
        assert heat.width > 800 and heat.height > 300
    page = (tmp_path / "pred" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 1 + 2 * min(6, score["locations"]) and "Slide score" in page


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiles_finer_than_the_scan_are_announced(backend, tmp_path, caplog):
    image = smooth_image(600, 420)
    path = write_pyramid(tmp_path / "s.tiff", image, mpp=0.5, objective=20)  # a 20x scan: 400X needs 0.25 um/px
    with open_slide(path, backend) as slide, caplog.at_level("WARNING", logger="smse.wsi.tiles"):
        plan_tiles(slide, TileSpec(size=(64, 48), magnifications=(100, 400), min_tissue=0.0))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "400X tiles (0.25 um/px) are enlarged 2x" in warned[0], warned


def test_a_tiling_too_thin_to_train_on_says_what_to_change():
    from pathlib import Path

    from smse.wsi.export import TilingResult, advice

    def slide(name, locations, label):
        return {"slide": name, "locations": locations, "dimensions": [4000, 3000], "mpp": 0.5, "labels": [label]}

    thin = TilingResult(Path("m.csv"), 3, [slide("a", 1, "benign"), slide("b", 0, "benign"), slide("c", 2, "benign")])
    said = advice(thin, TileSpec())
    assert len(said) == 2
    assert said[0].startswith(
        "1 of 3 slides gave no tiles and 2 fewer than 4 locations: a 40X grid cell of 700x460 px "
        "covers 1750x1150 um, and the smallest of these slides is 2000x1500 um"
    )
    assert (
        "--tile 192x128" in said[0]
        and said[1] == "every tile is 'benign': smse train needs tiles of at least two classes"
    )
    fine = TilingResult(Path("m.csv"), 40, [slide("a", 20, "benign"), slide("b", 20, "malignant")])
    assert advice(fine, TileSpec()) == []
    assert advice(TilingResult(Path("m.csv"), 40, [slide("a", 20, "unlabelled")]), TileSpec()) == []
