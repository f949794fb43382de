"""The public Python API: train, load a model, embed and classify any image form, search references."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import smse
from smse.errors import CheckpointError, ConfigError, ImageError
from tests.conftest import assert_metrics_match_predictions, tiny_config


@pytest.fixture(scope="module")
def run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return smse.train(tiny_config(synth_data, out))


def test_load_config_by_name_path_and_overrides(tmp_path):
    cfg = smse.load_config("breakhis", ["data.root=/data/x", "loss.gamma=1.5"])
    assert cfg.data.root == "/data/x" and cfg.loss.gamma == 1.5 and cfg.model.backbone == "efficientnet_lite0"
    path = tmp_path / "mine.yaml"
    path.write_text("loss: {margin: 0.25}\n")
    assert smse.load_config(path).loss.margin == 0.25
    with pytest.raises(ConfigError, match="nope.yaml: config file not found .*packaged configs: .*breakhis"):
        smse.load_config("nope.yaml")


@pytest.mark.slow
def test_run_has_history_and_metrics(run):
    """The run's metrics are the accuracies of its own test predictions, recomputed here from predictions.csv.

    Catches: accuracies that are not those of the predictions written (e.g. ``image_accuracy`` counting wrong
    images as right, metrics of the k-NN vote or of another split filed as the head's, a magnification's
    metrics computed on another magnification's images); a confusion matrix with swapped rows; a
    ``predicted`` column that is not the most probable class; metrics.json not being the file ``Run`` reads.
    Planted and verified: ``patient_accuracy`` computed as the majority-vote patient diagnosis accuracy, and
    ``by_magnification`` selecting ``mags != m`` (the old test's 0 <= accuracy <= 1 passed both).
    """
    assert isinstance(run, smse.Run)
    assert [h["epoch"] for h in run.history] == [1, 2, 3] and "val_patient_accuracy" in run.history[-1]
    assert run.metrics == json.loads((run.path / "eval" / "metrics.json").read_text())
    assert_metrics_match_predictions(run.path, run.metrics)
    test_patients = {
        r.split(",")[3] for r in (run.path / "split.csv").read_text().splitlines()[1:] if r.endswith(",test")
    }
    assert run.metrics["head"]["all"]["patients"] == len(test_patients) > 0  # the test patients, every one
    assert run.checkpoint("last").name == "last.safetensors"


@pytest.mark.slow
def test_every_image_form_gives_the_same_embedding(run):
    model = smse.load_model(run)
    assert model.classes == ("benign", "malignant") and model.data_config["input_size"] == (3, 32, 48)
    test = np.load(run.path / "eval" / "test-embeddings.npz")
    paths = [str(p) for p in test["paths"][:4]]
    from_paths = model.embed(paths)
    # the frozen-feature path of training/evaluation and the image path of the API agree
    np.testing.assert_allclose(from_paths, test["embeddings"][:4], atol=1e-4)
    pil = [Image.open(p) for p in paths]
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    tensors = torch.stack(
        [
            torch.from_numpy(np.array(Image.fromarray(a).resize((48, 32), Image.BILINEAR))).permute(2, 0, 1).float()
            / 255
            for a in arrays
        ]
    )
    np.testing.assert_allclose(model.embed(pil), from_paths, atol=1e-5)
    np.testing.assert_allclose(model.embed(arrays), from_paths, atol=1e-5)
    np.testing.assert_allclose(model.embed(tensors), from_paths, atol=1e-5)
    assert model.embed(paths[0]).shape == (1, 16)
    probs = model.predict_proba(paths)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(probs, test["probabilities"][:4], atol=1e-4)
    assert model.predict(paths) == [model.classes[i] for i in probs.argmax(1)]
    with pytest.raises(ImageError, match="HxWx3 uint8"):
        model.embed(np.zeros((4, 4), np.float32))


@pytest.mark.slow
def test_reference_index_searches_training_and_validation_images(run, tmp_path):
    model = smse.load_model(run)
    index = smse.ReferenceIndex.from_run(run)
    train_paths = {
        line.split(",")[0]
        for line in (run.path / "split.csv").read_text().splitlines()[1:]
        if line.endswith((",train", ",val"))
    }
    assert len(index) == len(train_paths)
    query = sorted(train_paths)[0]
    hits = index.search(model.embed(query), k=3)
    assert hits.indices.shape == (1, 3)
    assert hits.paths[0, 0] == query and hits.distances[0, 0] == pytest.approx(0, abs=1e-4)
    assert np.all(np.diff(hits.distances[0]) >= 0)
    rows = hits.rows(0)
    assert (
        rows[0]["rank"] == 1 and rows[0]["label"] in model.classes and rows[0]["magnification"] in (40, 100, 200, 400)
    )
    # without reference.npz the index is computed from split.csv and saved; the same embeddings come back
    saved = index.embeddings.copy()
    (run.path / "reference.npz").unlink()
    rebuilt = smse.ReferenceIndex.from_run(run, model)
    assert (run.path / "reference.npz").exists()
    np.testing.assert_allclose(rebuilt.embeddings, saved, atol=1e-4)
    with pytest.raises(CheckpointError, match="no split.csv"):
        smse.ReferenceIndex.from_run(tmp_path)


@pytest.mark.slow
def test_tensors_are_scaled_or_refused_never_misread(run):
    model = smse.load_model(run)
    path = str(np.load(run.path / "eval" / "test-embeddings.npz")["paths"][0])
    array = np.asarray(Image.open(path).convert("RGB").resize((48, 32), Image.BILINEAR))
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1)
    expected = model.embed(array)
    np.testing.assert_allclose(model.embed(chw), expected, atol=1e-5)  # uint8: 0..255 scaled by 1/255
    np.testing.assert_allclose(model.embed(chw.double() / 255), expected, atol=1e-5)  # float64 in [0, 1]
    with pytest.raises(ImageError, match=r"expected values in \[0, 1\], got 0 to 255 \(divide"):
        model.embed(torch.cat([torch.zeros(3, 1, 48), torch.full((3, 31, 48), 255.0)], dim=1))
    with pytest.raises(ImageError, match="NaN or infinite"):
        model.embed(torch.full((3, 32, 48), float("nan")))
    with pytest.raises(ImageError, match="uint8 or floating-point"):
        model.embed(torch.zeros((3, 32, 48), dtype=torch.int32))


@pytest.mark.slow
def test_reference_search_refuses_bad_k_and_foreign_queries(run):
    model = smse.load_model(run)
    index = smse.ReferenceIndex.from_run(run)
    query = model.embed(str(index.metadata["paths"][0]))
    everything = index.search(query, k=len(index) + 50)
    assert everything.indices.shape == (1, len(index))  # k above the index size: every reference, nearest first
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="k: the number of nearest references must be an integer of at least 1"):
            index.search(query, k=k)
    with pytest.raises(ValueError, match=r"queries: expected \[N, 16\] embeddings .*got shape \(1, 5\)"):
        index.search(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(np.full_like(query, np.nan))


@pytest.mark.slow
def test_evaluation_and_inference_do_not_import_the_trainer():
    """Concerns stay apart: evaluating, predicting and serving need no training code."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    code = (
        "import sys, smse.evaluate, smse.predict, smse.api; "
        "print(sorted(m for m in sys.modules if m in ('smse.engine', 'smse.cv')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    light = subprocess.run(
        [sys.executable, "-c", "import sys, smse; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert light.stdout.strip() == "False"  # import smse is instant; the API loads on first use


def test_reference_index_flags_queries_outside_the_references():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 4)).astype(np.float32) * 0.1
    meta = {
        "labels": np.array(["benign", "malignant"] * 20),
        "tumor_types": np.array(["F", "DC"] * 20),
        "patients": np.array([f"p{i % 8}" for i in range(40)]),
    }
    index = smse.ReferenceIndex(emb, **meta)
    guide = index.guide()
    assert guide["ood_threshold"] is not None and guide["references"] == 40
    near, far = emb[:1] + 0.001, np.full((1, 4), 5.0, np.float32)
    hits = index.search(np.concatenate([near, far]), k=3)
    assert hits.out_of_distribution.tolist() == [False, True]
    assert hits.distances.shape == (2, 3) and hits.distances[1, 0] > guide["ood_threshold"]


def test_every_run_file_is_named_by_runfiles_only():
    """'Where is X written?' has one answer: no other module spells a run file's name."""
    import re

    src = Path(smse.__file__).parent
    names = re.compile(
        r'"(split\.csv|reference\.npz|metrics\.json|history\.json|test-embeddings\.npz|config\.yaml|'
        r'versions\.json|data\.json|run\.json|state\.pt|results\.md|(best|last)\.safetensors)"|/ "(eval|report)"'
    )
    offenders = [
        f"{p.relative_to(src)}:{i}"
        for p in src.rglob("*.py")
        if p.name != "runfiles.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if names.search(line)
    ]
    assert offenders == []
    files = smse.RunFiles("runs/x")
    assert files.metrics == Path("runs/x/eval/metrics.json") and files.checkpoint("last") == Path(
        "runs/x/last.safetensors"
    )
