"""The run folder's layout: the one place that names every file of a run, and reads and writes them.

    RUN/
      config.yaml          the resolved config                      (train)
      versions.json        package versions                         (train)
      split.csv            every image with its split               (train)
      data.json            what loading found                       (train)
      history.json         one row per epoch                        (train)
      state.pt             the resume point                         (train)
      best.safetensors     weights + config + class map + preprocessing of the best epoch   (train)
      last.safetensors     ... of the last epoch                    (train)
      run.json             a finished run's summary                 (train)
      reference.npz        embeddings of the references (training and validation images)   (evaluate, or on demand)
      references/          embeddings of other reference sets, cached by ``smse serve --reference``
      eval/metrics.json    every test metric                        (evaluate)
      eval/results.md      the results table                        (evaluate)
      eval/predictions.csv every test image's prediction            (evaluate)
      eval/test-embeddings.npz                                      (evaluate)
      report/report.html   the report and its PNGs                  (report)
      tracking.json        the MLflow run this run logs to          (train, with log.mlflow)
      tensorboard/         TensorBoard event files                  (train and evaluate, with log.tensorboard)
      .lock                held while a training writes the folder  (train)

Every other module asks a ``RunFiles`` for a path, and reads or writes a run file through it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smse.io import atomic_path, write_csv, write_json, write_text


@dataclass(frozen=True)
class RunFiles:
    """The files of the run folder ``root``."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    # ---- paths ----
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def versions(self) -> Path:
        return self.root / "versions.json"

    @property
    def split(self) -> Path:
        return self.root / "split.csv"

    @property
    def data(self) -> Path:
        return self.root / "data.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def state(self) -> Path:
        return self.root / "state.pt"

    @property
    def summary(self) -> Path:
        return self.root / "run.json"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def reference(self) -> Path:
        return self.root / "reference.npz"

    @property
    def references(self) -> Path:
        return self.root / "references"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def results(self) -> Path:
        return self.eval / "results.md"

    @property
    def predictions(self) -> Path:
        return self.eval / "predictions.csv"

    @property
    def test_embeddings(self) -> Path:
        return self.eval / "test-embeddings.npz"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report(self) -> Path:
        return self.report_dir / "report.html"

    def checkpoint(self, which: str = "best") -> Path:
        """``best.safetensors`` or ``last.safetensors``."""
        return self.root / f"{which}.safetensors"

    # ---- typed reads ----
    def read_json(self, path: Path, default=None):
        """A JSON file of this run, or ``default`` when it is not there."""
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default

    def read_config(self):
        """The run's resolved ``config.yaml`` as a ``Config``, or None when it has none."""
        from smse.config import load_config

        return load_config(self.config) if self.config.exists() else None

    def read_history(self) -> list[dict]:
        return self.read_json(self.history, [])

    def read_metrics(self) -> dict | None:
        return self.read_json(self.metrics)

    def read_split(self):
        """The records of ``split.csv`` with their splits, or None when the run has none."""
        from smse.data.manifest import read_manifest

        return read_manifest(self.split)[0] if self.split.exists() else None

    def read_embeddings(self, path: Path) -> dict[str, np.ndarray] | None:
        """Every array of an embeddings file (``reference`` or ``test_embeddings``), or None when it is not there."""
        return load_embeddings(path) if path.exists() else None

    def read_predictions(self) -> list[dict]:
        """The rows of ``eval/predictions.csv`` (path made canonical; probabilities as floats), [] when absent."""
        from smse.data.records import canonical_path

        if not self.predictions.exists():
            return []
        with open(self.predictions, newline="", encoding="utf-8") as handle:
            return [
                {
                    **row,
                    "path": canonical_path(row["path"]),
                    "magnification": int(row["magnification"] or 0),
                    **{k: float(v) for k, v in row.items() if k.startswith("p_")},
                }
                for row in csv.DictReader(handle)
            ]

    def read_state(self) -> dict | None:
        """The resume point ``state.pt``, or None when the run has not finished an epoch."""
        import torch

        return torch.load(self.state, map_location="cpu", weights_only=False) if self.state.exists() else None

    # ---- typed writes (each run file has one writer: these) ----
    def write_history(self, history: Sequence[dict]) -> None:
        write_json(self.history, list(history))

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics, metrics)

    def write_results(self, markdown: str) -> None:
        write_text(self.results, markdown)

    def write_predictions(self, class_names: Sequence[str], rows: Iterable[Sequence]) -> None:
        """``eval/predictions.csv``: rows of (path, patient, magnification, label, predicted, *probabilities)."""
        write_csv(
            self.predictions,
            ["path", "patient", "magnification", "label", "predicted"] + [f"p_{c}" for c in class_names],
            ([*row[:5], *(f"{v:.6f}" for v in row[5:])] for row in rows),
        )

    def write_test_embeddings(self, emb: np.ndarray, records, class_map, probs: np.ndarray) -> None:
        save_embeddings(self.test_embeddings, emb, records, class_map, probs)

    def write_versions(self, versions: dict) -> None:
        write_json(self.versions, versions)

    def write_data(self, data: dict) -> None:
        write_json(self.data, data)

    def write_tracking(self, ids: dict) -> None:
        write_json(self.tracking, ids)

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary, summary)

    def write_config(self, cfg) -> None:
        from smse.config import save_config

        save_config(cfg, self.config)

    def write_state(self, state: dict) -> None:
        """``state.pt``, atomically: an interrupt leaves the previous resume point whole."""
        import torch

        with atomic_path(self.state) as tmp:
            torch.save(state, tmp)

    def write_split(self, records) -> None:
        from smse.data.manifest import write_manifest

        write_manifest(self.split, records)

    def write_reference(self, emb: np.ndarray, records, class_map) -> Path:
        """``reference.npz``: the references' embeddings with their metadata."""
        save_embeddings(self.reference, emb, records, class_map)
        return self.reference


def save_embeddings(path: str | Path, emb: np.ndarray, records, class_map, probs: np.ndarray | None = None) -> None:
    """Embeddings with their metadata in one ``.npz`` (``np.load(path)`` gives every array by name)."""
    arrays = {
        "embeddings": np.asarray(emb, dtype=np.float32),
        "paths": np.array([r.path for r in records], dtype=str),
        "labels": np.array([r.label for r in records], dtype=str),
        "tumor_types": np.array([r.tumor_type for r in records], dtype=str),
        "patients": np.array([r.patient for r in records], dtype=str),
        "magnifications": np.array([r.magnification for r in records], dtype=np.int64),
        "splits": np.array([r.split or "" for r in records], dtype=str),
        "targets": np.array(class_map.targets(records), dtype=np.int64),
        "class_names": np.array(class_map.names, dtype=str),
    }
    if probs is not None:
        arrays["probabilities"] = np.asarray(probs, dtype=np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its bool flag


def load_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a ``save_embeddings`` file, read once (an ``NpzFile`` re-reads on every access)."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


__all__ = ["RunFiles", "load_embeddings", "save_embeddings"]
