"""The embedding network: backbone -> embedding head -> classifier, returning both.

The classifier is ``model.classifier``: ``head``, the paper's PReLU + linear layer on the embedding,
or ``knn``, the vote of the ``model.knn_k`` nearest training images (the references) in the
embedding: what a user sees as "the most similar cases" is then exactly what decides the class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smse.models.backbones import Preprocessing

#: vote shares are smoothed by this many votes per class, so that no probability is exactly 0 or 1
KNN_PRIOR_VOTES = 0.5


class Heads(nn.Module):
    """Feature standardisation, embedding head (Linear, optional L2 normalisation), classifier.

    The standardisation (``feature_mean``, ``feature_std``) is the identity until ``standardize_from``
    sets it from training features; it is part of the weights, so checkpoints carry it. So are the
    k-NN classifier's references (``ref_embeddings`` [R, d], ``ref_targets`` [R]), set by
    ``set_references``; their size is whatever a checkpoint holds.

    In training mode the logits are the linear head's (the classification loss trains the embedding
    through it); in eval mode with ``classifier="knn"`` and references set, they are the log of the
    smoothed vote shares of the ``knn_k`` nearest references (Euclidean distance, ties to the earlier
    reference). In eval mode the logits are divided by ``temperature`` (1 until ``calibrate`` fits it).
    """

    # buffers, registered in __init__; declared so that type checkers know they are Tensors
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    ref_embeddings: torch.Tensor
    ref_targets: torch.Tensor
    temperature: torch.Tensor

    def __init__(
        self,
        num_features: int,
        embedding_dim: int,
        num_classes: int,
        normalize: bool = True,
        classifier: str = "head",
        knn_k: int = 15,
    ):
        super().__init__()
        if classifier not in ("head", "knn"):
            raise ValueError(f"classifier must be head or knn, not {classifier!r}")
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.register_buffer("ref_embeddings", torch.zeros(0, embedding_dim))
        self.register_buffer("ref_targets", torch.zeros(0, dtype=torch.long))
        # temperature scaling of the logits (Guo et al. 2017), fitted on validation patients after training; 1: none
        self.register_buffer("temperature", torch.ones(()))
        self.embed = nn.Linear(num_features, embedding_dim)
        self.classify = nn.Sequential(nn.PReLU(), nn.Linear(embedding_dim, num_classes))
        self.normalize = normalize
        self.classifier, self.knn_k, self.num_classes = classifier, knn_k, num_classes

    @torch.no_grad()
    def standardize_from(self, features: torch.Tensor) -> None:
        """Set the standardisation to the per-feature mean and standard deviation of ``features`` [N, F]."""
        features = features.reshape(-1, features.shape[-1]).double()
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(
            features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(self.feature_std)
        )

    @torch.no_grad()
    def set_references(self, embeddings: torch.Tensor, targets: torch.Tensor) -> None:
        """The k-NN classifier's references: embeddings [R, d] and their class indices [R]."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed.out_features or len(embeddings) != len(targets):
            raise ValueError(
                f"references {tuple(embeddings.shape)} with {len(targets)} targets do not fit "
                f"embeddings of dimension {self.embed.out_features}"
            )
        self.ref_embeddings = embeddings.detach().to(self.feature_mean.device, torch.float32).clone()
        self.ref_targets = targets.detach().to(self.feature_mean.device, torch.long).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # references take the size of what is loaded; a checkpoint without them loads with none
        for name, empty in (
            ("ref_embeddings", torch.zeros(0, self.embed.out_features)),
            ("ref_targets", torch.zeros(0, dtype=torch.long)),
        ):
            incoming = state_dict.setdefault(prefix + name, empty)
            setattr(self, name, torch.empty_like(incoming, device=self.feature_mean.device))
        state_dict.setdefault(prefix + "temperature", torch.ones(()))  # written before calibration existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std

    def forward(self, features: torch.Tensor, return_inputs: bool = False):
        """(embedding, logits), and with ``return_inputs`` the standardised features the embedding was made from."""
        x = self.standardized(features)
        emb = self.embed(x)
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        if not self.training and self.classifier == "knn" and len(self.ref_targets):
            logits = self.knn_logits(emb)
        else:
            logits = self.classify(emb)
        if not self.training:
            logits = logits / self.temperature.to(logits.dtype)
        return (emb, logits, x) if return_inputs else (emb, logits)

    def knn_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """log((votes + KNN_PRIOR_VOTES) / (k + C * KNN_PRIOR_VOTES)) of the k nearest references."""
        refs = self.ref_embeddings.to(emb.dtype)
        d2 = (emb * emb).sum(1, keepdim=True) + (refs * refs).sum(1)[None, :] - 2.0 * emb @ refs.T
        k = min(self.knn_k, len(refs))
        # a stable order: distance first, then reference index (topk alone may break ties either way)
        order = torch.argsort(d2.clamp_min(0), dim=1, stable=True)[:, :k]
        votes = F.one_hot(self.ref_targets[order], self.num_classes).sum(1).to(emb.dtype)
        return torch.log((votes + KNN_PRIOR_VOTES) / (k + self.num_classes * KNN_PRIOR_VOTES))


def zoom_crop(images: torch.Tensor, zoom: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The centre 1/``zoom`` of each side of ``images`` [B, C, H, W], enlarged back to H x W (``zoom`` 1: as is).

    A tile at magnification m and the same spot's tile at 2m (or 4m) show the same tissue once the first
    is zoomed 2x (4x): the mean of a backbone's features over zooms 1, 2, 4 shares terms across a tile's
    magnifications that plain features do not (``model.zooms``).
    """
    if zoom == 1:
        return images
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    mode = {"lanczos": "bicubic"}.get(interpolation, interpolation)  # torch has no Lanczos
    crop = images[..., top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(h, w), mode=mode, align_corners=None if mode == "nearest" else False)


class Embedder(nn.Module):
    """Images in [0, 1] -> (embedding, logits). Preprocessing lives inside, so checkpoints carry it."""

    mean: torch.Tensor  # buffers, registered in __init__; declared so that type checkers know they are Tensors
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, heads: Heads, preprocessing: Preprocessing, zooms: tuple[int, ...] = (1,)):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        self.interpolation = preprocessing.interpolation  # how its images are resized, in training and inference
        self.crop_pct = preprocessing.crop_pct  # timm's evaluation crop, recorded for timm users (smse does not crop)
        self.zooms = tuple(zooms)  # model.zooms: the features are their mean over these centre zooms

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features of ``images`` [B, 3, H, W] in [0, 1]; with ``zooms`` other than (1,), their
        mean over the image's centre crops of 1/z of each side, resized back to H x W (see ``zoom_crop``)."""
        x = (images - self.mean) / self.std
        if self.zooms == (1,):
            return self.backbone(x)
        return torch.stack([self.backbone(zoom_crop(x, z, self.interpolation)) for z in self.zooms]).mean(0)

    def forward(self, images: torch.Tensor, return_inputs: bool = False):
        return self.heads(self.features(images), return_inputs)


__all__ = ["KNN_PRIOR_VOTES", "Embedder", "Heads", "zoom_crop"]
