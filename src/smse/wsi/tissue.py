"""Where the tissue is: Otsu's threshold on the HSV saturation of a thumbnail, cleaned up, and box fractions."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

#: a saturation threshold (0-255) never falls below this: on blank glass Otsu splits the noise
MIN_SATURATION = 20
#: structuring-element radius of the clean-up, in thumbnail pixels
CLEANUP_RADIUS = 2


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of 8-bit values: the cut that maximises the between-class variance.

    Returns the lowest value of the upper class (values >= threshold are foreground).
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)  # pixels below or at each level
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    m1 = m0[-1] - m0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - m1 / w1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(np.argmax(between) + 1)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def tissue_mask(thumbnail: np.ndarray, min_saturation: float = MIN_SATURATION) -> np.ndarray:
    """Boolean tissue mask of an HxWx3 uint8 thumbnail.

    Stained tissue is coloured and glass is grey or white, so tissue is where the HSV saturation
    (smoothed by a Gaussian of 1 pixel) reaches Otsu's threshold, and at least ``min_saturation``
    (so that a slide without tissue stays empty). A closing then an opening with a disk of radius
    ``CLEANUP_RADIUS`` join torn edges and drop specks; holes inside tissue (lumina, fat) are filled.
    """
    saturation = np.asarray(Image.fromarray(thumbnail).convert("HSV"))[..., 1]
    saturation = ndimage.gaussian_filter(saturation, sigma=1.0)
    threshold = max(otsu_threshold(saturation), float(min_saturation))
    mask = saturation >= threshold
    disk = _disk(CLEANUP_RADIUS)
    mask = ndimage.binary_closing(mask, disk, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    return ndimage.binary_opening(mask, disk, border_value=0)


class TissueMap:
    """A tissue mask and its scale, answering "what share of this level-0 box is tissue?" in O(1) a box.

    Args:
        mask: boolean mask (thumbnail pixels).
        scale: level-0 pixels per mask pixel.
    """

    def __init__(self, mask: np.ndarray, scale: float):
        self.mask = mask.astype(bool)
        self.scale = float(scale)
        self._integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def fraction(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
        """Tissue share of each level-0 box [x0, x1) x [y0, y1); the part outside the slide counts as glass."""
        h, w = self.mask.shape
        to = lambda v, n: np.clip(np.rint(np.asarray(v, dtype=np.float64) / self.scale), 0, n).astype(int)  # noqa: E731
        c0, c1, r0, r1 = to(x0, w), to(x1, w), to(y0, h), to(y1, h)
        s = self._integral
        inside = s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]
        area = np.maximum((np.asarray(x1, float) - x0) * (np.asarray(y1, float) - y0) / self.scale**2, 1e-9)
        return np.clip(inside / area, 0.0, 1.0)


__all__ = [
    "otsu_threshold",
    "tissue_mask",
    "TissueMap",
]
