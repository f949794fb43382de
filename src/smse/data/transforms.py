"""Seeded augmentations for H&E images: flips, 180-degree turns, and stain jitter in optical density.

Stain jitter (``hed_jitter``) follows Tellez et al. (2018, "HED-light"): the image is unmixed into
haematoxylin, eosin and a residual channel by the Ruifrok-Johnston matrix (the one behind
skimage's ``rgb2hed``), each channel's concentration is scaled by 1 + a and shifted by b with
a, b ~ U(-sigma, sigma), and the image is mixed back. It imitates the stain variation between
laboratories and slides, the nuisance that separates real patients most.
"""

from __future__ import annotations

import numpy as np
import torch

#: Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), exactly skimage's ``rgb_from_hed``.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_EPS = 1e-6


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1).div_(255.0).contiguous()


def rgb_to_hed(image: torch.Tensor) -> torch.Tensor:
    """3xHxW RGB in [0, 1] -> 3xHxW stain concentrations (optical density unmixed, as skimage's rgb2hed)."""
    od = -torch.log(image.clamp_min(_EPS)) / np.log(10.0)
    return torch.einsum("chw,cd->dhw", od.double(), HED_FROM_RGB).to(image.dtype)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Stain concentrations -> RGB in [0, 1] (the inverse of ``rgb_to_hed``)."""
    od = torch.einsum("dhw,dc->chw", hed.double(), RGB_FROM_HED)
    return torch.pow(10.0, -od).clamp(0.0, 1.0).to(hed.dtype)


def hed_jitter(image: torch.Tensor, rng: np.random.Generator, sigma: float = 0.05) -> torch.Tensor:
    """Scale and shift each stain's concentration by factors drawn from ``rng`` (see the module docstring)."""
    scale = 1.0 + rng.uniform(-sigma, sigma, size=3)
    shift = rng.uniform(-sigma, sigma, size=3)
    hed = rgb_to_hed(image)
    hed = hed * torch.tensor(scale, dtype=hed.dtype).view(3, 1, 1) + torch.tensor(shift, dtype=hed.dtype).view(3, 1, 1)
    return hed_to_rgb(hed)


def augment(image: torch.Tensor, rng: np.random.Generator, sigma: float = 0.05) -> torch.Tensor:
    """Random horizontal and vertical flips (both: a 180-degree turn) and HED stain jitter of a 3xHxW [0, 1] image."""
    if rng.random() < 0.5:
        image = image.flip(-1)
    if rng.random() < 0.5:
        image = image.flip(-2)
    if sigma > 0:
        image = hed_jitter(image, rng, sigma)
    return image.clamp_(0.0, 1.0)


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
    """The generator of augmented view ``view`` of image ``index``: same numbers on every run."""
    return np.random.default_rng([seed, index, view])


__all__ = [
    "to_tensor",
    "rgb_to_hed",
    "hed_to_rgb",
    "hed_jitter",
    "augment",
    "view_rng",
]
