"""Same-spot positives: the spots of tiles, their overlap rule, the sampler, InfoNCE, and localisation."""

import json

import numpy as np
import pytest
import torch

from smse.data.manifest import read_manifest
from smse.data.records import Record
from smse.data.samplers import SpotSampler
from smse.errors import ConfigError, DataError
from smse.losses.metric import InfoNCELoss
from smse.spots import Spots, check_positives, localisation
from smse.wsi import TileSpec


def tile(slide, x, y, mag, label="unlabelled"):
    return Record(f"/t/{slide}_{x}_{y}_{mag}.png", label, label, slide, mag, slide=slide, x=x, y=y)


def grid_records(slides=("s1", "s2"), step=100, cells=4, mags=(100, 400)):
    return [tile(s, step * i, step * j, m) for s in slides for i in range(cells) for j in range(cells) for m in mags]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_localisation_matches_a_plain_loop(dtype):
    """Catches: ranks counted over the wrong candidates (another slide in the slide scope, the query's own
    magnification), an off-by-one rank, or chance computed over all tiles."""
    records = grid_records(cells=3)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(records), 4)).astype(dtype)
    slides, xs, ys = [r.slide for r in records], [r.x for r in records], [r.y for r in records]
    mags = [r.magnification for r in records]
    got = localisation(emb, slides, xs, ys, mags)
    for scope in ("slide", "all"):
        ranks, chance1 = [], []
        for q, rq in enumerate(records):
            if rq.magnification != 100:
                continue
            cands = [
                c
                for c, rc in enumerate(records)
                if rc.magnification == 400 and (scope == "all" or rc.slide == rq.slide)
            ]
            own = next(c for c in cands if records[c].spot == rq.spot)
            d = {c: float(((emb[q].astype(np.float64) - emb[c]) ** 2).sum()) for c in cands}
            ranks.append(1 + sum(1 for c in cands if d[c] < d[own] - 1e-9))
            chance1.append(1 / len(cands))
        pair = got["pairs"]["100X->400X"][scope]
        assert pair["queries"] == len(ranks)
        assert pair["top_1"] == pytest.approx(np.mean(np.array(ranks) <= 1))
        assert pair["top_5"] == pytest.approx(np.mean(np.array(ranks) <= 5))
        assert pair["median_rank"] == pytest.approx(np.median(ranks))
        assert pair["chance_top_1"] == pytest.approx(np.mean(chance1))
    perfect = localisation(np.array([[r.x, r.y] for r in records], dtype=dtype), slides, xs, ys, mags)
    assert perfect["pooled"]["slide"]["top_1"] == 1.0  # an embedding that is the location finds every spot


def test_spots_sharing_their_highest_magnification_tissue_are_neither_positive_nor_negative():
    """Catches: a spot whose 400X tile overlaps the anchor's (the same cells) mined as a negative, or a spot
    one 400X field away (overlapping only at 100X) left out of the negatives that localisation needs."""
    records = grid_records(slides=("s1", "s2"), step=100, cells=6, mags=(100, 400))
    dense = Spots.of(records, grid=800)  # cells of an 800X field: the 400X tile spans 2 cells
    idx = np.arange(len(records))
    ignore = dense.ignore(idx).numpy()
    for i in range(0, len(records), 7):
        for j in range(len(records)):
            a, b = records[i], records[j]
            expected = a.slide == b.slide and a.spot != b.spot and abs(a.x - b.x) < 200 and abs(a.y - b.y) < 200
            assert ignore[i, j] == expected, (a, b)
    assert ignore.any()
    # on a grid of the highest magnification's own field, neighbouring 400X tiles touch: every other spot is a negative
    assert not Spots.of(records, grid=400).ignore(idx).numpy().any()


def test_the_spot_sampler_keeps_every_spot_whole_and_is_deterministic():
    """Catches: batches that split a spot's tiles (no positive for the anchor) or change on resume."""
    records = grid_records(cells=3, mags=(100, 200, 400))
    spots = Spots.of(records)
    sampler = SpotSampler(spots.spot, batch_size=12, seed=3)
    batches = [b.indices for b in sampler.epoch(0)]
    assert all(len(b) == 12 for b in batches) and len(batches) == len(sampler)
    for b in batches:
        ids, counts = np.unique(spots.spot[b], return_counts=True)
        assert (counts == 3).all(), "every spot enters with its three magnifications"
    assert all((a == b).all() for a, b in zip(batches, [b.indices for b in sampler.epoch(0)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infonce_matches_a_loop_and_pytorch_metric_learning(dtype):
    """Catches: negatives of other anchors in the denominator, the positive left out of it, or a missing
    temperature; the same figure as PML's NTXentLoss on the same pairs."""
    torch.manual_seed(0)
    emb = torch.randn(10, 5, dtype=dtype)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    m = torch.tensor([1, 2, 1, 2, 1, 2, 2, 1, 1, 2])
    ours = InfoNCELoss(temperature=0.2)(emb, y, m)
    unit = torch.nn.functional.normalize(emb, dim=1)
    s = unit @ unit.T / 0.2
    terms = []
    for i in range(10):
        for j in range(10):
            if i != j and y[i] == y[j] and m[i] != m[j]:
                negatives = sum(torch.exp(s[i, k]) for k in range(10) if y[k] != y[i])
                terms.append(-torch.log(torch.exp(s[i, j]) / (torch.exp(s[i, j]) + negatives)))
    assert ours.dtype == dtype
    assert torch.allclose(ours, torch.stack(terms).mean(), rtol=1e-5)
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    pos = [(i, j) for i in range(10) for j in range(10) if i != j and y[i] == y[j] and m[i] != m[j]]
    neg = [(i, k) for i in range(10) for k in range(10) if y[i] != y[k]]
    tuples = tuple(torch.tensor(c) for c in (*zip(*pos), *zip(*neg)))
    assert torch.allclose(ours, pml.NTXentLoss(temperature=0.2)(emb, y, indices_tuple=tuples), rtol=1e-5)


def test_bad_same_spot_input_is_named(tmp_path):
    """Catches: same-spot positives on images without locations, class positives on unlabelled tiles, a
    manifest row with half a location: each must be a clear error naming the field."""
    with pytest.raises(DataError, match=r"sampler.positives: same-spot positives need every image's slide,x,y"):
        Spots.of([Record("/a.png", "b", "b", "p", 100)] + grid_records())
    with pytest.raises(DataError, match="every one of the 16 spots has a single tile"):
        Spots.of(grid_records(cells=4, mags=(100,))[:16])
    with pytest.raises(ConfigError, match="sampler.positives: 'class' needs labels"):
        check_positives(grid_records(), "class", labelled=False)
    from tests.conftest import write_png

    write_png(tmp_path / "a.png", 0)
    (tmp_path / "m.csv").write_text("path,label,patient,slide,x,y\na.png,unlabelled,p,s1,10,\n")
    with pytest.raises(DataError, match=r"m.csv:2: a tile's location needs slide, x and y; y empty"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("path,label,patient,slide,x,y\na.png,unlabelled,p,s1,10,20\n")
    (record,), _ = read_manifest(tmp_path / "m.csv")
    assert (record.slide, record.x, record.y, record.spot) == ("s1", 10.0, 20.0, "s1@10,20")


@pytest.fixture(scope="module")
def unlabelled_tiles(tmp_path_factory):
    """Three small synthetic slides cut into 32 x 32 tiles at 100X and 400X, without labels."""
    from smse.synth.wsi import generate_slides
    from smse.wsi import write_tiles

    root = tmp_path_factory.mktemp("spots")
    generate_slides(root, patients=4, seed=0, size=(1200, 900), workers=1)
    slides = sorted((root / "slides").iterdir())
    write_tiles(slides, root / "tiles", TileSpec(magnifications=(100, 400), size=(32, 32), grid=400), progress=False)
    return root / "tiles" / "manifest.csv"


def tiny_tile_config(manifest, out, *overrides):
    from smse.config import load_config

    return load_config(
        None,
        [
            f"data.root={manifest}",
            f"out={out}",
            "data.image_size=[32, 32]",
            "model.backbone=paper-cnn",
            "model.pretrained=false",
            "model.embedding_dim=32",
            "model.views=1",
            "sampler.batch_size=64",
            "train.device=cpu",
            "data.split.test_fraction=0.34",
            "data.split.val_fraction=0",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_labelled_tiles_train_with_both_positives_and_report_localisation(unlabelled_tiles, tmp_path):
    """Catches: the same-spot term missing under ``both``, or a labelled run whose tiles carry slide,x,y without
    localisation in its metrics, results table and report."""
    from smse.pipeline import run_pipeline
    from smse.runfiles import RunFiles
    from smse.wsi import write_tiles

    root = unlabelled_tiles.parents[1]
    spec = TileSpec(magnifications=(100, 400), size=(32, 32), grid=400, max_locations=60)
    write_tiles(sorted((root / "slides").iterdir()), tmp_path / "t", spec, labels=root / "labels.csv", progress=False)
    cfg = tiny_tile_config(
        tmp_path / "t" / "manifest.csv", tmp_path / "run", "sampler.positives=both", "train.epochs=2"
    )
    run, metrics = run_pipeline(cfg, progress=False)
    last = RunFiles(run).read_history()[-1]
    assert last["loss_same_spot"] > 0 and last["loss_metric"] >= 0 and last["loss_classification"] > 0
    assert metrics["localisation"]["embedding"]["pooled"]["slide"]["queries"] > 0
    assert "own slide" in RunFiles(run).results.read_text()
    assert 'id="localisation"' in RunFiles(run).report.read_text()


@pytest.mark.slow
def test_label_free_same_spot_training_finds_its_own_spot(unlabelled_tiles, tmp_path):
    """Catches: same-spot positives that do not reach the loss (spot ids unused, a sampler that splits spots),
    a label-free run refused for its single class, or an evaluation that crashes without classes.

    On the held-out slide, a tile at 100X must rank its own spot's 400X tile far above chance and far above
    where the frozen features (a random CNN's) rank it."""
    from smse.config import load_config
    from smse.pipeline import run_pipeline
    from smse.runfiles import RunFiles

    cfg = load_config(
        None,
        [
            f"data.root={unlabelled_tiles}",
            f"out={tmp_path / 'run'}",
            "data.image_size=[32, 32]",
            "model.backbone=paper-cnn",
            "model.pretrained=false",
            "model.embedding_dim=32",
            "model.views=1",
            "train.epochs=10",
            "sampler.batch_size=64",
            "train.device=cpu",
            "sampler.positives=same-spot",
            "data.split.test_fraction=0.34",
            "data.split.val_fraction=0",
            "loss.structure_weight=0",
        ],
    )
    from smse.spots import grid_magnification

    assert grid_magnification(unlabelled_tiles) == 400  # the grid that `smse tiles` wrote in tiles.json
    run, metrics = run_pipeline(cfg, progress=False)
    assert metrics["label_free"] and metrics["classes"] == ["unlabelled"]
    ours, frozen = (
        metrics["localisation"]["embedding"]["pooled"]["slide"],
        metrics["localisation"]["frozen_features"]["pooled"]["slide"],
    )
    assert ours["queries"] > 100
    assert ours["top_1"] > 8 * ours["chance_top_1"]
    assert ours["median_rank"] < frozen["median_rank"] / 2 and ours["top_5"] > frozen["top_5"]
    files = RunFiles(run)
    assert "own slide" in files.results.read_text() and files.report.exists()
    # spot positives zoom by default, and the baseline the table compares with is said to share the zooms
    assert "averaged over the model's centre zooms 1, 2, 4" in files.results.read_text()
    assert "averaged over the model's centre zooms 1, 2, 4" in files.report.read_text()
    assert json.loads(files.metrics.read_text())["zooms"] == [1, 2, 4]
    from smse.predict import predict

    tile = next(unlabelled_tiles.parent.rglob("*_100X.jpg"))
    (row,) = predict(run, [tile], out_csv=tmp_path / "p.csv")
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert "predicted" not in header and not any(c.startswith("p_") for c in header) and "nn1_path" in header
    assert "predicted" not in row
    assert "same_spot" in files.read_history()[-1] or "loss_same_spot" in files.read_history()[-1]


def test_class_positives_on_unlabelled_tiles_are_refused_before_any_work(unlabelled_tiles, tmp_path):
    """Catches: the refusal coming after the features were computed and the run folder written."""
    from smse.engine import train

    for overrides in (["sampler.positives=class"], ["sampler.positives=same-spot", "loss.metric=none"]):
        with pytest.raises(ConfigError, match=r"sampler.positives: 'class' needs labels|loss.metric: unlabelled"):
            train(tiny_tile_config(unlabelled_tiles, tmp_path / "run", *overrides), progress=False)
        assert not (tmp_path / "run").exists()
