"""Seeded augmentations on uint8 arrays: flips, 180-degree turns and light colour jitter."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1).div_(255.0).contiguous()


def augment(image: torch.Tensor, rng: np.random.Generator, jitter: float = 0.1) -> torch.Tensor:
    """Random flips and brightness / contrast / saturation jitter of a 3xHxW image in [0, 1]."""
    if rng.random() < 0.5:
        image = image.flip(-1)
    if rng.random() < 0.5:
        image = image.flip(-2)
    if jitter > 0:
        b, c, s = 1.0 + rng.uniform(-jitter, jitter, size=3)
        image = image * b
        mean = image.mean()
        image = (image - mean) * c + mean
        gray = image.mean(dim=0, keepdim=True)
        image = (image - gray) * s + gray
    return image.clamp_(0.0, 1.0)


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
    """The generator of augmented view ``view`` of image ``index``: same numbers on every run."""
    return np.random.default_rng([seed, index, view])
