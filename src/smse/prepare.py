"""Preparing a run (data, split, model, cached frozen features) and embedding its images; no training here."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from smse.checkpoint import build_model
from smse.config import Config
from smse.data.dataset import RecordDataset
from smse.data.images import ImageCache
from smse.data.loading import LoadedData, cache_dir_of, load_data
from smse.data.records import ClassMap, Record
from smse.features import cached_features, feature_key
from smse.models import Embedder
from smse.progress import batch_sizes
from smse.progress import progress as report_progress
from smse.runtime import Dist, resolve_device
from smse.spots import Spots, grid_magnification

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything a run needs before its first step, or an evaluation before its first forward pass."""

    cfg: Config
    data: LoadedData
    class_map: ClassMap
    model: Embedder
    weights: str
    dataset: RecordDataset
    device: torch.device
    features: torch.Tensor | None = None  # [N, views, F] in frozen mode
    patient_ids: dict[str, int] = field(default_factory=dict)
    spots: Spots | None = None  # the spot of every image, with same-spot positives

    @property
    def records(self) -> list[Record]:
        return self.data.records

    def indices(self, split: str, magnification: int | None = None) -> np.ndarray:
        return np.array(
            [
                i
                for i, r in enumerate(self.records)
                if r.split == split and (magnification is None or r.magnification == magnification)
            ],
            dtype=int,
        )


def prepare(
    cfg: Config,
    dist: Dist = Dist(),
    progress: bool = True,
    data: LoadedData | None = None,
    trained: tuple[Embedder, ClassMap, str] | None = None,
) -> Prepared:
    """Load and split the data, build the model, and (frozen mode) compute or load the cached features.

    Changes no global state: a caller that builds a new model and wants it reproducible seeds first.

    Args:
        trained: a loaded model, its class map and backbone weights id, to use instead of a new model.
    """
    device = resolve_device(cfg.train.device, dist.local_rank)
    data = data or load_data(cfg.data)
    if trained is not None:
        model, class_map, weights = trained
    else:
        class_map = ClassMap.from_records(data.records, cfg.data.task)
        model, weights = build_model(cfg, len(class_map))
    if model.zooms != (1,):
        how = f"model.zooms={cfg.model.zooms}" if trained is None else "as the run was trained"
        log.info(
            "features: the backbone's mean over centre zooms %s (%s): %d backbone passes an image",
            list(model.zooms),
            how,
            len(model.zooms),
        )
    height, width = cfg.data.image_size  # validate() checks it is [height, width]
    size = (height, width)
    cache = ImageCache(cache_dir_of(cfg.data), size, model.interpolation)
    dataset = RecordDataset(data.records, class_map, size, cache, augment=not cfg.model.freeze_backbone, seed=cfg.seed)
    prepared = Prepared(
        cfg,
        data,
        class_map,
        model.to(device),
        weights,
        dataset,
        device,
        patient_ids={p: i for i, p in enumerate(sorted({r.patient for r in data.records}))},
        spots=Spots.of(data.records, grid_magnification(cfg.data.root)) if cfg.sampler.positives != "class" else None,
    )
    if cfg.model.freeze_backbone:
        scaling = f"{model.mean.flatten().tolist()}|{model.std.flatten().tolist()}|{model.interpolation}"
        if model.zooms != (1,):
            scaling += f"|zooms={list(model.zooms)}"
        key = feature_key(data.records, f"{cfg.model.backbone}|{weights}|{scaling}", size, cfg.model.views, cfg.seed)
        if not dist.main:
            dist.barrier()  # the main process fills the cache first; the others then read it
        prepared.features = cached_features(
            model, dataset, cfg.model.views, cache_dir_of(cfg.data), key, device=device, progress=progress
        )
        if dist.main:
            dist.barrier()
    return prepared


@torch.no_grad()
def embed(
    prep: Prepared, indices: Sequence[int] | np.ndarray, batch_size: int = 256, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and class probabilities of the plain view of ``indices`` (from cached features in frozen mode;
    ``progress``: report the way where images go through the backbone)."""
    model = prep.model
    model.eval()
    embs, probs = [], []
    for start in report_progress(
        range(0, len(indices), batch_size),
        desc="embedding images",
        unit="images",
        enabled=progress and prep.features is None,
        weights=batch_sizes(len(indices), batch_size),
    ):
        idx = list(indices[start : start + batch_size])
        if prep.features is not None:
            emb, logits = model.heads(prep.features[idx, 0].to(prep.device))
        else:
            images = torch.stack([prep.dataset.view(i, 0) for i in idx]).to(prep.device)
            emb, logits = model(images)
        embs.append(emb.float().cpu())
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    if not embs:
        return np.zeros((0, prep.cfg.model.embedding_dim)), np.zeros((0, len(prep.class_map)))
    return torch.cat(embs).numpy(), torch.cat(probs).numpy()


__all__ = [
    "Prepared",
    "prepare",
    "embed",
]
