"""Batch samplers. An epoch is ceil(N / batch_size) batches: about one look at each training image, and at
least ``min_batches``, so that a learning-rate schedule counted in epochs also suits a small dataset.

- ``MagnificationBalancedSampler``: every batch holds the same number of images of each
  magnification, classes at their natural frequency, so that every anchor finds positives at
  other magnifications for in-batch mining (the default, deliberate cross-magnification mode).
- ``OfflineTupleSampler``: the original's "paper mode": random triplets (anchor, positive of the
  same class, negative of another class) or pairs drawn from the pooled magnifications, so
  cross-magnification tuples occur only by chance.

Both are deterministic in (seed, epoch), which is what makes an interrupted run resume exactly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    """One global batch: positions in the training set, and for offline tuples their structure.

    Attributes:
        indices: positions in the training set, in batch order.
        tuples: offline tuples as positions within the batch: ``(a, p, n)`` triplets or ``(i, j, y)``
            pairs (y = 1 for a same-class pair); None where the loss mines its own tuples in the batch.
        classify: the batch rows the classification loss sees (None: every row).
    """

    indices: np.ndarray
    tuples: tuple[np.ndarray, ...] | None = None
    classify: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)


class MagnificationBalancedSampler:
    """Global batches of indices, ``batch_size // M`` per magnification (remainder spread).

    With ``patients``, images are drawn (with replacement) with probability inversely proportional
    to their patient's image count at that magnification, so each patient weighs the same whatever
    its number of images, as patient-level accuracy weighs them; otherwise shuffled passes without
    replacement.
    """

    def __init__(
        self,
        targets: Sequence[int],
        mags: Sequence[int],
        batch_size: int,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        patients: Sequence[str] | None = None,
        min_batches: int = 1,
    ):
        self.n = len(targets)
        self.batch_size = batch_size
        self.seed = seed
        pools: dict[int, list[int]] = defaultdict(list)
        for i, m in enumerate(mags):
            pools[int(m)].append(i)
        self.pools = [np.array(pools[m]) for m in sorted(pools)]
        self.weights = None
        if patients is not None:
            self.weights = []
            for pool in self.pools:
                count: dict[str, int] = defaultdict(int)
                for i in pool:
                    count[patients[i]] += 1
                w = np.array([1.0 / count[patients[i]] for i in pool])
                self.weights.append(w / w.sum())
        self.batches = batches_per_epoch or max(min_batches, math.ceil(self.n / batch_size))

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch, 17])
        if self.weights is None:
            streams = [_Stream(pool, rng).take for pool in self.pools]
        else:
            streams = [
                lambda k, pool=pool, w=w: rng.choice(pool, size=k, p=w) for pool, w in zip(self.pools, self.weights)
            ]
        m = len(streams)
        for b in range(self.batches):
            sizes = [self.batch_size // m + (1 if (k + b) % m < self.batch_size % m else 0) for k in range(m)]
            yield Batch(np.concatenate([take(k) for take, k in zip(streams, sizes)]))


class SpotSampler:
    """Global batches of whole spots: every tile of a drawn spot (one per magnification) enters the batch together,
    so every anchor has its own spot at the other magnifications as positives (same-spot positives).

    Spots are drawn in shuffled passes (spots with a single tile cannot serve as anchors and are left out);
    a batch takes spots until it holds ``batch_size`` tiles (the last one cut to fit).
    """

    def __init__(
        self,
        spots: Sequence[int],
        batch_size: int,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        min_batches: int = 1,
    ):
        members: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(spots):
            members[int(s)].append(i)
        self.spots = [np.array(m) for _, m in sorted(members.items()) if len(m) > 1]
        if not self.spots:
            raise ValueError("no spot has tiles at two magnifications")
        self.batch_size, self.seed = batch_size, seed
        tiles = sum(len(m) for m in self.spots)
        self.batches = batches_per_epoch or max(min_batches, math.ceil(tiles / batch_size))

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch, 31])
        stream = _Stream(np.arange(len(self.spots)), rng)
        for _ in range(self.batches):
            chosen: list[np.ndarray] = []
            taken: set[int] = set()
            size = 0
            while size < self.batch_size and len(taken) < len(self.spots):
                k = int(stream.take(1)[0])
                if k in taken:  # a new pass began inside this batch: each spot once per batch
                    continue
                taken.add(k)
                chosen.append(self.spots[k])
                size += len(self.spots[k])
            yield Batch(np.concatenate(chosen)[: self.batch_size])  # a fixed size: the last spot may lose tiles


class OfflineTupleSampler:
    """Random offline triplets or pairs from the pooled training set, as the original code drew them.

    A batch holds the flat index list ``[anchors, positives, negatives]`` (triplets) or
    ``[firsts, seconds]`` (pairs, same class with probability 1/2), the tuples as positions in it,
    and the anchors (first images) as the rows to classify, as in the original.
    """

    def __init__(
        self,
        targets: Sequence[int],
        batch_size: int,
        kind: str = "triplet",
        seed: int = 0,
        batches_per_epoch: int | None = None,
        min_batches: int = 1,
    ):
        self.targets = np.asarray(targets)
        self.kind = kind
        self.arity = 3 if kind == "triplet" else 2
        self.tuples_per_batch = max(1, batch_size // self.arity)
        self.seed = seed
        self.by_class = {c: np.flatnonzero(self.targets == c) for c in np.unique(self.targets)}
        self.batches = batches_per_epoch or max(min_batches, math.ceil(len(self.targets) / self.tuples_per_batch))

    def __len__(self) -> int:
        return self.batches

    def _same(self, c: int, rng) -> int:
        return int(rng.choice(self.by_class[c]))

    def _other(self, c: int, rng) -> int:
        others = [k for k in self.by_class if k != c]
        return int(rng.choice(self.by_class[others[rng.integers(len(others))]]))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch, 29])
        order = rng.permutation(len(self.targets))
        stream = _Stream(order, rng)
        for _ in range(self.batches):
            anchors = stream.take(self.tuples_per_batch)
            t = np.arange(len(anchors))
            cols = [anchors]
            if self.kind == "triplet":
                cols.append(np.array([self._same(self.targets[a], rng) for a in anchors]))
                cols.append(np.array([self._other(self.targets[a], rng) for a in anchors]))
                tuples = (t, t + len(t), t + 2 * len(t))
            else:
                same = rng.random(len(anchors)) < 0.5
                cols.append(
                    np.array(
                        [
                            self._same(self.targets[a], rng) if s else self._other(self.targets[a], rng)
                            for a, s in zip(anchors, same)
                        ]
                    )
                )
                tuples = (t, t + len(t), same.astype(np.int64))
            yield Batch(np.concatenate(cols), tuples, t)


class _Stream:
    """Endless shuffled passes over a pool of indices."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        self.order = rng.permutation(pool)
        self.pos = 0

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self.pos >= len(self.order):
                self.order, self.pos = self.rng.permutation(self.pool), 0
            chunk = self.order[self.pos : self.pos + k]
            out.append(chunk)
            self.pos += len(chunk)
            k -= len(chunk)
        return np.concatenate(out) if out else np.empty(0, dtype=int)


__all__ = [
    "Batch",
    "MagnificationBalancedSampler",
    "OfflineTupleSampler",
]
