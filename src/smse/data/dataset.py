"""A torch dataset over records: ``(image, target, metadata)`` with patient and magnification."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from smse.data.images import ImageCache, load_resized
from smse.data.records import ClassMap, Record
from smse.data.transforms import augment, to_tensor, view_rng


class RecordDataset(Dataset):
    """Images of ``records`` resized to ``size`` (via the cache when given), optionally augmented.

    Items are ``(image, target, metadata)``; metadata holds ``index``, ``patient`` and
    ``magnification`` so they travel to the metrics without re-parsing file names.
    """

    def __init__(
        self,
        records: Sequence[Record],
        class_map: ClassMap,
        size: tuple[int, int],
        cache: ImageCache | None = None,
        augment: bool = False,
        seed: int = 0,
        interpolation: str = "bilinear",
    ):
        self.records = list(records)
        self.targets = class_map.targets(self.records)
        self.size = (int(size[0]), int(size[1]))
        self.cache = cache
        self.interpolation = cache.interpolation if cache else interpolation
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def array(self, index: int) -> np.ndarray:
        path = self.records[index].path
        return self.cache.load(path) if self.cache else load_resized(path, self.size, self.interpolation)

    def view(self, index: int, view: int) -> torch.Tensor:
        """View 0 is the plain image; view v > 0 a fixed augmentation of it."""
        image = to_tensor(self.array(index))
        return augment(image, view_rng(self.seed, index, view)) if view > 0 else image

    def __getitem__(self, index: int):
        r = self.records[index]
        image = to_tensor(self.array(index))
        if self.augment:
            image = augment(image, view_rng(self.seed + 1000003 * (self.epoch + 1), index, 0))
        return image, self.targets[index], {"index": index, "patient": r.patient, "magnification": r.magnification}


__all__ = [
    "RecordDataset",
]
