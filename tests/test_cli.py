import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from smse.cli import app
from tests.conftest import assert_metrics_match_predictions, invoke

TINY = [
    "data.image_size=[32, 48]",
    "model.backbone=paper-cnn",
    "model.pretrained=false",
    "model.embedding_dim=16",
    "model.views=2",
    "train.epochs=2",
    "sampler.batch_size=16",
    "train.device=cpu",
    "data.split.val_fraction=0.25",
]


@pytest.fixture(scope="module")
def trained_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    output = invoke("train", f"data.root={synth_data}", f"out={out}", *TINY)
    assert "| SMSE (classifier head) | patient |" in output and "magnification probe" in output
    return out


@pytest.mark.slow
def test_train_then_evaluate_writes_tables(trained_run):
    """Train's and evaluate's metrics.json are the accuracies of the predictions.csv written beside them.

    Catches: accuracies that are not those of the written predictions (wrong images counted as right, the
    k-NN vote's or another checkpoint's results filed as the head's, magnification groups mixed up);
    ``evaluate --which last`` leaving the previous metrics or predictions in place; a printed table that
    does not show the metrics.json numbers. Planted and verified: ``patient_accuracy`` computed as the
    majority-vote patient diagnosis accuracy, and ``by_magnification`` selecting ``mags != m``.
    """
    metrics = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert set(metrics["head"]) == {"40X", "100X", "200X", "400X", "all"}
    assert_metrics_match_predictions(trained_run, metrics)
    assert np.array(metrics["retrieval"]["map_at_r"]).shape == (4, 4)
    assert (trained_run / "reference.npz").exists()
    (trained_run / "eval" / "predictions.csv").unlink()  # evaluate must write it again
    output = invoke("evaluate", trained_run, "--which", "last")
    again = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert again["checkpoint"] == "last"
    assert_metrics_match_predictions(trained_run, again)
    assert f"{100 * again['head']['all']['patient_accuracy']:.1f}" in output
    assert "| SMSE (k-NN, k=5) | image |" in output and "report:" in output
    assert "report.html" in invoke("report", trained_run)


@pytest.mark.slow
def test_predict_csv_with_neighbours_and_a_broken_file(trained_run, synth_data, tmp_path):
    some = sorted(synth_data.rglob("*-400-00*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(some[0].read_bytes()[:100])
    out = tmp_path / "pred.csv"
    output = invoke("predict", trained_run, *some, broken, "--out", out, "--k", 3)
    assert "1 unreadable" in output
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4
    good = [r for r in rows if not r["error"]]
    assert len(good) == 3 and all(r["predicted"] in ("benign", "malignant") for r in good)
    assert all(Path(r["nn1_path"]).exists() and r["nn3_magnification"] for r in good)
    assert float(good[0]["p_benign"]) + float(good[0]["p_malignant"]) == pytest.approx(1, abs=1e-5)
    bad = [r for r in rows if r["error"]][0]
    assert bad["path"] == str(broken) and "corrupt or truncated" in bad["error"]
    folder = invoke("predict", trained_run, some[0].parent, "--out", tmp_path / "folder.csv")
    assert "wrote" in folder
    invoke("predict", trained_run, some[0], "--out", tmp_path / "all.csv", "--k", 10_000)
    header = next(csv.reader(open(tmp_path / "all.csv")))
    references = len(np.load(trained_run / "reference.npz")["embeddings"])
    assert f"nn{references}_distance" in header and f"nn{references + 1}_path" not in header  # no empty columns


def test_predict_errors_for_wrong_run(tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "nope"), str(tmp_path)])
    assert result.exit_code != 0
    assert "no such run folder" in str(result.exception)


@pytest.mark.slow
def test_embed_loads_in_one_line(trained_run, synth_data, tmp_path):
    out = tmp_path / "emb.npz"
    invoke("embed", trained_run, synth_data, "--out", out)
    z = np.load(out)
    assert z["embeddings"].shape == (120, 16)
    assert set(z["magnifications"].tolist()) == {40, 100, 200, 400} and len(z["patients"]) == 120


@pytest.mark.slow
def test_cv_prints_mean_std_table(synth_data, tmp_path):
    output = invoke("cv", "--folds", 2, f"data.root={synth_data}", f"out={tmp_path / 'cv'}", *TINY, "train.epochs=1")
    assert "±" in output and "| SMSE (classifier head) | patient |" in output
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert summary["folds"] == 2
    assert summary["table"]["SMSE (classifier head)"]["all"]["image"]["n"] == 2
    assert (tmp_path / "cv" / "fold1" / "best.safetensors").exists() and (tmp_path / "cv" / "fold2" / "eval").exists()


@pytest.mark.slow
def test_train_on_real_sample(sample_root, tmp_path):
    output = invoke("train", f"data.root={sample_root}", f"out={tmp_path / 'real'}", *TINY)
    assert "| SMSE (classifier head) | image |" in output


def test_bad_override_is_named():
    result = CliRunner().invoke(app, ["train", "loss.gama=1"])
    assert result.exit_code != 0 and "loss.gama: unknown field" in str(result.exception)


def test_version_short_help_and_config_show():
    from smse import __version__

    assert invoke("--version").strip() == f"smse {__version__}"
    assert "Usage: " in invoke("-h") and "train" in invoke("-h") and "--config" in invoke("train", "-h")
    shown = invoke("config", "show", "-c", "breakhis", "model.knn_k=7")
    import yaml

    cfg = yaml.safe_load(shown)
    assert (
        cfg["model"]["knn_k"] == 7 and cfg["model"]["classifier"] == "knn" and cfg["data"]["image_size"] == [460, 700]
    )
    assert yaml.safe_load(invoke("config", "show"))["loss"]["metric"] == "pair"  # the defaults
    bad = CliRunner().invoke(app, ["config", "show", "loss.metric=quadruplet"])
    assert bad.exit_code != 0
