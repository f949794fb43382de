from collections import Counter

import numpy as np
import pytest
import torch

from smse.data.samplers import MagnificationBalancedSampler, OfflineTupleSampler
from smse.losses import mine_pairs

TARGETS = [0] * 30 + [1] * 70
MAGS = [40, 100, 200, 400] * 25


def test_magnification_balanced_batches_and_epoch_length():
    s = MagnificationBalancedSampler(TARGETS, MAGS, batch_size=32, seed=3)
    batches = list(s.epoch(0))
    assert len(batches) == len(s) == 4  # ceil(100 / 32): one epoch is about one look at each image
    for b in batches:
        assert len(b) == 32 and Counter(MAGS[i] for i in b.indices) == {40: 8, 100: 8, 200: 8, 400: 8}
        assert b.tuples is None and b.classify is None  # tuples are mined in the batch
    assert all(
        np.array_equal(a.indices, b.indices) for a, b in zip(batches, s.epoch(0))
    )  # deterministic in (seed, epoch)
    assert not np.array_equal(batches[0].indices, next(iter(s.epoch(1))).indices)
    seen = Counter(int(i) for b in batches for i in b.indices)
    assert max(seen.values()) <= 2 and len(seen) >= 90  # without replacement within a pass


def test_offline_triplets_follow_the_paper():
    s = OfflineTupleSampler(TARGETS, batch_size=30, kind="triplet", seed=1)
    for batch in s.epoch(0):
        a, p, n = (batch.indices[t] for t in batch.tuples)  # the sampler yields the tuples itself
        assert all(TARGETS[i] == TARGETS[j] for i, j in zip(a, p))
        assert all(TARGETS[i] != TARGETS[j] for i, j in zip(a, n))
        assert np.array_equal(batch.indices[batch.classify], a)  # the anchors are classified, as in the original
    pairs = OfflineTupleSampler(TARGETS, batch_size=40, kind="pair", seed=1)
    same = []
    for batch in pairs.epoch(0):
        i, j, flag = batch.tuples
        x, y = batch.indices[i], batch.indices[j]
        same += [TARGETS[a] == TARGETS[b] for a, b in zip(x, y)]
        assert [bool(f) for f in flag] == [TARGETS[a] == TARGETS[b] for a, b in zip(x, y)]
    assert 0.3 < np.mean(same) < 0.7  # same class with probability 1/2


def test_hard_pairs_by_loop():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(8, 3, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    mags = torch.tensor([40, 100, 40, 100, 40, 100, 200, 200])
    i, j, y = mine_pairs(emb, labels, mags, strategy="hard")
    d = torch.cdist(emb, emb) ** 2
    for a, b, same in zip(i.tolist(), j.tolist(), y.tolist()):
        if same:
            cands = [k for k in range(8) if k != a and labels[k] == labels[a] and mags[k] != mags[a]]
            assert torch.isclose(d[a, b], max(d[a, k] for k in cands))
        else:
            cands = [k for k in range(8) if labels[k] != labels[a]]
            assert torch.isclose(d[a, b], min(d[a, k] for k in cands))


def test_patient_balanced_batches_weigh_each_patient_the_same():
    # patient A has 30 images per magnification, B and C 5 each: drawn about as often, all the same
    patients = ["A"] * 120 + ["B"] * 20 + ["C"] * 20
    mags = [40, 100, 200, 400] * 40
    targets = [0] * 120 + [1] * 40
    s = MagnificationBalancedSampler(targets, mags, batch_size=64, seed=0, batches_per_epoch=200, patients=patients)
    drawn = Counter(patients[i] for b in s.epoch(0) for i in b.indices)
    assert all(Counter(mags[i] for i in b.indices) == {40: 16, 100: 16, 200: 16, 400: 16} for b in s.epoch(0))
    total = sum(drawn.values())
    assert all(abs(drawn[p] / total - 1 / 3) < 0.02 for p in "ABC"), drawn
    plain = MagnificationBalancedSampler(targets, mags, batch_size=64, seed=0, batches_per_epoch=200)
    by_image = Counter(patients[i] for b in plain.epoch(0) for i in b.indices)
    assert by_image["A"] / total == pytest.approx(0.75, abs=0.02)  # without it, A dominates as its images do
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(s.epoch(3), s.epoch(3)))
