"""The Python API: train a run, load its model, embed and classify images, search reference cases."""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from smse.checkpoint import find_checkpoint, load_checkpoint
from smse.config import Config
from smse.data.images import as_rgb8, check_size, read_image, resize_channels, resize_image
from smse.data.records import ClassMap
from smse.data.transforms import to_tensor
from smse.errors import CheckpointError, DataError, ImageError
from smse.models import Embedder
from smse.progress import batch_sizes, progress
from smse.runfiles import RunFiles, load_embeddings
from smse.runfolder import check_finite_outputs

log = logging.getLogger(__name__)
UNIT_SLACK = 1e-3  # float tensors may stray this far outside [0, 1] (rounding, antialiased resizing)

ImageLike = Any  # a path, a PIL image, an HxWx3 uint8 array, a 3xHxW uint8 tensor or float tensor in [0, 1]


@dataclass(frozen=True)
class Run:
    """A run folder written by ``train``: checkpoints, history, split and (once evaluated) metrics."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def history(self) -> list[dict]:
        """One row per epoch: losses, learning rate, validation accuracy."""
        return RunFiles(self.path).read_history()

    @property
    def metrics(self) -> dict | None:
        """The test-split metrics of ``evaluate`` (None before evaluation)."""
        return RunFiles(self.path).read_metrics()

    def checkpoint(self, which: str = "best") -> Path:
        return find_checkpoint(self.path, which)

    def __fspath__(self) -> str:
        return str(self.path)


def train(cfg: Config, evaluate: bool = True, progress: bool = False) -> Run:
    """Train (resuming where ``cfg.out`` holds an unfinished run of the same config), then evaluate.

    The only API call that changes process-wide state: it seeds the random generators and sets
    torch's deterministic-kernel switch as ``cfg`` says.
    """
    from smse.pipeline import run_pipeline

    return Run(run_pipeline(cfg, evaluate=evaluate, report=False, progress=progress)[0])


class Model:
    """A trained embedding network with its class map and preprocessing, ready for inference.

    Attributes:
        module: the ``Embedder`` (backbone, embedding head, classifier head) in eval mode.
        config: the run's resolved config.
        class_map: class names in the order of ``predict_proba``'s columns.
        data_config: input size (height, width) and the normalisation inside the module.
        transform: one image (path, PIL image, uint8 array or tensor) -> the 3xHxW tensor the module takes.
    """

    def __init__(
        self,
        module: Embedder,
        config: Config,
        class_map: ClassMap,
        device: str | torch.device = "cpu",
        metadata: dict | None = None,
        source: str = "<model>",
    ):
        self.module = module.eval().to(device)
        self.source = source  # the checkpoint it came from, for error messages
        self.config = config
        self.class_map = class_map
        self.device = torch.device(device)
        self.metadata = metadata or {}
        self.size = (int(config.data.image_size[0]), int(config.data.image_size[1]))
        self.data_config = {
            "input_size": (3, *self.size),
            "mean": tuple(module.mean.flatten().tolist()),
            "std": tuple(module.std.flatten().tolist()),
            "interpolation": module.interpolation,
            "crop_pct": module.crop_pct,
        }
        self.transform: Callable[[ImageLike], torch.Tensor] = self._to_input

    @property
    def classes(self) -> tuple[str, ...]:
        return self.class_map.names

    def _to_input(self, image: ImageLike) -> torch.Tensor:
        """Resize like the training images (PIL, the backbone's interpolation); scale to [0, 1].

        One conversion for every input kind: a path is decoded and a PIL image converted by the same
        ``as_rgb8`` (any mode: RGBA, LA, palette, 16-bit grey, CMYK ...), every kind is size-checked by the
        same ``check_size`` (under 8 px a side is refused, as for files), and every kind is resized by PIL.
        """
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image)
        elif isinstance(image, Image.Image):
            image = as_rgb8(image, str(getattr(image, "filename", "") or "<PIL image>"))
        if isinstance(image, Image.Image):
            image = np.asarray(resize_image(image, self.size, self.module.interpolation))
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ImageError("<tensor>", f"expected a 3xHxW tensor in [0, 1], got shape {tuple(image.shape)}")
            check_size("<tensor>", int(image.shape[2]), int(image.shape[1]))
            if image.dtype == torch.uint8:  # the same pixels as an array: the same resizing
                image = image.detach().cpu().permute(1, 2, 0).numpy()
            else:
                image = _unit_range(image)
                if tuple(image.shape[1:]) != self.size:
                    resized = resize_channels(image.cpu().numpy(), self.size, self.module.interpolation)
                    image = torch.from_numpy(resized).clamp_(0, 1)
                return image
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError("<array>", f"expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
            check_size("<array>", image.shape[1], image.shape[0])
            if image.shape[:2] != self.size:
                image = np.asarray(resize_image(Image.fromarray(image, "RGB"), self.size, self.module.interpolation))
            return to_tensor(image)
        raise ImageError(repr(type(image)), "not an image: give a path, a PIL image, a uint8 array or a tensor")

    @staticmethod
    def _as_list(images: ImageLike | Sequence[ImageLike]) -> list:
        if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
            return list(images)
        return list(images) if isinstance(images, (list, tuple)) else [images]

    def _batches(self, images: ImageLike | Sequence[ImageLike], batch_size: int):
        _check_batch_size(batch_size)
        images = self._as_list(images)
        for start in range(0, len(images), batch_size):
            yield torch.stack([self.transform(x) for x in images[start : start + batch_size]])

    @torch.no_grad()
    def infer(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [N, d] and class probabilities [N, C] of ``images`` (one image or a sequence)."""
        _check_batch_size(batch_size)
        embs, probs = [], []
        images = self._as_list(images)
        batches = self._batches(images, batch_size)
        if len(images) > 4 * batch_size:  # minutes on a CPU: show the way
            batches = progress(
                batches, desc="embedding images", unit="images", weights=batch_sizes(len(images), batch_size)
            )
        for batch in batches:
            emb, logits = self.module(batch.to(self.device))
            embs.append(emb.float().cpu())
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
        if not embs:
            return (
                np.zeros((0, self.module.heads.embed.out_features), np.float32),
                np.zeros((0, len(self.class_map)), np.float32),
            )
        emb, prob = torch.cat(embs).numpy(), torch.cat(probs).numpy()
        check_finite_outputs(self.source, embeddings=emb, probabilities=prob)
        return emb, prob

    def embed(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Embeddings [N, d]: similar tissue lies close, whatever the magnification."""
        return self.infer(images, batch_size)[0]

    def predict_proba(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Class probabilities [N, C], columns in the order of ``classes``."""
        return self.infer(images, batch_size)[1]

    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 32) -> list[str]:
        """The most probable class name of each image."""
        return [self.class_map.names[i] for i in self.predict_proba(images, batch_size).argmax(1)]

    def __repr__(self) -> str:
        return (
            f"Model({self.config.model.backbone}, classes={list(self.classes)}, "
            f"input={self.size[0]}x{self.size[1]}, device={self.device})"
        )


def _check_batch_size(batch_size: int) -> None:
    """Refuse a batch size that is not a whole number of at least 1 (a negative one would classify nothing)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: images per batch must be an integer of at least 1, got {batch_size!r}")


def _unit_range(image: torch.Tensor) -> torch.Tensor:
    """A float32 image tensor in [0, 1]: uint8 is scaled by 1/255; floats must already lie in [0, 1]."""
    if image.dtype == torch.uint8:
        return image.float() / 255
    if not image.is_floating_point():
        raise ImageError("<tensor>", f"expected a uint8 or floating-point tensor, got {image.dtype}")
    image = image.float()
    if not bool(torch.isfinite(image).all()):
        raise ImageError("<tensor>", "holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -UNIT_SLACK or high > 1 + UNIT_SLACK:
        raise ImageError(
            "<tensor>",
            f"expected values in [0, 1], got {low:g} to {high:g} (divide 0-255 values by 255, or pass a uint8 tensor)",
        )
    return image.clamp_(0, 1)


def load_model(run: str | os.PathLike | Run, which: str = "best", device: str | torch.device = "cpu") -> Model:
    """The model of a run folder (its ``best`` or ``last`` checkpoint) or of a ``.safetensors`` file."""
    path = find_checkpoint(Path(run), which)
    module, cfg, class_map, meta = load_checkpoint(path)
    return Model(module, cfg, class_map, device, meta, str(path))


#: the splits whose images are a run's references: every image that is not a test image
REFERENCE_SPLITS = ("train", "val")


@dataclass
class Hits:
    """The nearest references of each query, nearest first: arrays of shape [queries, k]."""

    distances: np.ndarray
    indices: np.ndarray
    labels: np.ndarray
    tumor_types: np.ndarray
    magnifications: np.ndarray
    patients: np.ndarray
    paths: np.ndarray
    #: per query: its 5th nearest reference lies farther than the references' own 5th nearest references of other
    #: patients usually are (``ReferenceIndex.guide()["ood_threshold"]``): outside the references
    out_of_distribution: np.ndarray | None = None

    def rows(self, query: int = 0) -> list[dict]:
        """The hits of one query as dicts (rank, label, tumour type, magnification, patient, path, distance)."""
        return [
            {
                "rank": r + 1,
                "index": int(self.indices[query, r]),
                "label": str(self.labels[query, r]),
                "tumor_type": str(self.tumor_types[query, r]),
                "magnification": int(self.magnifications[query, r]),
                "patient": str(self.patients[query, r]),
                "path": str(self.paths[query, r]),
                "distance": float(self.distances[query, r]),
            }
            for r in range(self.indices.shape[1])
        ]


class ReferenceIndex:
    """Embeddings of reference images with their metadata; ``search`` finds the nearest ones (squared L2)."""

    FIELDS = ("labels", "tumor_types", "magnifications", "patients", "paths")

    def __init__(self, embeddings: np.ndarray, backend: str = "torch", **metadata: np.ndarray):
        """An index of ``embeddings`` [N, d] with per-row ``metadata`` (the names of ``FIELDS``).

        Raises:
            ValueError: embeddings that are not an [N, d] array of finite numbers (a NaN row would be everyone's
                neighbour or no one's), or metadata of another length.
        """
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or self.embeddings.shape[1] < 1:
            raise ValueError(f"embeddings: expected an [N, d] array, got shape {self.embeddings.shape}")
        bad = np.flatnonzero(~np.isfinite(self.embeddings).all(axis=1))
        if len(bad):
            raise ValueError(
                f"embeddings: {len(bad)} of {len(self.embeddings)} rows hold NaN or infinite values "
                f"(the first is row {int(bad[0])})"
            )
        n = len(self.embeddings)
        self.metadata: dict[str, np.ndarray] = {}
        for name in self.FIELDS:
            values = metadata.get(name)
            default = np.zeros(n, np.int64) if name == "magnifications" else np.full(n, "", dtype=object)
            self.metadata[name] = np.asarray(values) if values is not None else default
            if len(self.metadata[name]) != n:
                raise ValueError(f"{name}: {len(self.metadata[name])} values for {n} embeddings")
        self.backend = backend
        self._guide: dict | None = None

    def __len__(self) -> int:
        return len(self.embeddings)

    def guide(self) -> dict:
        """How to read a distance to these references (``smse.similarity.distance_guide``; computed once): the
        distance quantiles of same-type, same-class and other-class reference pairs, and ``ood_threshold``."""
        from smse.similarity import distance_guide

        if self._guide is None:
            m = self.metadata
            self._guide = distance_guide(
                self.embeddings, m["labels"].astype(str), m["tumor_types"].astype(str), m["patients"].astype(str)
            )
        return self._guide

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "torch") -> ReferenceIndex:
        """An index from a ``.npz`` written by ``smse evaluate`` or ``smse embed``.

        Raises:
            DataError: naming the file when it is not such a file: not a NumPy ``.npz``, no ``embeddings`` array,
                embeddings that are not an [N, d] array of finite numbers, or metadata of another length.
        """
        try:
            arrays = load_embeddings(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
        except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # a text file, a file cut short, pickled objects
            raise DataError(f"{path}: not an embeddings .npz of smse embed or smse evaluate ({exc})") from None
        if "embeddings" not in arrays:
            raise DataError(
                f"{path}: holds no 'embeddings' array (it holds {', '.join(sorted(arrays)) or 'none'}); "
                "write the file with smse embed"
            )
        try:
            return cls(arrays["embeddings"], backend, **{k: arrays[k] for k in cls.FIELDS if k in arrays})
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path}: {exc}") from None

    @classmethod
    def from_run(
        cls, run: str | os.PathLike | Run, model: Model | None = None, backend: str | None = None
    ) -> ReferenceIndex:
        """The training and validation images of a run as references (``reference.npz``, computed and saved when
        missing): the images a ``model.classifier=knn`` model votes with."""
        folder = Path(run)
        folder = folder.parent if folder.is_file() else folder
        path = RunFiles(folder).reference
        if not path.exists():
            build_reference(folder, model)
        model_cfg = model.config if model is not None else None
        return cls.load(path, backend or (model_cfg.eval.knn_backend if model_cfg else "torch"))

    def search(self, queries: np.ndarray, k: int = 5, flag_outliers: bool = True) -> Hits:
        """The ``k`` nearest references of each query embedding (one [d] vector or an [N, d] array).

        A ``k`` above the index's size gives every reference, nearest first. ``flag_outliers``: set
        ``Hits.out_of_distribution`` (computing the distance guide on first use); False leaves it None.

        Raises:
            ValueError: ``k`` below 1, queries of another dimension, or non-finite queries.
        """
        from smse.retrieval import search

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k: the number of nearest references must be an integer of at least 1, got {k!r}")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"queries: expected [N, {self.embeddings.shape[1]}] embeddings of this index's model, "
                f"got shape {queries.shape}"
            )
        if not np.isfinite(queries).all():
            raise ValueError("queries: embeddings hold NaN or infinite values")
        from smse.similarity import OOD_K

        dist, idx = search(queries, self.embeddings, max(k, OOD_K) if flag_outliers else k, self.backend)
        ood = None
        if flag_outliers:
            threshold = self.guide()["ood_threshold"]
            kth = dist[:, min(OOD_K, dist.shape[1]) - 1] if dist.shape[1] else np.zeros(len(queries))
            ood = kth > threshold if dist.shape[1] and threshold is not None else np.zeros(len(queries), bool)
            dist, idx = dist[:, :k], idx[:, :k]
        return Hits(dist, idx, **{name: self.metadata[name][idx] for name in self.FIELDS}, out_of_distribution=ood)


def build_reference(run: str | os.PathLike, model: Model | None = None, which: str = "best") -> Path:
    """Embed the training and validation images of a run (from its ``split.csv``) into ``run/reference.npz``."""
    files = RunFiles(run)
    if not files.split.exists():
        raise CheckpointError(f"{run}: no split.csv, so no reference images; is it a run folder written by smse train?")
    model = model or load_model(run, which)
    records = [r for r in files.read_split() if r.split in REFERENCE_SPLITS]
    log.info("embedding %d reference images of %s", len(records), run)
    emb = model.embed([r.path for r in records])
    return files.write_reference(emb, records, model.class_map)


__all__ = [
    "ImageLike",
    "Run",
    "train",
    "Model",
    "load_model",
    "Hits",
    "ReferenceIndex",
    "build_reference",
]
