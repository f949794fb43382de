"""The embedding network: backbone -> embedding head -> classifier head, returning both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smse.models.backbones import Preprocessing


class Heads(nn.Module):
    """Feature standardisation, embedding head (Linear, optional L2 normalisation), classifier head (PReLU + Linear).

    The standardisation (``feature_mean``, ``feature_std``) is the identity until ``standardize_from``
    sets it from training features; it is part of the weights, so checkpoints carry it.
    """

    def __init__(self, num_features: int, embedding_dim: int, num_classes: int, normalize: bool = True):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.embed = nn.Linear(num_features, embedding_dim)
        self.classify = nn.Sequential(nn.PReLU(), nn.Linear(embedding_dim, num_classes))
        self.normalize = normalize

    @torch.no_grad()
    def standardize_from(self, features: torch.Tensor) -> None:
        """Set the standardisation to the per-feature mean and standard deviation of ``features`` [N, F]."""
        features = features.reshape(-1, features.shape[-1]).double()
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(self.feature_std))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed((features - self.feature_mean) / self.feature_std)
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return emb, self.classify(emb)


class Embedder(nn.Module):
    """Images in [0, 1] -> (embedding, logits). Preprocessing lives inside, so checkpoints carry it."""

    def __init__(self, backbone: nn.Module, heads: Heads, preprocessing: Preprocessing):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.features(images))
