"""Runs tracked where people already compare them: TensorBoard event files and MLflow (both off by default).

``log.tensorboard=true`` writes ``RUN/tensorboard``: every epoch's loss parts, learning rate and validation
metrics as scalars, the test metrics after evaluation, and the test embeddings for the projector (with
thumbnails and labels). ``log.mlflow=URI`` logs the config as parameters, the same metrics and the best
checkpoint to an MLflow run; a resumed training and a later ``smse evaluate`` continue that MLflow run (its
id is kept in ``RUN/tracking.json``). A local ``sqlite:///mlflow.db`` store works offline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from smse.config import Config, to_flat
from smse.errors import ConfigError
from smse.runfiles import RunFiles

log = logging.getLogger(__name__)

#: history columns that are not metrics of an epoch
NOT_METRICS = ("epoch", "seconds")


def _numbers(row: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, under slash-joined names."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def test_metrics(metrics: dict) -> dict[str, float]:
    """The headline test figures of an evaluation, per classifier and magnification, as flat names."""
    out: dict[str, float] = {}
    for method in ("head", "knn"):
        for mag, m in (metrics.get(method) or {}).items():
            for key in ("image_accuracy", "patient_accuracy", "balanced_accuracy", "roc_auc", "patients", "images"):
                if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
                    out[f"test/{method}/{mag}/{key}"] = float(m[key])
    for rep, loc in (metrics.get("localisation") or {}).items():
        for scope, r in loc["pooled"].items():
            for key in ("top_1", "top_5", "median_rank"):
                out[f"test/localisation/{rep}/{scope}/{key}"] = float(r[key])
    probe = (metrics.get("probe") or {}).get("results", {}).get("all", {})
    for key in ("image_accuracy", "patient_accuracy"):
        if key in probe:
            out[f"test/baseline_probe/all/{key}"] = float(probe[key])
    return out


#: the projector's sprite holds at most 8192 x 8192 px: this many test images, seeded sample beyond
PROJECTOR_ROWS = 4096
THUMBNAIL_SIDE = 48


def projector_rows(
    arrays: dict | None, seed: int = 0, limit: int = PROJECTOR_ROWS
) -> tuple[np.ndarray | None, list[str], np.ndarray | None]:
    """Embeddings, labels (class, type, magnification) and thumbnails of the test images for the projector."""
    from PIL import Image

    from smse.data.images import read_image
    from smse.data.records import mag_name
    from smse.errors import ImageError

    if arrays is None or not len(arrays["embeddings"]):
        return None, [], None
    rows = np.arange(len(arrays["embeddings"]))
    if len(rows) > limit:
        log.info("projector: a seeded sample of %d of the %d test images", limit, len(rows))
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    located = "slides" in arrays  # tiles: their slide and centre too
    labels = [
        f"{arrays['labels'][i]} {arrays['tumor_types'][i]} {mag_name(int(arrays['magnifications'][i]))}"
        + (f" {arrays['slides'][i]}@{arrays['xs'][i]:g},{arrays['ys'][i]:g}" if located else "")
        for i in rows
    ]
    thumbs = np.zeros((len(rows), THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3), dtype=np.uint8)
    for j, i in enumerate(rows):
        try:
            thumbs[j] = np.asarray(
                read_image(str(arrays["paths"][i])).resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
            )
        except ImageError:  # moved or unreadable since evaluation: a grey square
            thumbs[j] = 128
    return arrays["embeddings"][rows], labels, thumbs


class Tracker:
    """Sends a run's numbers to TensorBoard and/or MLflow, as the run's ``log`` config says."""

    def __init__(self, cfg: Config, run: str | Path):
        self.cfg, self.files = cfg, RunFiles(run)
        self._tb: Any = None
        self._mlflow: Any = None
        self._mlflow_run: str | None = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "log.tensorboard: TensorBoard is not installed; pip install 'smse[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(str(self.files.tensorboard))
        if cfg.log.mlflow:
            self._start_mlflow(cfg.log.mlflow)

    # ---- MLflow ----
    def _start_mlflow(self, uri: str) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("log.mlflow: MLflow is not installed; pip install 'smse[mlflow]'") from None
        saved = self.files.read_json(self.files.tracking, {})
        try:
            mlflow.set_tracking_uri(uri)
            client = mlflow.MlflowClient()
            run_id = saved.get("mlflow_run") if saved.get("mlflow") == uri else None
            if run_id is None:
                experiment = client.get_experiment_by_name(self.cfg.log.mlflow_experiment)
                if experiment is None:
                    experiment_id = client.create_experiment(
                        self.cfg.log.mlflow_experiment, artifact_location=_artifact_location(uri)
                    )
                else:
                    experiment_id = experiment.experiment_id
                run_id = client.create_run(
                    experiment_id,
                    run_name=self.files.root.name,
                    tags={"smse.run_folder": str(self.files.root.resolve())},
                ).info.run_id
                params = {k: str(v) for k, v in to_flat(self.cfg).items()}
                items = list(params.items())
                for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                    client.log_batch(
                        run_id, params=[mlflow.entities.Param(k, v[:500]) for k, v in items[start : start + 100]]
                    )
                self.files.write_tracking({"mlflow": uri, "mlflow_run": run_id})
        except Exception as exc:  # noqa: BLE001 - a store that cannot be reached or written
            raise ConfigError(f"log.mlflow: cannot log to {uri} ({type(exc).__name__}: {exc})") from None
        self._mlflow, self._mlflow_run = client, run_id

    def _mlflow_metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(k), v, now, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):
            self._mlflow.log_batch(self._mlflow_run, metrics=metrics[start : start + 1000])

    # ---- what the pipeline sends ----
    def epoch(self, row: dict) -> None:
        """One row of ``history.json``: loss parts, learning rate, validation metrics."""
        values = {k: v for k, v in _numbers(row).items() if k not in NOT_METRICS}
        step = int(row["epoch"])
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(_tb_name(key), value, step)
            self._tb.flush()
        if self._mlflow is not None:
            self._mlflow_metrics(values, step)

    def checkpoint(self, path: Path) -> None:
        """The best checkpoint, as an MLflow artifact."""
        if self._mlflow is not None and path.exists():
            self._mlflow.log_artifact(self._mlflow_run, str(path), artifact_path="checkpoints")

    def evaluation(
        self,
        metrics: dict,
        embeddings: np.ndarray | None = None,
        labels: Sequence[str] = (),
        thumbnails: np.ndarray | None = None,
    ) -> None:
        """The test metrics and (TensorBoard) the test embeddings for the projector."""
        values = test_metrics(metrics)
        step = int(metrics.get("epoch", 0))
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            if embeddings is not None and len(embeddings):
                import torch

                label_img = (
                    None if thumbnails is None else torch.from_numpy(thumbnails).permute(0, 3, 1, 2).float() / 255
                )
                self._tb.add_embedding(
                    torch.from_numpy(np.asarray(embeddings, dtype=np.float32)),
                    metadata=list(labels) or None,
                    label_img=label_img,
                    global_step=step,
                    tag="test_embeddings",
                )
            self._tb.flush()
        if self._mlflow is not None:
            self._mlflow_metrics(values, step)
            if self.files.report.exists():
                self._mlflow.log_artifact(self._mlflow_run, str(self.files.report), artifact_path="report")

    def close(self, status: str = "FINISHED") -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._mlflow_run, status=status)


def _tb_name(key: str) -> str:
    """History names grouped for TensorBoard: ``loss_total`` -> ``loss/total``, ``val_...`` -> ``val/...``."""
    for prefix in ("loss_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"train/{key}"


def _mlflow_name(key: str) -> str:
    """MLflow takes letters, digits and ``_-. /`` in metric names."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _artifact_location(uri: str) -> str | None:
    """For a local SQLite store, artifacts beside the database (not in the working folder's ``mlruns``)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


@contextmanager
def tracked(cfg: Config, run: str | Path) -> Iterator[Tracker | None]:
    """A ``Tracker`` for the block when ``cfg.log`` asks for one (None otherwise), closed however the block ends."""
    if not (cfg.log.tensorboard or cfg.log.mlflow):
        yield None
        return
    tracker = Tracker(cfg, run)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.close(status)


__all__ = ["Tracker", "projector_rows", "test_metrics", "tracked"]
