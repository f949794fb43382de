"""The embedding network: backbone -> embedding head -> classifier head, returning both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smse.models.backbones import Preprocessing


class Heads(nn.Module):
    """Embedding head (Linear, optional L2 normalisation) and classifier head (PReLU + Linear)."""

    def __init__(self, num_features: int, embedding_dim: int, num_classes: int, normalize: bool = True):
        super().__init__()
        self.embed = nn.Linear(num_features, embedding_dim)
        self.classify = nn.Sequential(nn.PReLU(), nn.Linear(embedding_dim, num_classes))
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(features)
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
