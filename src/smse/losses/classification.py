"""Classification losses on logits: the reinforced focal loss and the baselines it is compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smse.errors import ConfigError


def class_balance(counts: Sequence[int]) -> torch.Tensor:
    """Normalised inverse class frequencies beta_c (summing to 1).

    Binary: beta_benign = #malignant / N and beta_malignant = #benign / N, as in the method.
    """
    counts_t = torch.as_tensor(counts, dtype=torch.float64)
    if (counts_t <= 0).any():
        raise ConfigError(f"class counts must all be positive to balance them, got {list(counts)}")
    inv = 1.0 / counts_t
    return (inv / inv.sum()).float()


class ClassificationLoss(nn.Module):
    """Shared plumbing: per-class weights as a buffer, per-sample losses, mean over the batch."""

    beta: torch.Tensor  # a buffer, registered in __init__; declared so that type checkers know it is a Tensor

    def __init__(self, beta: torch.Tensor | None = None, alpha: float = 1.0, gamma: float = 0.0):
        super().__init__()
        self.register_buffer("beta", beta if beta is not None else torch.empty(0), persistent=False)
        self.alpha = alpha
        self.gamma = gamma

    def weights(self, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.beta.numel() == 0:
            return torch.ones(len(targets), dtype=dtype, device=targets.device)
        return self.beta.to(dtype)[targets]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if len(logits) == 0:
            return logits.sum() * 0.0
        return self.per_sample(logits, targets).mean()

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ReinforcedFocalLoss(ClassificationLoss):
    """beta_t * alpha * (1 - p_t)^gamma on the softmax probability of the true class (no log term)."""

    def per_sample(self, logits, targets):
        p_t = F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
        return self.weights(targets, logits.dtype) * self.alpha * (1.0 - p_t).clamp_min(0).pow(self.gamma)


class FocalLoss(ClassificationLoss):
    """Lin et al.: -beta_t * alpha * (1 - p_t)^gamma * log p_t."""

    def per_sample(self, logits, targets):
        logp_t = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
        p_t = logp_t.exp()
        return -self.weights(targets, logits.dtype) * self.alpha * (1.0 - p_t).clamp_min(0).pow(self.gamma) * logp_t


class CrossEntropy(ClassificationLoss):
    """Cross-entropy, weighted per class by beta when given (class-balanced CE)."""

    def per_sample(self, logits, targets):
        return self.weights(targets, logits.dtype) * F.cross_entropy(logits, targets, reduction="none")


class OHEMLoss(ClassificationLoss):
    """Online hard-example mining: cross-entropy of the hardest ``keep`` fraction only (easy ones discarded)."""

    def __init__(self, beta=None, alpha=1.0, gamma=0.0, keep: float = 0.5):
        super().__init__(beta, alpha, gamma)
        self.keep = keep

    def forward(self, logits, targets):
        if len(logits) == 0:
            return logits.sum() * 0.0
        losses = F.cross_entropy(logits, targets, reduction="none")
        k = max(1, int(round(self.keep * len(losses))))
        return losses.topk(k).values.mean()


CLASSIFICATION_LOSSES = {
    "rfl": ReinforcedFocalLoss,
    "focal": FocalLoss,
    "ce": CrossEntropy,
    "balanced-ce": CrossEntropy,
    "ohem": OHEMLoss,
}


def make_classification_loss(
    name: str,
    class_counts: Sequence[int],
    alpha: float = 2.0,
    gamma: float = 1.2,
    balance: bool = True,
    ohem_keep: float = 0.5,
) -> ClassificationLoss:
    """Build a classification loss; ``balance`` gives RFL and focal their beta_t from ``class_counts``.

    Plain ``ce`` and ``ohem`` ignore alpha, gamma and balance; ``balanced-ce`` uses beta scaled to mean 1.
    """
    if name not in CLASSIFICATION_LOSSES:
        raise ConfigError(f"loss.classification: unknown loss {name!r} (known: {', '.join(CLASSIFICATION_LOSSES)})")
    beta = class_balance(class_counts)
    if name == "ce":
        return CrossEntropy()
    if name == "balanced-ce":
        return CrossEntropy(beta * len(beta))
    if name == "ohem":
        return OHEMLoss(keep=ohem_keep)
    return CLASSIFICATION_LOSSES[name](beta if balance else None, alpha, gamma)


__all__ = [
    "class_balance",
    "ClassificationLoss",
    "ReinforcedFocalLoss",
    "FocalLoss",
    "CrossEntropy",
    "OHEMLoss",
    "CLASSIFICATION_LOSSES",
    "make_classification_loss",
]
