"""What ``smse serve`` computes: decoding under limits, inference under a lock, neighbours by magnification, the map."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from smse import __version__
from smse.api import Model, ReferenceIndex, load_model
from smse.checkpoint import find_checkpoint
from smse.data.breakhis import parse_name
from smse.data.images import read_image
from smse.errors import CheckpointError, ConfigError, DataError, ImageError
from smse.metrics import CONFIDENCE
from smse.runfiles import RunFiles

log = logging.getLogger(__name__)

#: archive search (``smse serve --index``): the nearest index tiles of each uploaded image that vote for slides
ARCHIVE_K = 10
#: hit slides shown, and matching regions (thumbnails) shown per slide
ARCHIVE_SLIDES = 5
ARCHIVE_REGIONS = 4
ARCHIVE_RULE = (
    "each image's {k} nearest archive tiles vote for their slides, the one at rank r with weight 1/r; slides are "
    "ranked by summed votes (ties: the nearer best tile)"
)


@dataclass(frozen=True)
class Limits:
    """What one request may hold; anything beyond gets a JSON error and the server goes on."""

    max_files: int = 16
    max_file_bytes: int = 25 * 2**20
    max_request_bytes: int = 100 * 2**20
    max_pixels: int = 64_000_000  # per image, read from the header before decoding (PIL's own bomb limit is 89 M)
    max_k: int = 32

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"limits.{name}: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its file name, its bytes and the magnification given with it (None: from the name)."""

    name: str
    data: bytes
    magnification: int | None = None


def parse_magnification(text: str, field: str = "magnification") -> int | None:
    """``40``, ``40X`` or ``40x`` -> 40; empty or ``auto`` -> None (read from the file name)."""
    text = text.strip().lower().removesuffix("x")
    if text in ("", "auto"):
        return None
    if not text.isdigit() or int(text) <= 0:
        raise DataError(f"{field}: expected a magnification such as 40, 100X or auto, got {text!r}")
    return int(text)


def magnification_from_name(name: str) -> int | None:
    """The magnification of a BreakHis-style file name (``SOB_M_DC-14-2523-400-001.png``), else None."""
    try:
        return int(parse_name(Path(name).name)["magnification"])
    except DataError:
        return None


class ReferenceMap:
    """A 2-D PCA of the reference embeddings; new embeddings land exactly where the same projection puts them."""

    def __init__(self, embeddings: np.ndarray):
        emb = np.asarray(embeddings, dtype=np.float64)
        self.mean = emb.mean(0) if len(emb) else np.zeros(emb.shape[1])
        centred = emb - self.mean
        if len(emb) >= 2:
            _, s, vt = np.linalg.svd(centred, full_matrices=False)
            components = vt[:2]
            var = s**2
            self.explained = (var[:2] / var.sum()).tolist() if var.sum() > 0 else [0.0, 0.0]
        else:
            components, self.explained = np.eye(2, emb.shape[1]), [0.0, 0.0]
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(1)])  # deterministic sign
        self.components = components * np.where(signs == 0, 1, signs)[:, None]
        self.points = self.transform(emb)

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        """[N, d] embeddings -> [N, 2] map coordinates."""
        coords = (np.asarray(embeddings, dtype=np.float64) - self.mean) @ self.components.T
        return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))) if coords.shape[1] < 2 else coords


def reference_index(run: str | Path, model: Model, reference: str | Path | None = None) -> tuple[ReferenceIndex, str]:
    """The reference set and a description of where it came from.

    ``None``: the run's training and validation images (``reference.npz``). A ``.npz`` from ``smse embed``: as is.
    A BreakHis folder or manifest CSV: embedded once into ``RUN/references/`` (keyed by the data path and
    the checkpoint), then loaded from there; delete that file to embed the data again.
    """
    backend = model.config.eval.knn_backend
    if reference is None:
        index = ReferenceIndex.from_run(run, model, backend)
        return _fits(index, model, RunFiles(find_checkpoint(Path(run)).parent).reference), (
            "the run's training and validation images"
        )
    reference = Path(reference)
    if not reference.exists():
        raise DataError(f"--reference {reference}: no such file or folder")
    if reference.suffix.lower() == ".npz":
        return _fits(ReferenceIndex.load(reference, backend), model, reference), str(reference)
    from smse.evaluate import embed_folder

    checkpoint = find_checkpoint(Path(run))
    key = hashlib.sha1(f"{reference.resolve()}|{checkpoint.resolve()}|{checkpoint.stat().st_mtime_ns}".encode())
    run_dir = checkpoint.parent
    cache = RunFiles(run_dir).references / f"{reference.stem or 'data'}-{key.hexdigest()[:12]}.npz"
    if cache.exists():
        log.info("reference embeddings of %s from %s (delete it to embed the data again)", reference, cache)
    else:
        log.info("embedding the reference images of %s into %s", reference, cache)
        embed_folder(checkpoint, reference, cache, progress=False)
    return _fits(ReferenceIndex.load(cache, backend), model, cache), str(reference)


def _fits(index: ReferenceIndex, model: Model, path: Path) -> ReferenceIndex:
    """``index``, refused unless its embeddings have the model's dimension (another model's would fail every query).

    Raises:
        DataError: naming the file and both dimensions.
    """
    dim = int(model.module.heads.embed.out_features)
    if index.embeddings.shape[1] != dim:
        raise DataError(
            f"{path}: embeddings of dimension {index.embeddings.shape[1]}, but the model of {model.source} embeds "
            f"in {dim}: they come from another model; embed the reference images with this run "
            "(smse embed RUN DATA), or give the images themselves as --reference"
        )
    return index


def open_archive(index: str | Path, model: Model) -> Any:
    """The archive index folder ``index`` (``smse.index.Index``) for the served model, refused unless that model's
    checkpoint built it (the same fingerprint: embeddings of another model cannot be compared).

    Raises:
        DataError: ``index`` is not a readable index folder.
        CheckpointError: the index was built by another model (or from embeddings of one).
    """
    from smse.index import Index
    from smse.runfiles import file_fingerprint

    archive = Index.open(index)
    served = file_fingerprint(Path(model.source))
    if archive.fingerprint != served:
        built = archive.description.get("checkpoint") or "embeddings given directly"
        archive.close()
        raise CheckpointError(
            f"--index {index}: built with the model of {built} (fingerprint {archive.fingerprint[:12]}), but the "
            f"served checkpoint {model.source} has fingerprint {served[:12]}: embeddings of another model cannot be "
            "compared; serve the run that built the index, or build the index with this run (smse index build)"
        )
    return archive


def tile_name(path: str) -> str:
    """How the page names an archive tile: the file name, or ``SLIDE.svs x1200 y800 100X`` for a slide's tile (no
    folders: the client is never told where files lie)."""
    from smse.index.slides import parse_tile_path

    tile = parse_tile_path(path)
    if tile is None:
        return Path(path).name
    return f"{Path(tile.file).name} x{tile.x} y{tile.y} {tile.magnification}X"


def run_folder(model: Model) -> Path | None:
    """The run folder of ``model``'s checkpoint (the folder that holds its ``split.csv``, ``run.json`` or
    ``eval/``), or None for a checkpoint file outside a run folder."""
    folder = Path(model.source).parent
    files = RunFiles(folder)
    return folder if any(p.exists() for p in (files.split, files.summary, files.eval)) else None


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None (an interval of no images): JSON, not ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _validation_counts(files: RunFiles) -> tuple[int, int] | None:
    """(images, patients) of the validation split in ``split.csv``; None when the run has no readable one."""
    try:
        with open(files.split, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("split") == "val"]
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    return len(rows), len({row.get("patient") for row in rows})


def _read_json(files: RunFiles, path: Path) -> tuple[Any, str | None]:
    """A run file's JSON (None when absent) and, when it cannot be read, why."""
    try:
        return files.read_json(path), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} cannot be read ({type(exc).__name__})"


def calibration_of(model: Model, run: Path | None) -> dict:
    """How far to trust the class probabilities: the temperature the model divides its logits by, and its fit.

    Returns:
        ``calibrated`` (bool); ``temperature`` (T; 1: none); ``reason``: ``fitted`` (on the validation patients,
        recorded in ``run.json``), ``unrecorded`` (T is not 1 but the run folder does not say what it was fitted
        on), ``no_validation_patients`` (T = 1 because the run had none), ``not_fitted`` (T = 1, the run records
        no fit) or ``no_classes`` (a label-free model); ``validation``: ``images``, ``patients`` (None when
        ``split.csv`` disagrees) and ``ece_before`` / ``ece_after`` (expected calibration error of the
        validation images with T = 1 and with T), or None; ``text``: the sentence the page shows.
    """
    t = float(model.module.heads.temperature)
    files = RunFiles(run) if run is not None else None
    summary = _read_json(files, files.summary)[0] if files is not None else None
    fit = summary.get("calibration") if isinstance(summary, dict) else None
    counts = _validation_counts(files) if files is not None else None
    out: dict[str, Any] = {"calibrated": False, "temperature": t, "reason": "not_fitted", "validation": None}
    if not model.class_map.labelled:
        out.update(reason="no_classes", text="No class probabilities: this model is label-free.")
    elif isinstance(fit, dict) and math.isclose(float(fit.get("temperature", math.nan)), t, rel_tol=1e-4):
        images = int(fit.get("val_images", 0))
        patients = counts[1] if counts and counts[0] == images else None
        before, after = finite(fit.get("val_ece_before")), finite(fit.get("val_ece_after"))
        out.update(
            calibrated=True,
            reason="fitted",
            validation={"images": images, "patients": patients, "ece_before": before, "ece_after": after},
        )
        out["text"] = (
            f"Probabilities calibrated by temperature scaling: T = {t:.2f}, fitted on {images} validation images"
            + (f" of {patients} patients" if patients is not None else "")
            + (
                f" (expected calibration error there {100 * before:.1f}% before, {100 * after:.1f}% after)"
                if before is not None and after is not None
                else ""
            )
            + "."
        )
    elif not math.isclose(t, 1.0, rel_tol=1e-6):
        out.update(
            calibrated=True,
            reason="unrecorded",
            text=f"Probabilities calibrated by temperature scaling: T = {t:.2f} (the run folder does not record "
            "the validation images it was fitted on).",
        )
    elif (counts is not None and counts[0] == 0) or (counts is None and model.config.data.split.val_fraction == 0):
        out.update(
            reason="no_validation_patients",
            text="Probabilities not calibrated: the run had no validation patients (T = 1).",
        )
    else:
        out["text"] = (
            "Probabilities not calibrated (T = 1): the run records no temperature fit (trained before calibration "
            "existed, or stopped before it)."
        )
    return out


def _accuracy(block: dict) -> dict:
    """Image- and patient-level accuracy of one ``metrics.json`` block, each with its 95% interval."""
    intervals = block.get("intervals") or {}
    return {
        level: {"value": block.get(level), "interval": intervals.get(level)}
        for level in ("image_accuracy", "patient_accuracy")
    } | {"interval_method": intervals.get("method")}


def evaluation_of(model: Model, run: Path | None) -> tuple[dict | None, str | None]:
    """The served run's test results from ``eval/metrics.json`` (see ``Service.about``), and a note for the
    page: why there are none, or that they belong to another checkpoint than the one served."""
    if run is None:
        return None, "The served checkpoint is not in a run folder: there are no test results to show."
    files = RunFiles(run)
    metrics, unreadable = _read_json(files, files.metrics)
    if unreadable:
        return None, f"The run's test results are unreadable: eval/{unreadable}; run smse evaluate again."
    if not isinstance(metrics, dict):
        return None, (
            "This run has not been evaluated yet (no eval/metrics.json): run smse evaluate on it to see its test "
            "accuracy and calibration here."
        )
    if metrics.get("label_free"):
        return None, "This model is label-free: its evaluation scores no class, so there is no accuracy to show."
    head = (metrics.get("head") or {}).get("all")
    if not isinstance(head, dict) or not head.get("images"):
        return None, "eval/metrics.json holds no test accuracy: run smse evaluate on this run again."
    knn = (metrics.get("knn") or {}).get("all")
    calibration = metrics.get("calibration")
    if isinstance(calibration, dict):
        keys = ("images", "temperature", "ece", "ece_uncalibrated", "reliability", "reliability_uncalibrated")
        calibration = {k: calibration.get(k) for k in keys}
    evaluation = {
        "checkpoint": metrics.get("checkpoint"),
        "epoch": metrics.get("epoch"),
        "images": int(head["images"]),
        "patients": int(head.get("patients", 0)),
        "confidence": CONFIDENCE,
        "head": _accuracy(head),
        "knn": _accuracy(knn) | {"k": metrics.get("knn_k")} if isinstance(knn, dict) else None,
        "calibration": calibration if isinstance(calibration, dict) and calibration.get("images") else None,
    }
    note = None
    epoch, t = model.metadata.get("epoch"), float(model.module.heads.temperature)
    evaluated_t = (calibration or {}).get("temperature")
    if (epoch is not None and metrics.get("epoch") is not None and int(epoch) != int(metrics["epoch"])) or (
        isinstance(evaluated_t, (int, float)) and not math.isclose(float(evaluated_t), t, rel_tol=1e-4)
    ):
        note = (
            f"These test results are of the {metrics.get('checkpoint')} checkpoint of epoch {metrics.get('epoch')}, "
            f"not of the served one (epoch {epoch}, T = {t:.2f}): run smse evaluate again for the served model."
        )
    return finite(evaluation), note


class Service:
    """One model and one reference set shared by all requests; decoding and inference run under one lock."""

    THUMBNAIL_SIDE = 256

    def __init__(
        self,
        model: Model,
        index: ReferenceIndex,
        source: str = "",
        limits: Limits = Limits(),
        thumbnails_cached: int = 512,
        archive: Any = None,
    ):
        """``archive``: an ``smse.index.Index`` of the same model (``open_archive``), searched slide by slide for
        every prediction; None: no archive search."""
        self.model = model
        self.index = index
        self.source = source
        self.limits = limits
        self.archive = archive
        self._archive_lock = threading.Lock()  # its SQLite connection and faiss index: one thread at a time
        self._archive_thumbs: OrderedDict[int, bytes] = OrderedDict()
        self.archive_slides = len(archive.store.counts("slide")) if archive is not None else 0
        self.label_key = "tumor_types" if model.class_map.task == "type" else "labels"
        self._lock = threading.Lock()
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumbs_cached = thumbnails_cached
        mags = index.metadata["magnifications"].astype(np.int64)
        self.groups: list[tuple[int, np.ndarray, ReferenceIndex]] = []
        for mag in sorted(set(mags.tolist()), key=lambda m: (m == 0, m)):  # unknown (0) last
            rows = np.flatnonzero(mags == mag)
            subset = {name: values[rows] for name, values in index.metadata.items()}
            self.groups.append((mag, rows, ReferenceIndex(index.embeddings[rows], index.backend, **subset)))
        self.map = ReferenceMap(index.embeddings)
        self.run = run_folder(model)
        self.calibration = calibration_of(model, self.run)

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        reference: str | Path | None = None,
        limits: Limits = Limits(),
        device: str = "cpu",
        index: str | Path | None = None,
    ) -> Service:
        """The service of ``run``'s model; ``index``: an archive index folder built by the same checkpoint
        (``smse index build RUN ...``), refused otherwise, before the reference set is embedded."""
        model = load_model(run, device=device)
        archive = open_archive(index, model) if index is not None else None
        reference_set, source = reference_index(run, model, reference)
        log.debug("serving %r with %d reference images (%s)", model, len(reference_set), source)  # the CLI prints it
        return cls(model, reference_set, source, limits, archive=archive)

    def health(self) -> dict:
        mags = self.index.metadata["magnifications"]
        return {
            "status": "ok",
            "version": __version__,
            "model": {
                "backbone": self.model.config.model.backbone,
                "task": self.model.class_map.task,
                "classes": list(self.model.classes),
                "input_size": list(self.model.size),
                "embedding_dim": int(self.index.embeddings.shape[1]) if len(self.index) else 0,
            },
            "reference": {
                "size": len(self.index),
                "source": self.source,
                "magnifications": {str(m): int((mags == m).sum()) for m, _, _ in self.groups},
            },
            "map": {"method": "PCA", "explained_variance": self.map.explained},
            "distance_guide": self.index.guide() if len(self.index) else None,
            "limits": asdict(self.limits),
            "archive": self.archive_summary(),
        }

    def archive_summary(self) -> dict | None:
        """What the archive holds (tiles, slides, kind, folder) and how it is searched; None without one."""
        if self.archive is None:
            return None
        return {
            "path": str(self.archive.root),
            "tiles": len(self.archive),
            "slides": self.archive_slides,
            "kind": self.archive.kind,
            "k": ARCHIVE_K,
            "rule": ARCHIVE_RULE.format(k=ARCHIVE_K),
        }

    def about(self) -> dict:
        """How far to trust what the page shows: the served run's test accuracy with counts and intervals, and
        the calibration of its probabilities (read from the run folder on each call, so a later ``smse evaluate``
        shows without a restart).

        Returns:
            ``run`` (the run folder, or None); ``calibration`` (``calibration_of``, also in every prediction);
            ``evaluation``: None before ``smse evaluate``, else ``checkpoint``, ``epoch``, ``images`` and
            ``patients`` (the test set's n), ``confidence`` (0.95), ``head`` (the classifier that gives the
            probabilities) and ``knn`` (the nearest-reference vote, with its ``k``), each with
            ``image_accuracy`` and ``patient_accuracy`` as ``{"value", "interval": [low, high]}`` and
            ``interval_method``, and ``calibration`` (test ``images``, ``temperature``, ``ece``,
            ``ece_uncalibrated``, ``reliability`` and ``reliability_uncalibrated``: the reliability diagram's bins,
            ``edges`` and per bin ``confidence``, ``accuracy`` and ``count``) or None; ``evaluation_note``: why
            there is no evaluation, or that it is of another checkpoint than the one served, else None.
            Unmeasured values (an interval of no images) are None, never NaN.
        """
        evaluation, note = evaluation_of(self.model, self.run)
        return {
            "run": str(self.run) if self.run is not None else None,
            "calibration": self.calibration,
            "evaluation": evaluation,
            "evaluation_note": note,
        }

    def reference_map(self) -> dict:
        """Every reference's map position with what to colour it by."""
        meta = self.index.metadata
        return {
            "method": "PCA",
            "explained_variance": self.map.explained,
            "x": np.round(self.map.points[:, 0], 4).tolist(),
            "y": np.round(self.map.points[:, 1], 4).tolist(),
            "classes": [str(v) for v in meta[self.label_key]],
            "magnifications": [int(v) for v in meta["magnifications"]],
        }

    def _decode(self, upload: Upload) -> torch.Tensor:
        image = read_image(io.BytesIO(upload.data), self.limits.max_pixels, name=upload.name)
        return self.model.transform(image)

    def predict(self, uploads: Sequence[Upload], k: int = 5) -> dict:
        """Class probabilities, neighbours (overall and per magnification), map position and out-of-distribution
        flag of each upload; the case's mean and neighbour vote; and ``calibration`` (``calibration_of``: whether
        the probabilities are calibrated, and on how many validation images).

        An unreadable upload gets an ``error`` entry and the others go on; when none is readable the
        first ``ImageError`` is raised.
        """
        items: list[dict] = []
        tensors: list[torch.Tensor] = []
        errors: list[ImageError] = []
        with self._lock:
            for up in uploads:
                mag, source = (
                    (up.magnification, "given") if up.magnification else (magnification_from_name(up.name), "name")
                )
                item: dict[str, Any] = {
                    "name": up.name,
                    "magnification": mag,
                    "magnification_source": source if mag else None,
                }
                try:
                    tensors.append(self._decode(up))
                except ImageError as exc:
                    item["error"] = str(exc)
                    errors.append(exc)
                items.append(item)
            if not tensors:
                raise errors[0]
            emb, probs = self.model.infer(torch.stack(tensors))
        ok = [item for item in items if "error" not in item]
        overall = self.index.search(emb, k)
        ood = overall.out_of_distribution
        if ood is None:  # search() flags outliers by default; None would mean it was told not to
            raise RuntimeError("ReferenceIndex.search returned no out_of_distribution flags")
        # (the flag is the whole reference set's, above: the magnification groups need no guide of their own)
        per_mag = [(mag, rows, sub.search(emb, k, flag_outliers=False)) for mag, rows, sub in self.groups]
        coords = self.map.transform(emb)
        names = self.model.classes
        for q, item in enumerate(ok):
            top = {int(i) for i in overall.indices[q]}
            item.update(
                {
                    "predicted": names[int(probs[q].argmax())],
                    "probabilities": {c: float(p) for c, p in zip(names, probs[q])},
                    "map": [float(coords[q, 0]), float(coords[q, 1])],
                    "out_of_distribution": bool(ood[q]),
                    "neighbours": self._neighbours(overall, q, None, top),
                    "by_magnification": [
                        {"magnification": mag, "neighbours": self._neighbours(hits, q, rows, top)}
                        for mag, rows, hits in per_mag
                    ],
                }
            )
        mean = probs.mean(0)
        vote = {c: 0 for c in names}
        for item in ok:
            for n in item["neighbours"]:
                vote[n["class"]] = vote.get(n["class"], 0) + 1
        case = {
            "images": len(ok),
            "predicted": names[int(mean.argmax())],
            "out_of_distribution": sum(item["out_of_distribution"] for item in ok),
            "probabilities": {c: float(p) for c, p in zip(names, mean)},
            "neighbour_vote": vote,
        }
        out = {
            "classes": list(names),
            "task": self.model.class_map.task,
            "k": k,
            "images": items,
            "case": case,
            "calibration": self.calibration,
        }
        if self.archive is not None:
            out["archive"] = self.search_archive(emb, [i for i, item in enumerate(items) if "error" not in item])
        return out

    def search_archive(self, emb: np.ndarray, images: Sequence[int]) -> dict:
        """The archive's slides most like the case (``emb``: the embeddings of its readable images, whose numbers
        among the uploads are ``images``), ranked ``by="slide"`` (``ARCHIVE_RULE``), each with its matching regions
        (nearest first; ``image``: the upload it matched), at most ``ARCHIVE_SLIDES`` and ``ARCHIVE_REGIONS``."""
        archive = self.archive
        assert archive is not None
        with self._archive_lock:
            found = archive.search(emb, k=ARCHIVE_K, by="slide")
        slides = []
        for hit in found.slides[:ARCHIVE_SLIDES]:
            slides.append(
                {
                    "rank": hit.rank,
                    "slide": hit.slide,
                    "score": hit.score,
                    "votes": hit.votes,
                    "best_distance": hit.best_distance,
                    "patient": hit.patient,
                    "label": hit.label,
                    "tumor_type": hit.tumor_type,
                    "matching_regions": len(hit.regions),
                    "regions": [
                        {
                            "id": r.id,
                            "x": r.x,
                            "y": r.y,
                            "magnification": r.magnification,
                            "distance": r.distance,
                            "image": int(images[r.query]),
                            "name": tile_name(r.path),
                        }
                        for r in hit.regions[:ARCHIVE_REGIONS]
                    ],
                }
            )
        return finite(
            {
                "tiles": len(archive),
                "slides_in_index": self.archive_slides,
                "k": ARCHIVE_K,
                "rule": ARCHIVE_RULE.format(k=ARCHIVE_K),
                "slides": slides,
            }
        )

    def archive_thumbnail(self, tile_id: int) -> bytes:
        """A JPEG of archive tile ``tile_id`` (longest side ``THUMBNAIL_SIDE``): an indexed image file is read, a
        tile of a whole slide is cut again from the slide file its row records; paths come from the index only.

        Raises:
            KeyError: no archive, or no tile of this id.
            ImageError: the tile's image file cannot be read any more.
            SlideError: its slide file is gone or unreadable.
        """
        archive = self.archive
        if archive is None:
            raise KeyError(tile_id)

        def load() -> Image.Image:
            with self._archive_lock:  # the store's lookup only: the slide is read and cut outside the lock
                row = archive.store.rows([int(tile_id)]).get(int(tile_id))
            if row is None:
                raise KeyError(tile_id)
            return archive.row_image(row)

        return self._cached_jpeg(self._archive_thumbs, self._archive_lock, tile_id, load)

    def _cached_jpeg(
        self, cache: OrderedDict, lock: threading.Lock, key: int, load: Callable[[], Image.Image]
    ) -> bytes:
        """``load()`` as a JPEG of longest side ``THUMBNAIL_SIDE``, kept in the LRU ``cache`` (``lock`` guards it;
        the image is read and encoded outside the lock, so that one slow file holds up no other request)."""
        with lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        image = load()
        image.thumbnail((self.THUMBNAIL_SIDE, self.THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=88)
        with lock:
            cache[key] = buffer.getvalue()
            if len(cache) > self._thumbs_cached:
                cache.popitem(last=False)
            return cache[key]

    def _neighbours(self, hits, q: int, rows: np.ndarray | None, top: set[int]) -> list[dict]:
        out = []
        meta = self.index.metadata
        for r in range(hits.indices.shape[1]):
            i = int(hits.indices[q, r]) if rows is None else int(rows[hits.indices[q, r]])
            out.append(
                {
                    "id": i,
                    "rank": r + 1,
                    "class": str(meta[self.label_key][i]),
                    "label": str(meta["labels"][i]),
                    "tumor_type": str(meta["tumor_types"][i]),
                    "magnification": int(meta["magnifications"][i]),
                    "patient": str(meta["patients"][i]),
                    "file": Path(str(meta["paths"][i])).name,
                    "distance": float(hits.distances[q, r]),
                    "in_top_k": i in top,
                }
            )
        return out

    def thumbnail(self, ref_id: int) -> bytes:
        """A JPEG of reference ``ref_id`` (longest side ``THUMBNAIL_SIDE``); the path comes from the index only.

        Raises:
            KeyError: no reference has this id.
            ImageError: the reference image cannot be read any more.
        """
        if not 0 <= ref_id < len(self.index):
            raise KeyError(ref_id)
        path = str(self.index.metadata["paths"][ref_id])
        return self._cached_jpeg(self._thumbs, self._lock, ref_id, lambda: read_image(path))


__all__ = [
    "ARCHIVE_K",
    "ARCHIVE_REGIONS",
    "ARCHIVE_SLIDES",
    "Limits",
    "ReferenceMap",
    "Service",
    "Upload",
    "calibration_of",
    "evaluation_of",
    "finite",
    "magnification_from_name",
    "open_archive",
    "parse_magnification",
    "reference_index",
    "run_folder",
    "tile_name",
]
