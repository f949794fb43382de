"""The run folder's layout: the one place that names every file of a run, and reads and writes them.

    RUN/
      config.yaml          the resolved config                      (train)
      versions.json        package versions                         (train)
      split.csv            every image with its split               (train)
      data.json            what loading found                       (train)
      tiling.json          the tiling of the slide tiles it trained on, from tiles.json   (train, on smse tiles data)
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
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smse.errors import CheckpointError, LeakageError, OutputError, SmseError
from smse.io import atomic_path, describe_error, read_text, write_csv, write_json, write_text


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
    def tiling(self) -> Path:
        return self.root / "tiling.json"

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
        """The records of ``split.csv`` with their splits, or None when the run has none.

        Raises:
            DataError: naming split.csv's line of an image that is no longer there.
        """
        from smse.data.manifest import read_manifest

        return read_manifest(self.split)[0] if self.split.exists() else None

    def read_split_as_saved(self) -> tuple[list, list[str]]:
        """The records of ``split.csv`` whose images are still there, and the paths of those that are gone
        (``[], []`` when the run has none): what resuming compares the data with."""
        from smse.data.manifest import read_manifest

        if not self.split.exists():
            return [], []
        records, skipped = read_manifest(self.split, skip_bad=True)
        return records, [path for path, _ in skipped]

    def read_checked_split(self):
        """``split.csv`` as the run trained on it, or None when the run has none: refused when it is not the split
        training recorded (the fingerprint in ``state.pt``, else the counts in ``data.json``: a copy cut short, a
        hand edit), when it lacks a training or test image, or when a patient lies on two sides (the leak guard).

        Raises:
            LeakageError: naming split.csv and the patients on two sides.
            CheckpointError: naming split.csv and what it does not match.
        """
        from smse.data.splits import check_split
        from smse.runfolder import split_fingerprint

        records = self.read_split()
        if records is None:
            return None
        try:
            check_split(records)
        except LeakageError as exc:
            raise LeakageError(f"{self.split}: {exc}; it is not the split this run was trained on") from None
        redo = "restore the run's own split.csv, or train again"
        recorded = (self.read_state() or {}).get("data")
        if recorded is not None and recorded != split_fingerprint(records):
            raise CheckpointError(
                f"{self.split}: not the split this run was trained on ({len(records)} images; their paths, labels, "
                f"patients or splits differ from the fingerprint in {self.state.name}); {redo}"
            )
        summary = str(self.read_json(self.data, {}).get("summary", ""))
        counted = re.match(r"([\d,]+) images, ([\d,]+) patients", summary)
        if recorded is None and counted:
            images, patients = (int(v.replace(",", "")) for v in counted.groups())
            if (images, patients) != (len(records), len({r.patient for r in records})):
                raise CheckpointError(
                    f"{self.split}: {len(records)} images of {len({r.patient for r in records})} patients, but "
                    f"{self.data.name} records {images} images of {patients} patients (a copy cut short?); {redo}"
                )
        missing = [s for s in ("train", "test") if not any(r.split == s for r in records)]
        if missing:
            raise CheckpointError(f"{self.split}: no {' and no '.join(missing)} image; {redo}")
        return records

    def read_tiling(self) -> dict | None:
        """The tiling of the ``smse tiles`` tiles the run trained on (``tiling.json``), None when it trained on images.

        Raises:
            CheckpointError: naming tiling.json when it is not one written by smse train.
        """
        if not self.tiling.exists():
            return None
        try:
            tiling = json.loads(read_text(self.tiling, CheckpointError))["tiling"]
            if not (
                all(isinstance(m, (int, float)) for m in tiling["magnifications"])
                and len(tiling["size"]) == 2
                and all(isinstance(v, int) for v in tiling["size"])
                and isinstance(tiling["min_tissue"], (int, float))
                and (tiling["grid"] is None or isinstance(tiling["grid"], (int, float)))
            ):
                raise ValueError("a value of the wrong type")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{self.tiling}: not the tiling smse train records ({exc!r}); give --tile and --magnifications"
            ) from None
        return tiling

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

    def write_tiling(self, data_root: str | os.PathLike) -> None:
        """``tiling.json``: the tiling of the ``smse tiles`` output the run trains on (nothing for other data)."""
        tiles = tiles_json(data_root)
        if tiles is not None:  # tiles of smse tiles: their tiling belongs to the run, not to a folder that may move
            try:
                tiling = json.loads(read_text(tiles))["tiling"]
            except (SmseError, ValueError, KeyError, TypeError):
                return  # predict-slide then asks for --tile and --magnifications or takes the defaults
            write_json(self.tiling, {"source": str(tiles), "tiling": tiling})

    def write_state(self, state: dict) -> None:
        """``state.pt``, atomically: an interrupt leaves the previous resume point whole."""
        import torch

        with atomic_path(self.state) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as exc:  # torch reports a full disk as a RuntimeError of its zip writer
                raise OutputError(f"{self.state}: cannot write ({describe_error(exc)})") from None

    def write_split(self, records) -> None:
        from smse.data.manifest import write_manifest

        write_manifest(self.split, records)

    def write_reference(self, emb: np.ndarray, records, class_map) -> Path:
        """``reference.npz``: the references' embeddings with their metadata."""
        save_embeddings(self.reference, emb, records, class_map)
        return self.reference


@dataclass(frozen=True)
class SlideRunFiles:
    """The files of a slide-level run (``smse train-slides``)::

    SLIDES/
      config.json           the slide model's settings, the tile run, its checkpoint's fingerprint, the data
      embeddings.npz        the tiles' embeddings under the tile run's model (kept: a rerun reuses them)
      split.csv             slide, patient, label and cross-validation fold
      history.json          loss per epoch of the final fit
      slide-model.pt        the final model (fitted on every slide): weights, settings, classes, fingerprint
      eval/metrics.json     every method's out-of-fold slide metrics, with counts and intervals
      eval/predictions.csv  every slide's out-of-fold probability under every method
      eval/attention.csv    every tile's out-of-fold attention under the chosen model
      report/report.html    the report
    """

    root: Path

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if root.name == "slide-model.pt" and root.is_file():  # the model file given for its folder
            root = root.parent
        object.__setattr__(self, "root", root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.npz"

    @property
    def split(self) -> Path:
        return self.root / "split.csv"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def model(self) -> Path:
        return self.root / "slide-model.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "eval" / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "eval" / "predictions.csv"

    @property
    def attention(self) -> Path:
        return self.root / "eval" / "attention.csv"

    @property
    def report(self) -> Path:
        return self.root / "report" / "report.html"

    def read_config(self) -> dict | None:
        return json.loads(read_text(self.config, CheckpointError)) if self.config.is_file() else None

    def write_config(self, config: dict) -> None:
        write_json(self.config, config)

    def write_split(self, rows: Iterable[Sequence]) -> None:
        write_csv(self.split, ["slide", "patient", "label", "fold"], rows)

    def write_history(self, history: list[dict]) -> None:
        write_json(self.history, history)

    def write_metrics(self, metrics: dict) -> None:
        self.metrics.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.metrics, metrics)

    def write_predictions(self, header: Sequence[str], rows: Iterable[Sequence]) -> None:
        self.predictions.parent.mkdir(parents=True, exist_ok=True)
        write_csv(self.predictions, header, rows)

    def write_attention(self, rows: Iterable[Sequence]) -> None:
        self.attention.parent.mkdir(parents=True, exist_ok=True)
        write_csv(self.attention, ["slide", "x", "y", "magnification", "attention", "fold"], rows)

    def write_report(self, html: str) -> Path:
        self.report.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.report, html)
        return self.report

    def write_model(self, state: dict) -> None:
        """``slide-model.pt``, atomically: an interrupt leaves the previous model whole."""
        import torch

        with atomic_path(self.model) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as exc:
                raise OutputError(f"{self.model}: cannot write ({describe_error(exc)})") from None

    def read_model(self) -> dict:
        """The saved slide model.

        Raises:
            CheckpointError: naming the file when it is missing, truncated or not a slide model.
        """
        import torch

        if not self.model.is_file():
            raise CheckpointError(f"{self.model}: no slide model here (train one with smse train-slides)")
        try:
            state = torch.load(self.model, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: torch raises several kinds, some over many lines
            reason = describe_error(exc).strip().splitlines()[0][:160]
            raise CheckpointError(f"{self.model}: not a readable slide model ({reason})") from None
        if not isinstance(state, dict) or state.get("format") != SLIDE_MODEL_FORMAT:
            raise CheckpointError(f"{self.model}: not a slide model of smse train-slides")
        return state


#: the format tag inside ``slide-model.pt``
SLIDE_MODEL_FORMAT = "smse-slide-model-1"


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: which checkpoint embedded a set of tiles."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tiles_json(root: str | os.PathLike | None) -> Path | None:
    """The ``tiles.json`` beside a manifest written by ``smse tiles``, or None for other data."""
    if root is None or Path(root).suffix.lower() != ".csv":
        return None
    meta = Path(root).parent / "tiles.json"
    return meta if meta.is_file() else None


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
    if any(r.slide is not None for r in records):  # tiles: the slide and level-0 centre of each
        arrays["slides"] = np.array([r.slide or "" for r in records], dtype=str)
        arrays["xs"] = np.array([np.nan if r.x is None else r.x for r in records], dtype=np.float64)
        arrays["ys"] = np.array([np.nan if r.y is None else r.y for r in records], dtype=np.float64)
    if probs is not None:
        arrays["probabilities"] = np.asarray(probs, dtype=np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its bool flag


def load_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a ``save_embeddings`` file, read once (an ``NpzFile`` re-reads on every access)."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


__all__ = [
    "RunFiles",
    "SlideRunFiles",
    "SLIDE_MODEL_FORMAT",
    "file_fingerprint",
    "load_embeddings",
    "save_embeddings",
    "tiles_json",
]
