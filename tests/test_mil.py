"""Slide-level learning: attention pooling against plain loops, bags, folds, metrics, the command and its refusals."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from smse.errors import CheckpointError, ConfigError, DataError
from smse.mil.bags import bag_of, bags_from_embeddings, collate, match_labels
from smse.mil.models import POOLS, GatedAttention, SlideModel, masked_softmax
from smse.mil.train import fit, patient_folds, predict_bags, slide_config, slide_metrics
from smse.wsi.export import SlideLabel

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_attention_equals_a_plain_loop(dtype):
    torch.manual_seed(0)
    att = GatedAttention(5, 4).to(dtype)
    h = torch.randn(2, 6, 5, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        got = att(h, mask)
    V, U, w = att.V, att.U, att.w
    for b in range(2):
        scores = []
        for k in range(6):
            if not mask[b, k]:
                scores.append(None)
                continue
            x = h[b, k].tolist()
            vw, vb, uw, ub = V.weight.tolist(), V.bias.tolist(), U.weight.tolist(), U.bias.tolist()
            v = [math.tanh(vb[j] + sum(vw[j][i] * x[i] for i in range(5))) for j in range(4)]
            u = [1 / (1 + math.exp(-(ub[j] + sum(uw[j][i] * x[i] for i in range(5))))) for j in range(4)]
            ww, wb = w.weight.tolist()[0], w.bias.tolist()[0]
            scores.append(wb + sum(ww[j] * v[j] * u[j] for j in range(4)))
        top = max(s for s in scores if s is not None)
        total = sum(math.exp(s - top) for s in scores if s is not None)
        for k, s in enumerate(scores):
            expected = 0.0 if s is None else math.exp(s - top) / total
            assert float(got[b, k]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_masked_softmax_gives_nothing_to_padding_and_to_an_empty_row():
    w = masked_softmax(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), torch.tensor([[1, 0, 1], [0, 0, 0]]).bool())
    assert w[0, 1] == 0 and float(w[0].sum()) == pytest.approx(1.0)
    assert torch.equal(w[1], torch.zeros(3))


def _bag(rng, spots, mags=2, dim=6, missing=0, name="s"):
    xs = np.repeat(np.arange(spots, dtype=float) * 10, mags)
    ys = np.zeros_like(xs)
    magnifications = np.tile([100, 200, 400][:mags], spots)
    keep = np.ones(len(xs), bool)
    keep[:missing] = False  # the first spots lack a magnification
    keep[::mags] |= True
    emb = rng.normal(size=(len(xs), dim)).astype(np.float32)
    return bag_of(name, emb[keep], xs[keep], ys[keep], magnifications[keep], [100, 200, 400][:mags])


@pytest.mark.parametrize("pool", POOLS)
def test_every_pool_weighs_real_tiles_only_and_ignores_padding(pool):
    rng = np.random.default_rng(0)
    small, large = _bag(rng, 3, missing=2), _bag(rng, 7)
    torch.manual_seed(0)
    model = SlideModel(6, 2, pool).eval()
    with torch.no_grad():
        alone_logits, alone_att = model(*collate([small]))
        logits, att = model(*collate([small, large]))
    assert torch.allclose(logits[0], alone_logits[0], atol=1e-6)
    assert torch.allclose(att[0, :3], alone_att[0], atol=1e-6)
    assert float(att[0, 3:].abs().sum()) == 0.0  # padding spots
    assert float(att[0, :3][~torch.from_numpy(small.mask)].abs().sum()) == 0.0  # magnifications a spot lacks
    for b in range(2):
        assert float(att[b].sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multimag_weights_are_the_spot_weight_times_the_share_within_the_spot(dtype):
    rng = np.random.default_rng(1)
    bag = _bag(rng, 4, mags=3)
    torch.manual_seed(0)
    model = SlideModel(6, 2, "multimag").to(dtype).eval()
    x, mask = collate([bag])
    x = x.to(dtype)
    logits, att = model(x, mask)
    h = model.project(x)[0]
    spot_vectors, within = [], []
    for s in range(4):
        w = model.spot_attention(h[s][None], mask[0, s][None])[0]
        within.append(w)
        spot_vectors.append(sum(w[m] * h[s, m] for m in range(3)))
    spots = torch.stack(spot_vectors)
    a = model.attention(spots[None], torch.ones(1, 4, dtype=torch.bool))[0]
    z = sum(a[s] * spots[s] for s in range(4))
    assert torch.allclose(logits[0], model.classifier(z), atol=1e-6)
    for s in range(4):
        for m in range(3):
            assert float(att[0, s, m]) == pytest.approx(float(a[s] * within[s][m]), abs=1e-7)


def test_bags_group_tiles_by_centre_and_order_magnifications():
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    bag = bag_of("s", emb, np.array([5, 5, 1, 1, 9.0]), np.zeros(5), np.array([400, 100, 100, 400, 100]), [100, 400])
    assert bag.centres.tolist() == [[1, 0], [5, 0], [9, 0]]
    assert bag.mask.tolist() == [[True, True], [True, True], [True, False]]
    assert bag.features[1, 1].tolist() == [0, 1] and bag.features[1, 0].tolist() == [2, 3]
    assert bag.tiles == 5


def test_labels_missing_unknown_and_with_suffix_are_named():
    labels = {"a.svs": SlideLabel("benign", "p1"), "b": SlideLabel("malignant", "p2")}
    assert match_labels(["a", "b"], labels, "L")["a"].label == "benign"
    with pytest.raises(DataError, match="no label for 1 tiled slide.*: c"):
        match_labels(["a", "b", "c"], labels, "L")
    with pytest.raises(DataError, match="have no tiles in the manifest: b"):
        match_labels(["a"], labels, "L")


def test_tiles_without_slide_columns_are_refused():
    arrays = {"embeddings": np.zeros((2, 3)), "magnifications": np.array([100, 100])}
    with pytest.raises(DataError, match="slide,x,y"):
        bags_from_embeddings(arrays, None, None)


def _bags(n, rng):
    return [_bag(rng, 3, name=f"s{i}") for i in range(n)]


def test_folds_keep_patients_whole_and_refuse_one_class():
    rng = np.random.default_rng(0)
    bags = _bags(12, rng)
    for i, b in enumerate(bags):
        b.patient = f"p{i // 2}"  # two slides a patient
    targets = np.array([(i // 2) % 2 for i in range(12)])
    folds = patient_folds(bags, targets, 3, 0)
    for p in {b.patient for b in bags}:
        assert len({int(f) for b, f in zip(bags, folds) if b.patient == p}) == 1
    assert sorted(set(folds.tolist())) == [0, 1, 2]
    with pytest.raises(DataError, match="same label"):
        patient_folds(bags, np.zeros(12, int), 3, 0)
    with pytest.raises(DataError, match="one patient"):
        patient_folds(bags, np.array([1, 1] + [0] * 10), 3, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slide_metrics_equal_plain_loops(dtype):
    rng = np.random.default_rng(3)
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    p1 = rng.uniform(size=10).astype(dtype)
    probs = np.stack([1 - p1, p1], 1)
    patients = [f"p{i}" for i in range(10)]
    m = slide_metrics(y, probs, patients, positive=1)
    pred = [1 if p1[i] > 1 - p1[i] else 0 for i in range(10)]
    assert m["accuracy"] == pytest.approx(sum(a == b for a, b in zip(pred, y)) / 10)
    recalls = [
        sum(1 for i in range(10) if y[i] == c and pred[i] == c) / sum(1 for i in range(10) if y[i] == c) for c in (0, 1)
    ]
    assert m["balanced_accuracy"] == pytest.approx(sum(recalls) / 2)
    pos, neg = [p1[i] for i in range(10) if y[i] == 1], [p1[i] for i in range(10) if y[i] == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    assert m["roc_auc"] == pytest.approx(wins / (len(pos) * len(neg)))
    assert m["slides"] == 10 and m["patients"] == 10 and m["correct"] == sum(a == b for a, b in zip(pred, y))
    for key in ("accuracy", "balanced_accuracy", "roc_auc"):
        low, high = m["intervals"][key]
        assert low <= m[key] <= high


def test_bad_settings_are_named():
    assert slide_config(["pool=multimag", "mil.epochs=3"]).epochs == 3
    with pytest.raises(ConfigError, match="mil.pool"):
        slide_config(["pool=sum"])
    with pytest.raises(ConfigError, match="mil.epochs"):
        slide_config(["epochs=0"])
    with pytest.raises(ConfigError, match="mil.nonsense"):
        slide_config(["nonsense=1"])


def _instances(rng, n_slides, fraction, dim=8, tiles=60):
    """Bags of Gaussian tile embeddings; in malignant bags a ``fraction`` of tiles is shifted (the tumour); every
    bag has a slide-wide offset (its stain) that moves the tile classifier's probabilities of all its tiles."""
    bags, targets, truth, tile_prob = [], [], [], []
    for i in range(n_slides):
        y = i % 2
        emb = rng.normal(size=(tiles, dim)).astype(np.float32)
        tumour = np.zeros(tiles, bool)
        if y:
            tumour[: max(1, int(round(fraction * tiles)))] = True
            emb[tumour, 0] += 4.0
        offset = rng.normal(0, 1.0)
        emb[:, 1] += offset
        # a tile classifier taught by slide labels: it sees the tumour direction and, wrongly, the stain
        prob = 1 / (1 + np.exp(-(0.8 * emb[:, 0] + 1.0 * emb[:, 1] - 1.0)))
        xs = np.arange(tiles, dtype=float)
        bag = bag_of(f"s{i}", emb, xs, np.zeros(tiles), np.full(tiles, 100), [100], prob, label=str(y))
        bags.append(bag)
        targets.append(y)
        truth.append(tumour)
        tile_prob.append(prob)
    return bags, np.array(targets), truth


def test_attention_finds_small_tumours_that_the_mean_of_tile_probabilities_misses():
    """Malignant bags with 5% tumour tiles and a slide-wide stain offset: the mean rule is swamped by the stain,
    gated attention learns to look at the tumour tiles (out-of-fold, two folds)."""
    from smse.metrics import roc_auc
    from smse.mil.train import rule_scores

    rng = np.random.default_rng(0)
    bags, y, truth = _instances(rng, 80, 0.05)
    cfg = slide_config(["epochs=60", "lr=0.003", "batch_slides=8", "dropout=0"])
    half = np.arange(80) % 4 < 2
    scores, att_aucs = np.zeros(80), []
    for train, test in ((half, ~half), (~half, half)):
        model = fit([b for b, t in zip(bags, train) if t], y[train], 2, cfg, seed=0)
        probs, atts = predict_bags(model, [b for b, t in zip(bags, test) if t])
        scores[test] = probs[:, 1]
        for a, tumour, target in zip(atts, [t for t, s in zip(truth, test) if s], y[test]):
            if target:
                att_aucs.append(roc_auc(tumour, a[:, 0]))
    mean_rule = roc_auc(y, rule_scores(bags, "mean-probability"))
    attention = roc_auc(y, scores)
    assert attention >= 0.9, attention
    assert attention > mean_rule + 0.1, (attention, mean_rule)
    assert np.mean(att_aucs) > 0.9, np.mean(att_aucs)  # the attention map overlaps the true tumour


# ---- the command on slides: tiny synthetic slides, tiny tile run ----


@pytest.fixture(scope="module")
def slide_data(tmp_path_factory):
    """Eight tiny synthetic slides with tumour regions, 32 x 32 tiles at 40X and 100X, and a seconds-fast tile run."""
    from smse.pipeline import run_pipeline
    from smse.synth.wsi import generate_slides
    from smse.wsi import TileSpec, write_tiles
    from tests.test_spots import tiny_tile_config

    root = tmp_path_factory.mktemp("mil")
    generate_slides(root, patients=8, seed=0, size=(600, 450), mpp=2.0, tumour_fraction=(0.2, 0.4), workers=1)
    slides = sorted((root / "slides").iterdir())
    spec = TileSpec(magnifications=(40, 100), size=(32, 32), grid=100, max_locations=30)
    write_tiles(slides, root / "tiles", spec, labels=root / "labels.csv", progress=False)
    manifest = root / "tiles" / "manifest.csv"
    run = root / "run"
    run_pipeline(tiny_tile_config(manifest, run, "train.epochs=2"), report=False, progress=False)
    return root, manifest, run, slides


@pytest.mark.slow
def test_train_slides_writes_a_slide_run_and_predict_slide_uses_it(slide_data, tmp_path):
    from smse.runfiles import SlideRunFiles
    from smse.wsi.slide_predict import predict_slide
    from tests.conftest import invoke

    root, manifest, run, slides = slide_data
    out = tmp_path / "slides"
    text = invoke("train-slides", run, manifest, "--labels", root / "labels.csv", "--out", out, "epochs=5", "folds=2")
    files = SlideRunFiles(out)
    metrics = json.loads(files.metrics.read_text())
    assert metrics["slides"] == 8 and metrics["folds"] == 2
    assert set(metrics["methods"]) == {"attention", "multimag", "mean", "max", "mean-probability", "max-probability"}
    for r in metrics["methods"].values():
        assert r["slides"] == 8 and 0 <= r["roc_auc"] <= 1 and len(r["intervals"]["accuracy"]) == 2
    assert "attention" in text and "(" in text and "/8)" in text  # counts beside every accuracy
    for path in (files.model, files.predictions, files.attention, files.split, files.report, files.history):
        assert path.is_file(), path
    with open(files.attention, newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_slide: dict[str, float] = {}
    for r in rows:
        per_slide[r["slide"]] = per_slide.get(r["slide"], 0.0) + float(r["attention"])
    assert len(per_slide) == 8 and all(v == pytest.approx(1.0, abs=1e-4) for v in per_slide.values())
    html = files.report.read_text()
    assert "mean-probability" in html and "of 8" in html and "[" in html

    result = predict_slide(run, slides[1], tmp_path / "pred", slide_model=out, progress=False)
    bag = result["slide_model"]
    assert bag["predicted"] in ("benign", "malignant") and 0 <= bag["probability"] <= 1
    trust = bag["cross_validated"]  # how far to trust it: its own out-of-fold figures, shown beside it
    assert trust["slides"] == 8 and trust["roc_auc"] == metrics["methods"]["attention"]["roc_auc"]
    assert SlideRunFiles(files.model).root == out  # the model file given for its folder
    assert (tmp_path / "pred" / "attention.png").is_file()
    with open(tmp_path / "pred" / "tiles.csv", newline="") as handle:
        tiles = list(csv.DictReader(handle))
    assert sum(float(t["attention"]) for t in tiles) == pytest.approx(1.0, abs=1e-4)
    assert "Where the slide model looked" in (tmp_path / "pred" / "report.html").read_text()


@pytest.mark.slow
def test_a_slide_model_refuses_tiles_of_another_tile_model(slide_data, tmp_path):
    from smse.mil.train import train_slides
    from smse.pipeline import run_pipeline
    from smse.wsi.slide_predict import predict_slide
    from tests.test_spots import tiny_tile_config

    root, manifest, run, slides = slide_data
    train_slides(run, manifest, root / "labels.csv", tmp_path / "s", ["epochs=2", "folds=2"], show_progress=False)
    embedded = (tmp_path / "s" / "embeddings.npz").stat().st_mtime_ns
    train_slides(run, manifest, root / "labels.csv", tmp_path / "s", ["epochs=1", "folds=2"], show_progress=False)
    assert (tmp_path / "s" / "embeddings.npz").stat().st_mtime_ns == embedded  # same run and tiles: reused
    other = tmp_path / "other-run"
    run_pipeline(tiny_tile_config(manifest, other, "train.epochs=1", "seed=5"), report=False, progress=False)
    with pytest.raises(CheckpointError, match="another tile model"):
        predict_slide(other, slides[0], tmp_path / "p", slide_model=tmp_path / "s", progress=False)
    with pytest.raises(ConfigError, match="the slide model learnt from 40X, 100X tiles, not 400X"):
        predict_slide(
            run,
            slides[0],
            tmp_path / "p4",
            overrides={"magnifications": (100, 400)},
            slide_model=tmp_path / "s",
            progress=False,
        )
    assert not (tmp_path / "p").exists() and not (tmp_path / "p4").exists()  # nothing made before the refusal


@pytest.mark.slow
def test_labels_that_do_not_match_the_tiles_exit_2_naming_the_slides(slide_data, tmp_path):
    from tests.test_reliability import one_line_error, smse

    root, manifest, run, _ = slide_data
    with open(root / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    short = tmp_path / "short.csv"
    with open(short, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[1:])
    proc = smse("train-slides", run, manifest, "--labels", short, "--out", tmp_path / "o1")
    one_line_error(proc, "no label for 1 tiled slide", rows[0]["slide"])
    extra = tmp_path / "extra.csv"
    with open(extra, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*rows, {**rows[0], "slide": "14-99999"}])
    proc = smse("train-slides", run, manifest, "--labels", extra, "--out", tmp_path / "o2")
    one_line_error(proc, "14-99999", "no tiles")
    proc = smse("train-slides", run, manifest, "--labels", root / "labels.csv", "--out", tmp_path / "o3", "pool=sum")
    one_line_error(proc, "mil.pool")


@pytest.mark.slow
def test_labels_in_two_cases_a_one_patient_class_and_a_tile_run_as_out_are_refused_first(slide_data, tmp_path):
    """Catches: labels 'malignant' / 'Malignant' taken as two classes, a class of one patient found only after
    minutes of embedding, and a slide run written over a tile run (its split, report and metrics lost)."""
    from smse.errors import OutputError
    from smse.mil.train import train_slides

    root, manifest, run, _ = slide_data
    with open(root / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    def labels(name, change):
        path = tmp_path / name
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(change([dict(r) for r in rows]))
        return path

    def recase(rs):
        first = next(r for r in rs if r["label"] == "malignant")
        first["label"] = "Malignant"
        return rs

    with pytest.raises(DataError, match="differ only in case: Malignant / malignant"):
        train_slides(run, manifest, labels("case.csv", recase), tmp_path / "o1", show_progress=False)

    def one_patient(rs):
        for r in rs:
            if r["label"] == "malignant":
                r["patient"] = "P1"
        return rs

    with pytest.raises(DataError, match="every malignant slide is of one patient"):
        train_slides(run, manifest, labels("one.csv", one_patient), tmp_path / "o2", show_progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="a tile run folder"):
        train_slides(run, manifest, root / "labels.csv", run, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_the_help_states_every_setting_with_its_default():
    """Catches: a default changed in SlideConfig and not in train-slides --help (or a setting left out)."""
    import dataclasses

    from smse.cli import SLIDE_SETTINGS_HELP
    from smse.mil.train import SlideConfig

    for f in dataclasses.fields(SlideConfig):
        assert f"{f.name}={f.default}" in SLIDE_SETTINGS_HELP, f.name
