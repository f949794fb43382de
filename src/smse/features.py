"""Frozen-backbone features computed once per backbone, image and view, and kept on disk."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smse.data.dataset import RecordDataset
from smse.data.records import Record
from smse.io import atomic_path
from smse.models import Embedder
from smse.progress import batch_sizes
from smse.progress import progress as report_progress

#: Bumped whenever the way features are computed changes (architecture, preprocessing, augmented views),
#: so that no stale cache entry is ever served.
FEATURES_VERSION = 2


def feature_key(records: Sequence[Record], backbone_id: str, size: Sequence[int], views: int, seed: int) -> str:
    """A key that changes with the backbone weights, image size, views, seed or any file's bytes on disk."""
    h = hashlib.sha1(json.dumps([FEATURES_VERSION, backbone_id, list(size), views, seed]).encode())
    for r in records:
        st = os.stat(r.path)
        h.update(f"{r.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def compute_features(
    model: Embedder,
    dataset: RecordDataset,
    views: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Backbone features of view 0 (plain) .. views-1 (fixed augmentations) of every image: [N, views, F] float32."""
    model.eval().to(device)
    out = []
    pairs = [(i, v) for i in range(len(dataset)) for v in range(views)]
    for start in report_progress(
        range(0, len(pairs), batch_size),
        desc="backbone features",
        unit="image views",
        enabled=progress,
        weights=batch_sizes(len(pairs), batch_size),
    ):
        chunk = pairs[start : start + batch_size]
        images = torch.stack([dataset.view(i, v) for i, v in chunk]).to(device)
        out.append(model.features(images).float().cpu())
    feats = torch.cat(out) if out else torch.empty(0, 0)
    return feats.view(len(dataset), views, -1)


def cached_features(
    model: Embedder,
    dataset: RecordDataset,
    views: int,
    cache_dir: str | Path,
    key: str,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """``compute_features`` through an on-disk cache (safetensors, written atomically)."""
    path = Path(cache_dir) / "features" / f"{key}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))["features"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            path.unlink(missing_ok=True)
    feats = compute_features(model, dataset, views, batch_size, device, progress)
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp))
    return feats


__all__ = [
    "feature_key",
    "cached_features",
]
