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


def flips_of(image):
    """The four images ``augment`` may turn ``image`` into before the jitter, by (horizontal, vertical) flip."""
    return {
        (h, v): image.flip(-1)
        if h and not v
        else image.flip(-2)
        if v and not h
        else image.flip(-1).flip(-2)
        if h
        else image
        for h in (False, True)
        for v in (False, True)
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_augment_is_a_seeded_flip_then_a_gentle_stain_jitter(dtype):
    """``augment`` = random flips (each with probability 1/2) then ``hed_jitter``, all from the one generator.

    Catches: augment returning values outside [0,1] or a rescaled/shifted image hidden by its final clamp
    (the old test only asserted the clamped range); a view that is not reproducible from its seed; flips that
    never happen, always happen, or transpose/rotate by 90 degrees instead; a jitter that is skipped, applied
    twice, or applied at another strength; augment editing its input in place; a changed shape or dtype.
    Planted and verified: ``image * 1.4 + 0.05`` before the clamp, the "vertical" flip flipping the horizontal
    axis again, and the jitter skipped (sigma forced to 0); the old range-only assertion passed all three.
    """
    image = (torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(4)) * 0.8 + 0.1).to(dtype)
    original = image.clone()
    flips = flips_of(image)
    seen = set()
    for index in range(40):
        out = augment(image, view_rng(0, index, 1))
        assert out.shape == image.shape and out.dtype == dtype
        assert torch.equal(image, original)  # the input is left as it was
        assert torch.equal(out, augment(image.clone(), view_rng(0, index, 1)))  # the same view every time
        # replay the generator: two flip coins, then the jitter's draws
        rng = view_rng(0, index, 1)
        key = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        seen.add(key)
        flipped = flips[key]
        expected = hed_jitter(flipped, rng, 0.05)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
        # a gentle colour change of the flipped tissue, never the plain image, never a rescaled one
        assert 0.0 < (out - flipped).abs().mean() < 0.1
        assert abs(float(out.mean() - image.mean())) < 0.1
        assert np.corrcoef(out.flatten().double().numpy(), flipped.flatten().double().numpy())[0, 1] > 0.9
    assert seen == set(flips)  # every flip combination occurs among 40 views
    assert not torch.equal(augment(image, view_rng(0, 0, 1)), augment(image, view_rng(0, 0, 2)))  # views differ


def test_augment_without_jitter_only_flips():
    """sigma = 0: the output is exactly one of the four flips of the input, with every pixel value kept.

    Catches: a clamp hiding values outside [0, 1] (e.g. a 255 scale or an offset) - here nothing may change
    but the pixel order; flips implemented as a rotation by 90 degrees or a transpose.
    """
    image = torch.rand(3, 10, 14, generator=torch.Generator().manual_seed(6))
    flips = flips_of(image)
    for index in range(12):
        rng = view_rng(3, index, 1)
        key = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        out = augment(image.clone(), view_rng(3, index, 1), sigma=0.0)
        assert torch.equal(out, flips[key])
        assert torch.equal(out.flatten().sort().values, image.flatten().sort().values)
    # values outside [0, 1] cannot come out, and values inside are never altered by the clamp
    edge = torch.zeros(3, 4, 4)
    edge[:, :2] = 1.0
    assert torch.equal(
        augment(edge.clone(), view_rng(0, 0, 1), sigma=0.0).sort(dim=-2).values, edge.sort(dim=-2).values
    )
