"""Runs tracked in TensorBoard and MLflow, read back with each tool's own reader."""

import json

import numpy as np
import pytest

from smse.pipeline import evaluate_and_report, run_pipeline
from smse.runfiles import RunFiles
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tracked_run(synth_data, tmp_path_factory):
    pytest.importorskip("tensorboard", reason="TensorBoard not installed (pip install 'smse[tensorboard]')")
    pytest.importorskip("mlflow", reason="MLflow not installed (pip install 'smse[mlflow]')")
    base = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    cfg = tiny_config(
        synth_data, base / "run", "log.tensorboard=true", f"log.mlflow={uri}", "data.split.val_fraction=0.2"
    )
    run, metrics = run_pipeline(cfg, report=False, progress=False)
    return run, metrics, uri


@pytest.mark.slow
def test_tensorboard_holds_every_epoch_the_test_metrics_and_the_projector(tracked_run):
    """Catches: scalars written under other names or steps, values that are not the history's, no projector."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, metrics, _ = tracked_run
    files = RunFiles(run)
    events = EventAccumulator(str(files.tensorboard), size_guidance={"scalars": 0}).Reload()
    history = files.read_history()
    total = events.Scalars("loss/total")
    assert [e.step for e in total] == [row["epoch"] for row in history]
    assert np.allclose([e.value for e in total], [row["loss_total"] for row in history], rtol=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([row["lr"] for row in history])
    assert any(tag.startswith("val/") for tag in events.Tags()["scalars"])
    (test,) = events.Scalars("test/head/all/patient_accuracy")
    assert test.value == pytest.approx(metrics["head"]["all"]["patient_accuracy"])
    # the projector: its config, one row per test image with its label, and the thumbnails' sprite
    config = next(files.tensorboard.rglob("projector_config.pbtxt")).read_text()
    assert "test_embeddings" in config and "sprite" in config
    tensors = next(files.tensorboard.rglob("tensors.tsv")).read_text().strip().splitlines()
    labels = next(files.tensorboard.rglob("metadata.tsv")).read_text().strip().splitlines()
    test_images = sum(1 for p in metrics["patients"] for _ in range(p["images"]))
    assert len(tensors) == len(labels) == test_images
    assert {line.split()[0] for line in labels} <= {"benign", "malignant"}


@pytest.mark.slow
def test_mlflow_holds_the_params_every_epoch_the_test_metrics_and_the_checkpoint(tracked_run):
    """Catches: a run per process or per stage (evaluation in a new MLflow run), lost steps, no checkpoint."""
    import mlflow

    run, metrics, uri = tracked_run
    files = RunFiles(run)
    ids = json.loads(files.tracking.read_text())
    assert ids["mlflow"] == uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("smse").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow_run"]]
    found = client.get_run(ids["mlflow_run"])
    assert found.data.params["model.backbone"] == "paper-cnn" and found.info.status == "FINISHED"
    history = files.read_history()
    steps = client.get_metric_history(ids["mlflow_run"], "loss_total")
    assert sorted((m.step, round(m.value, 5)) for m in steps) == [
        (r["epoch"], round(r["loss_total"], 5)) for r in history
    ]
    assert found.data.metrics["test/head/all/patient_accuracy"] == pytest.approx(
        metrics["head"]["all"]["patient_accuracy"]
    )
    assert [a.path for a in client.list_artifacts(ids["mlflow_run"], "checkpoints")] == ["checkpoints/best.safetensors"]

    # a second evaluation logs to the same MLflow run
    evaluate_and_report(run, report=False, progress=False)
    assert len(client.search_runs([client.get_experiment_by_name("smse").experiment_id])) == 1


def test_tracking_is_off_by_default_and_a_missing_package_is_named(synth_data, tmp_path, monkeypatch):
    """Catches: event files written unasked, or an ImportError instead of the install line."""
    import sys

    from smse.errors import ConfigError
    from smse.tracking import Tracker

    cfg = tiny_config(synth_data, tmp_path / "run")
    assert not cfg.log.tensorboard and cfg.log.mlflow is None
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"log.mlflow: MLflow is not installed; pip install 'smse\[mlflow\]'"):
        Tracker(tiny_config(synth_data, tmp_path / "run", "log.mlflow=sqlite:///x.db"), tmp_path / "run")


def test_an_mlflow_uri_that_cannot_work_is_refused_by_name_before_any_work():
    """Catches: a folder path or an unknown scheme reaching MLflow after the features were computed (a traceback)."""
    from smse.config import load_config
    from smse.errors import ConfigError

    for uri in ("./relative/dir", "garbage://x", "file:///tmp/mlruns"):
        with pytest.raises(ConfigError, match=r"log.mlflow: .* is not a tracking URI smse can log to; give sqlite:///"):
            load_config(None, [f"log.mlflow={uri}"])
    assert load_config(None, ["log.mlflow=sqlite:///m.db"]).log.mlflow == "sqlite:///m.db"


def test_localisation_reaches_the_trackers_with_the_test_metrics():
    """Catches: a label-free run whose only test figures (localisation) are never logged."""
    from smse.tracking import test_metrics

    pooled = {"slide": {"top_1": 0.25, "top_5": 0.5, "median_rank": 3.0}}
    got = test_metrics({"localisation": {"embedding": {"pooled": pooled}, "frozen_features": {"pooled": pooled}}})
    assert got["test/localisation/embedding/slide/top_1"] == 0.25
    assert got["test/localisation/frozen_features/slide/median_rank"] == 3.0
