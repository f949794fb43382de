"""Slide-level models over bags of tile embeddings: gated attention (ABMIL), spot-then-slide attention, mean, max.

A bag is one slide (or case): ``x`` [B, S, M, D] holds the embeddings of its S spots (tile centres) at M
magnifications, ``mask`` [B, S, M] says which of them exist (a spot may lack a magnification; bags of one
mini-batch are padded to the largest S). Every model returns logits [B, C] and a tile attention [B, S, M]:
non-negative weights summing to 1 over each bag's tiles, what the heat map shows.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

Pool = Literal["attention", "multimag", "mean", "max"]
POOLS: tuple[str, ...] = get_args(Pool)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``mask`` holds; 0 elsewhere, and 0 for a row with nothing in it."""
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0) * mask


class GatedAttention(nn.Module):
    """Gated attention of Ilse et al. (2018): a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weights [..., K] over the instances h [..., K, dim] where ``mask`` [..., K] holds."""
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)
        return masked_softmax(scores, mask)


class SlideModel(nn.Module):
    """Instance projection, a pooling rule, a linear classifier.

    Pools:
        attention: gated attention over every tile of the bag, whatever its magnification (ABMIL / CLAM
            single branch).
        multimag: first a gated attention across the magnifications of one spot (its tiles become one spot
            vector), then a gated attention over the spots; a tile's weight is its spot's weight times its
            share within the spot.
        mean: the mean of the projected tiles (attention: uniform).
        max: the element-wise max of the projected tiles (attention: each tile's share of the features
            where it is the max).
    """

    def __init__(
        self,
        dim: int,
        classes: int,
        pool: Pool = "attention",
        hidden: int = 128,
        attention_hidden: int = 64,
        dropout: float = 0.25,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool: one of {', '.join(POOLS)}, got {pool!r}")
        self.pool = pool
        self.project = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attention_hidden)
        self.spot_attention = GatedAttention(hidden, attention_hidden) if pool == "multimag" else None
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and tile attention [B, S, M] of bags ``x`` [B, S, M, D] with ``mask`` [B, S, M]."""
        b, s, m, _ = x.shape
        h = self.project(x)  # [B, S, M, H]
        maskf = mask.to(h.dtype)
        if self.pool == "attention":
            a = self.attention(h.reshape(b, s * m, -1), mask.reshape(b, s * m))
            z = torch.einsum("bk,bkh->bh", a, h.reshape(b, s * m, -1))
            att = a.reshape(b, s, m)
        elif self.pool == "multimag":
            assert self.spot_attention is not None
            within = self.spot_attention(h, mask)  # [B, S, M], softmax over the magnifications of a spot
            spots = torch.einsum("bsm,bsmh->bsh", within, h)
            a = self.attention(spots, mask.any(-1))  # [B, S]
            z = torch.einsum("bs,bsh->bh", a, spots)
            att = a[..., None] * within
        elif self.pool == "mean":
            count = maskf.sum((1, 2)).clamp(min=1.0)
            z = (h * maskf[..., None]).sum((1, 2)) / count[:, None]
            att = maskf / count[:, None, None]
        else:
            flat = h.masked_fill(~mask[..., None], float("-inf")).reshape(b, s * m, -1)
            z = flat.max(1).values
            z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
            winner = flat.argmax(1)  # [B, H]: the tile that gives each feature its max
            votes = torch.zeros(b, s * m, dtype=h.dtype, device=h.device)
            votes.scatter_add_(1, winner, torch.ones_like(winner, dtype=h.dtype))
            att = (votes / votes.sum(1, keepdim=True).clamp(min=1.0)).reshape(b, s, m) * maskf
        return self.classifier(z), att


__all__ = ["POOLS", "Pool", "GatedAttention", "SlideModel", "masked_softmax"]
