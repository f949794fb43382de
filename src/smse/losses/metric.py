"""Pair (contrastive) and triplet losses on embeddings, with in-batch mining across magnifications.

Mining rules: a positive has the anchor's class and, with ``cross_magnification``, another
magnification (and, with ``same_patient``, the anchor's patient); a negative has another class,
at any magnification. Strategies: ``all`` valid tuples, ``semihard`` (negatives farther than the
positive but within the margin), ``hard`` (per anchor, the farthest positive and nearest negative).
"""

from __future__ import annotations

import torch
from torch import nn

from smse.errors import ConfigError

Tuples = tuple[torch.Tensor, ...]


def squared_distances(emb: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances, exact on the diagonal and never negative."""
    sq = (emb * emb).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T
    d2 = d2.clamp_min(0.0)
    return d2 * (1.0 - torch.eye(len(emb), dtype=emb.dtype, device=emb.device))


def tuple_masks(
    labels: torch.Tensor,
    mags: torch.Tensor | None,
    patients: torch.Tensor | None,
    cross_magnification: bool,
    same_patient: bool,
    ignore: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[i, j] is True where j is a valid positive (first mask) or negative (second) for anchor i.

    ``ignore`` [B, B]: pairs that are neither (e.g. two overlapping spots of one slide under same-spot positives).
    """
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool, device=labels.device)
    if cross_magnification and mags is not None:
        pos &= mags[:, None] != mags[None, :]
    if same_patient and patients is not None:
        pos &= patients[:, None] == patients[None, :]
    neg = ~same
    if ignore is not None:
        pos, neg = pos & ~ignore, neg & ~ignore
    return pos, neg


def hardest(emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor, the index of the farthest valid positive and of the nearest valid negative."""
    d2 = squared_distances(emb.detach())
    hp = torch.where(pos, d2, torch.full_like(d2, -1.0)).argmax(dim=1)
    hn = torch.where(neg, d2, torch.full_like(d2, torch.finfo(d2.dtype).max)).argmin(dim=1)
    return hp, hn


def mine_triplets(
    emb: torch.Tensor,
    labels: torch.Tensor,
    mags: torch.Tensor | None = None,
    patients: torch.Tensor | None = None,
    strategy: str = "all",
    margin: float = 1.0,
    cross_magnification: bool = True,
    same_patient: bool = False,
    ignore: torch.Tensor | None = None,
) -> Tuples:
    """Indices (a, p, n) of the triplets of a batch chosen by ``strategy``."""
    with torch.no_grad():
        pos, neg = tuple_masks(labels, mags, patients, cross_magnification, same_patient, ignore)
        if strategy == "hard":
            hp, hn = hardest(emb, pos, neg)
            ok = pos.any(dim=1) & neg.any(dim=1)
            a = torch.nonzero(ok).flatten()
            return a, hp[a], hn[a]
        valid = pos[:, :, None] & neg[:, None, :]
        if strategy == "semihard":
            d2 = squared_distances(emb.detach())
            dap, dan = d2[:, :, None], d2[:, None, :]
            valid &= (dan > dap) & (dan < dap + margin)
        elif strategy != "all":
            raise ConfigError(f"loss.mining: unknown strategy {strategy!r}")
        a, p, n = torch.nonzero(valid, as_tuple=True)
        return a, p, n


def mine_pairs(
    emb: torch.Tensor,
    labels: torch.Tensor,
    mags: torch.Tensor | None = None,
    patients: torch.Tensor | None = None,
    strategy: str = "all",
    margin: float = 1.0,
    cross_magnification: bool = True,
    same_patient: bool = False,
    ignore: torch.Tensor | None = None,
) -> Tuples:
    """Indices (i, j) and same-class flags y of the pairs of a batch chosen by ``strategy``."""
    with torch.no_grad():
        pos, neg = tuple_masks(labels, mags, patients, cross_magnification, same_patient, ignore)
        if strategy == "hard":
            hp, hn = hardest(emb, pos, neg)
            ap = torch.nonzero(pos.any(dim=1)).flatten()
            an = torch.nonzero(neg.any(dim=1)).flatten()
            i = torch.cat([ap, an])
            j = torch.cat([hp[ap], hn[an]])
            y = torch.cat([torch.ones_like(ap), torch.zeros_like(an)])
            return i, j, y
        if strategy == "semihard":  # negatives inside the margin (the only ones with a loss)
            d2 = squared_distances(emb.detach())
            neg = neg & (d2 < margin * margin)
        elif strategy != "all":
            raise ConfigError(f"loss.mining: unknown strategy {strategy!r}")
        pi, pj = torch.nonzero(torch.triu(pos | pos.T, diagonal=1), as_tuple=True)
        ni, nj = torch.nonzero(torch.triu(neg, diagonal=1), as_tuple=True)
        return (torch.cat([pi, ni]), torch.cat([pj, nj]), torch.cat([torch.ones_like(pi), torch.zeros_like(ni)]))


class CrossMagnificationMiner:
    """A miner in pytorch-metric-learning's style: ``miner(embeddings, labels, magnifications)`` -> index tuples.

    Positives have the anchor's class and, with ``cross_magnification``, another magnification (with
    ``same_patient``, also the anchor's patient); negatives have another class, at any magnification.
    Triplets come as ``(anchors, positives, negatives)`` and pairs as ``(a1, positives, a2, negatives)``,
    the formats of PML's ``indices_tuple``, so the tuples feed PML's losses as they are. The count of
    the last call is kept as a statistic (``num_tuples``; also ``num_triplets`` or ``num_pos_pairs`` and
    ``num_neg_pairs``), as PML's miners keep theirs.
    """

    def __init__(
        self,
        kind: str = "triplet",
        strategy: str = "semihard",
        margin: float = 1.0,
        cross_magnification: bool = True,
        same_patient: bool = False,
    ):
        if kind not in ("triplet", "pair"):
            raise ConfigError(f"loss.metric: a miner mines triplets or pairs, not {kind!r}")
        if strategy not in ("all", "semihard", "hard"):
            raise ConfigError(f"loss.mining: unknown strategy {strategy!r}")
        self.kind, self.strategy, self.margin = kind, strategy, margin
        self.cross_magnification, self.same_patient = cross_magnification, same_patient
        self.num_tuples = self.num_triplets = self.num_pos_pairs = self.num_neg_pairs = 0

    def __call__(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        magnifications: torch.Tensor | None = None,
        patients: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
    ) -> Tuples:
        args = (
            embeddings,
            labels,
            magnifications,
            patients,
            self.strategy,
            self.margin,
            self.cross_magnification,
            self.same_patient,
            ignore,
        )
        if self.kind == "triplet":
            tuples = mine_triplets(*args)
            self.num_tuples = self.num_triplets = len(tuples[0])
            return tuples
        tuples = pairs_to_pml(*mine_pairs(*args))
        self.num_pos_pairs, self.num_neg_pairs = len(tuples[0]), len(tuples[2])
        self.num_tuples = self.num_pos_pairs + self.num_neg_pairs
        return tuples


def pairs_to_pml(i: torch.Tensor, j: torch.Tensor, y: torch.Tensor) -> Tuples:
    """Pairs ``(i, j, same-class flag)`` -> PML's ``(a1, positives, a2, negatives)``."""
    same = y.bool()
    return i[same], j[same], i[~same], j[~same]


class MetricLoss(nn.Module):
    """Shared plumbing: mine (or take given) tuples, compute the maths, return the mean.

    ``forward(emb, labels, mags, patients, tuples)`` returns the mean loss over the tuples; how many
    tuples it saw is a statistic, kept in ``num_tuples``.
    """

    kind: str

    def __init__(
        self, margin: float = 1.0, strategy: str = "all", cross_magnification: bool = True, same_patient: bool = False
    ):
        super().__init__()
        self.margin = margin
        self.miner = CrossMagnificationMiner(self.kind, strategy, margin, cross_magnification, same_patient)
        self.num_tuples = 0

    def forward(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        mags: torch.Tensor | None = None,
        patients: torch.Tensor | None = None,
        tuples: Tuples | None = None,
        ignore: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if emb.ndim != 2 or len(emb) != len(labels):
            raise ValueError(f"embeddings {tuple(emb.shape)} and labels {tuple(labels.shape)} do not match")
        return self.loss(emb, labels, mags, patients, tuples, ignore)

    def loss(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        mags: torch.Tensor | None,
        patients: torch.Tensor | None,
        tuples: Tuples | None,
        ignore: torch.Tensor | None,
    ) -> torch.Tensor:
        """The mean over the mined (or given) tuples of ``compute``."""
        if tuples is None:
            tuples = self.miner(emb, labels, mags, patients, ignore)
        # the losses gather from the batch's distance matrix, not from the embeddings: a batch of 128 can
        # mine a million triplets, and [T, d] gathers would cost gigabytes where [T] gathers cost megabytes
        terms = self.compute(squared_distances(emb), *tuples)
        self.num_tuples = len(terms)
        if len(terms) == 0:  # no valid tuple: a zero that keeps the graph
            return emb.sum() * 0.0
        return terms.mean()

    def compute(self, d2: torch.Tensor, *tuples: torch.Tensor) -> torch.Tensor:
        """Per-tuple losses from the [B, B] squared distances ``d2`` of the batch."""
        raise NotImplementedError


class TripletLoss(MetricLoss):
    """max(0, ||f(a) - f(p)||^2 - ||f(a) - f(n)||^2 + m) on tuples ``(a, p, n)``."""

    kind = "triplet"

    def compute(self, d2, a, p, n):
        return torch.relu(d2[a, p] - d2[a, n] + self.margin)


class PairLoss(MetricLoss):
    """1/2 [y d^2 + (1 - y) max(0, m - d)^2], d = ||f(x1) - f(x2)||.

    Tuples are ``(i, j, y)`` with y = 1 for a same-class pair, or PML's ``(a1, p, a2, n)``.
    """

    kind = "pair"

    def compute(self, d2, *tuples):
        if len(tuples) == 4:
            a1, p, a2, n = tuples
            i, j = torch.cat([a1, a2]), torch.cat([p, n])
            y = torch.cat([torch.ones_like(a1), torch.zeros_like(a2)])
        else:
            i, j, y = tuples
        dij = d2[i, j]
        d = torch.sqrt(dij + 1e-12)  # gradient-safe at d = 0
        y = y.to(d2.dtype)
        return 0.5 * (y * dij + (1 - y) * torch.relu(self.margin - d).pow(2))


class InfoNCELoss(MetricLoss):
    """NT-Xent / InfoNCE on cosine similarities s / tau: for every positive pair (a, p),
    -log(exp(s_ap) / (exp(s_ap) + sum over the anchor's negatives n of exp(s_an))), averaged over the pairs.

    Positives and negatives follow the miner's rules (every valid pair: InfoNCE weighs the hard ones itself);
    this is pytorch-metric-learning's ``NTXentLoss`` on the same pairs. ``margin`` is unused.
    """

    kind = "pair"

    def __init__(self, temperature: float = 0.1, cross_magnification: bool = True, same_patient: bool = False, **_):
        super().__init__(1.0, "all", cross_magnification, same_patient)
        self.temperature = temperature

    def loss(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        mags: torch.Tensor | None,
        patients: torch.Tensor | None,
        tuples: Tuples | None,
        ignore: torch.Tensor | None,
    ) -> torch.Tensor:
        with torch.no_grad():
            pos, neg = tuple_masks(
                labels, mags, patients, self.miner.cross_magnification, self.miner.same_patient, ignore
            )
        unit = torch.nn.functional.normalize(emb, dim=1)
        s = unit @ unit.T / self.temperature
        a, p = torch.nonzero(pos, as_tuple=True)
        self.num_tuples = len(a)
        if len(a) == 0:
            return emb.sum() * 0.0
        # log(exp(s_ap) + sum_n exp(s_an)) - s_ap, with each anchor's log-sum over its negatives computed once
        neg_lse = torch.logsumexp(torch.where(neg, s, torch.full_like(s, -torch.inf)), dim=1)
        return (torch.logaddexp(s[a, p], neg_lse[a]) - s[a, p]).mean()


METRIC_LOSSES: dict[str, type[MetricLoss]] = {"pair": PairLoss, "triplet": TripletLoss, "infonce": InfoNCELoss}


def make_metric_loss(name: str, **kwargs) -> MetricLoss | None:
    """The metric loss called ``name`` (``none`` gives None)."""
    if name == "none":
        return None
    if name not in METRIC_LOSSES:
        raise ConfigError(f"loss.metric: unknown metric loss {name!r} (known: none, {', '.join(METRIC_LOSSES)})")
    if name != "infonce":
        kwargs.pop("temperature", None)  # the margin losses have none
    return METRIC_LOSSES[name](**kwargs)


__all__ = [
    "Tuples",
    "mine_triplets",
    "mine_pairs",
    "CrossMagnificationMiner",
    "pairs_to_pml",
    "MetricLoss",
    "TripletLoss",
    "PairLoss",
    "InfoNCELoss",
    "METRIC_LOSSES",
    "make_metric_loss",
]
