"""The training objective: weighted classification + metric loss, returned as named parts."""

from __future__ import annotations

import torch
from torch import nn

from smse.losses.classification import ClassificationLoss
from smse.losses.metric import MetricLoss, Tuples
from smse.losses.structure import NeighbourhoodLoss


class Objective(nn.Module):
    """total = w_cls * classification + w_metric * (metric + w_spot * same_spot) + w_structure * structure; each
    part returned for logging.

    ``positives``: the metric loss's positives are images of the anchor's ``class`` (at another magnification),
    of the anchor's own spot (``same-spot``: the same tissue cut at another magnification, no label needed), or
    ``both`` (two terms, the same-spot one weighted ``same_spot_weight``).

    ``structure`` (a ``NeighbourhoodLoss``) keeps the neighbourhoods of the features the embedding is made from;
    ``structure_scope``: ``all`` images of the batch, neighbours within each ``magnification`` only, or all with the
    teacher's features ``centred`` per magnification (``centre_by_group``).

    How many tuples the metric loss saw in the last call is a statistic (``stats()``), not a loss part.
    """

    def __init__(
        self,
        classification: ClassificationLoss,
        metric: MetricLoss | None = None,
        classification_weight: float = 1.0,
        metric_weight: float = 1.0,
        structure: NeighbourhoodLoss | None = None,
        structure_weight: float = 0.0,
        structure_scope: str = "all",
        positives: str = "class",
        same_spot_weight: float = 1.0,
    ):
        super().__init__()
        self.positives = positives  # class | same-spot | both: whose images the metric loss pulls together
        self.same_spot_weight = same_spot_weight
        self.structure_scope = structure_scope
        self.structure = structure if structure_weight > 0 else None
        self.structure_weight = structure_weight
        self.classification = classification
        self.metric = metric
        self.classification_weight = classification_weight
        self.metric_weight = metric_weight

    def forward(
        self,
        emb: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        mags: torch.Tensor | None = None,
        patients: torch.Tensor | None = None,
        tuples: Tuples | None = None,
        classify: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        spots: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``tuples`` are given offline pairs/triplets (paper mode); ``classify`` selects the rows to classify;
        ``features`` are what the embedding was made from (the structure term's teacher); ``spots`` the spot of
        each image (same-spot positives) and ``ignore`` the pairs of overlapping spots, neither positive nor
        negative."""
        rows = slice(None) if classify is None else classify
        cls = self.classification(logits[rows], targets[rows]) if self.classification_weight > 0 else emb.sum() * 0
        parts = {"classification": cls}
        total = self.classification_weight * cls
        if self.metric is not None and self.positives in ("class", "both"):
            metric = self.metric(emb, targets, mags, patients, tuples)
            parts["metric"] = metric
            total = total + self.metric_weight * metric
        if self.metric is not None and self.positives in ("same-spot", "both"):
            if spots is None:
                raise ValueError("same-spot positives need the spot of every image")
            same_spot = self.metric(emb, spots, mags, None, None, ignore)
            parts["same_spot"] = same_spot
            total = (
                total + self.metric_weight * (self.same_spot_weight if self.positives == "both" else 1.0) * same_spot
            )
        if self.structure is not None:
            if features is None:
                raise ValueError("the structure term needs the features the embeddings were made from")
            groups = mags if self.structure_scope == "magnification" else None
            if self.structure_scope == "centred" and mags is not None:
                features = centre_by_group(features, mags)
            structure = self.structure(emb, features, groups)
            parts["structure"] = structure
            total = total + self.structure_weight * structure
        parts["total"] = total
        return parts

    def stats(self) -> dict[str, float]:
        """Statistics of the last call: the number of metric-loss tuples."""
        return {"tuples": float(self.metric.num_tuples)} if self.metric is not None else {}


def centre_by_group(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each row minus the mean of its group's rows in the batch (e.g. magnification: the offset a backbone's
    features carry for the microscope, not for the tissue)."""
    out = features.clone()
    for g in torch.unique(groups):
        rows = groups == g
        out[rows] = features[rows] - features[rows].mean(dim=0, keepdim=True)
    return out


__all__ = [
    "Objective",
    "centre_by_group",
]
