"""Neighbourhood preservation: the embedding keeps the similarity structure of the features it is made from.

A metric loss on two classes, with a classification loss beside it, pulls every image of a class
towards one point: class retrieval becomes perfect and the embedding forgets the tissue (which
tumour type, which architecture). This term distils the input features' neighbourhoods into the
embedding, in the manner of similarity-preserving and relational knowledge distillation (Tung &
Mori 2019; Park et al. 2019) and of stochastic neighbour embedding: within a batch, each image's
distribution over the others by cosine similarity of the features (the teacher, no gradient) is
matched by its distribution by cosine similarity of the embeddings (the student), in KL divergence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NeighbourhoodLoss(nn.Module):
    """mean_i KL(P_i || Q_i), P_i(j) = softmax_j(cos(x_i, x_j) / t), Q_i(j) = softmax_j(cos(e_i, e_j) / t), j != i
    (and, with ``groups``, j in i's group).

    Args:
        temperature: t, the same for teacher and student; lower values weigh the nearest neighbours more.

    Shapes: ``embeddings`` [B, d], ``features`` [B, F] (the teacher; detached here); returns a scalar.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(
        self, embeddings: torch.Tensor, features: torch.Tensor, groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``groups`` [B] (e.g. magnifications): neighbours only within an image's own group, so the term keeps
        each group's neighbourhoods and says nothing of distances across groups; rows with fewer than two
        neighbours in their group are left out."""
        if embeddings.ndim != 2 or features.ndim != 2 or len(embeddings) != len(features):
            raise ValueError(f"embeddings {tuple(embeddings.shape)} and features {tuple(features.shape)} do not match")
        n = len(embeddings)
        allowed = ~torch.eye(n, dtype=torch.bool, device=embeddings.device)
        if groups is not None:
            allowed &= groups[:, None] == groups[None, :]
        rows = allowed.sum(dim=1) >= 2  # a distribution over one other image is always exact
        if not rows.any():
            return embeddings.sum() * 0.0

        def log_neighbours(x):
            x = F.normalize(x, dim=1)
            sim = (x @ x.T / self.temperature).masked_fill(~allowed, float("-inf"))
            return sim[rows].log_softmax(dim=1)

        teacher = log_neighbours(features.detach().to(embeddings.dtype))
        student = log_neighbours(embeddings)
        mask = allowed[rows]
        terms = torch.where(mask, teacher.exp() * (teacher - student), torch.zeros_like(teacher))
        return terms.sum(dim=1).mean()


__all__ = [
    "NeighbourhoodLoss",
]
