"""The training objective: weighted classification + metric loss, returned as named parts."""

from __future__ import annotations

import torch
from torch import nn

from smse.losses.classification import ClassificationLoss
from smse.losses.metric import MetricLoss, Tuples


class Objective(nn.Module):
    """total = w_cls * classification + w_metric * metric; each part returned for logging.

    How many tuples the metric loss saw in the last call is a statistic (``stats()``), not a loss part.
    """

    def __init__(self, classification: ClassificationLoss, metric: MetricLoss | None = None,
                 classification_weight: float = 1.0, metric_weight: float = 1.0):
        super().__init__()
        self.classification = classification
        self.metric = metric
        self.classification_weight = classification_weight
        self.metric_weight = metric_weight

    def forward(self, emb: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                mags: torch.Tensor | None = None, patients: torch.Tensor | None = None,
                tuples: Tuples | None = None, classify: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``tuples`` are given offline pairs/triplets (paper mode); ``classify`` selects the rows to classify."""
        rows = slice(None) if classify is None else classify
        cls = self.classification(logits[rows], targets[rows])
        parts = {"classification": cls}
        total = self.classification_weight * cls
        if self.metric is not None:
            metric = self.metric(emb, targets, mags, patients, tuples)
            parts["metric"] = metric
            total = total + self.metric_weight * metric
        parts["total"] = total
        return parts

    def stats(self) -> dict[str, float]:
        """Statistics of the last call: the number of metric-loss tuples."""
        return {"tuples": float(self.metric.num_tuples)} if self.metric is not None else {}
