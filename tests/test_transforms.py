"""Augmentations: the stain unmixing against skimage and a plain per-pixel loop, and the jitter's properties."""

import math

import numpy as np
import pytest
import torch

from smse.data.transforms import augment, hed_jitter, hed_to_rgb, rgb_to_hed, view_rng

DTYPES = [torch.float32, torch.float64]


def loop_rgb_to_hed(image):
    """Per pixel: optical density, then the inverse of the Ruifrok-Johnston matrix."""
    rows = [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]
    inverse = np.linalg.inv(np.array(rows))
    c, h, w = image.shape
    out = np.zeros((3, h, w))
    for y in range(h):
        for x in range(w):
            od = [-math.log10(max(float(image[k, y, x]), 1e-6)) for k in range(3)]
            for d in range(3):
                out[d, y, x] = sum(od[k] * inverse[k, d] for k in range(3))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_stain_unmixing_matches_a_loop_and_inverts(dtype):
    image = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.9 + 0.05
    hed = rgb_to_hed(image)
    assert hed.dtype == dtype
    np.testing.assert_allclose(hed.double().numpy(), loop_rgb_to_hed(image), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hed_to_rgb(hed).numpy(), image.numpy(), atol=1e-5)


def test_stain_unmixing_agrees_with_skimage():
    skimage_color = pytest.importorskip("skimage.color")
    image = np.random.default_rng(1).uniform(0.05, 0.95, (6, 7, 3))
    ours = rgb_to_hed(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    # skimage measures density in units of -log(1e-6) and clips negative concentrations at 0
    theirs = skimage_color.rgb2hed(image) * (np.log(1e-6) / -np.log(10.0))
    np.testing.assert_allclose(np.maximum(ours, 0), theirs, atol=1e-6)


def test_hed_jitter_moves_stains_not_geometry_and_is_seeded():
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    a = hed_jitter(image, np.random.default_rng(5), sigma=0.05)
    b = hed_jitter(image, np.random.default_rng(5), sigma=0.05)
    assert torch.equal(a, b) and not torch.equal(a, image)
    assert 0.0 < (a - image).abs().mean() < 0.1
    assert torch.equal(hed_jitter(image, np.random.default_rng(5), sigma=0.0), hed_to_rgb(rgb_to_hed(image)))
    corr = np.corrcoef(a.flatten().numpy(), image.flatten().numpy())[0, 1]
    assert corr > 0.9  # the tissue is the same, only its colours moved
    out = augment(image.clone(), view_rng(0, 3, 1))
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
