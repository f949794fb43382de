"""Run configuration: dataclasses, YAML files, dotted command-line overrides, validation by field name."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from smse.errors import ConfigError


@dataclass
class SplitConfig:
    """How images are divided into train / val / test, always by patient."""

    method: str = "seeded"  # seeded | fold-file | manifest
    fold_file: str | None = None
    fold: int = 1
    test_fraction: float = 0.3
    val_fraction: float = 0.15
    seed: int = 0


@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    root: str = "smse-demo/data"
    format: str = "auto"  # auto | breakhis | manifest
    task: str = "binary"  # binary | type
    magnifications: list[int] | None = None
    image_size: list[int] = field(default_factory=lambda: [128, 192])
    duplicates: str = "prefer-ductal"
    skip_bad: bool = False
    cache_dir: str | None = None
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ModelConfig:
    """Backbone, embedding and classifier heads."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    checkpoint_path: str | None = None
    embedding_dim: int = 128
    normalize: bool = True
    freeze_backbone: bool = True
    views: int = 4


@dataclass
class LossConfig:
    """Classification loss, metric loss and their weights."""

    classification: str = "rfl"  # rfl | ce | balanced-ce | focal | ohem
    metric: str = "triplet"  # none | pair | triplet
    margin: float = 1.0
    alpha: float = 2.0
    gamma: float = 1.2
    balance: bool = True
    ohem_keep: float = 0.5
    mining: str = "semihard"  # all | semihard | hard
    metric_weight: float = 1.0
    classification_weight: float = 1.0


@dataclass
class SamplerConfig:
    """How training batches are drawn."""

    mode: str = "cross-magnification"  # cross-magnification | pooled | single
    same_patient: bool = False
    magnification: int = 100
    batch_size: int = 64


@dataclass
class TrainConfig:
    """Optimiser, schedule and hardware."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    step_size: int = 8
    lr_gamma: float = 0.1
    device: str = "auto"  # auto | cpu | cuda | mps
    amp: bool = True
    num_workers: int = 0
    deterministic: bool = True  # bit-identical reruns; false lets torch pick faster nondeterministic kernels
    batches_per_epoch: int | None = None


@dataclass
class EvalConfig:
    """Evaluation extras."""

    knn_k: int = 5
    knn_backend: str = "torch"  # torch | faiss (pip install 'smse[faiss]')


@dataclass
class Config:
    """A whole run."""

    seed: int = 0
    out: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "data.split.method": ("seeded", "fold-file", "manifest"),
    "data.format": ("auto", "breakhis", "manifest"),
    "data.task": ("binary", "type"),
    "data.duplicates": ("prefer-ductal", "drop-conflicts", "keep"),
    "loss.classification": ("rfl", "ce", "balanced-ce", "focal", "ohem"),
    "loss.metric": ("none", "pair", "triplet"),
    "loss.mining": ("all", "semihard", "hard"),
    "sampler.mode": ("cross-magnification", "pooled", "single"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "eval.knn_backend": ("torch", "faiss"),
}
POSITIVE = ("model.embedding_dim", "model.views", "sampler.batch_size", "train.epochs", "train.lr",
            "train.step_size", "loss.margin", "loss.alpha", "eval.knn_k")
NON_NEGATIVE = ("loss.gamma", "loss.metric_weight", "loss.classification_weight", "train.weight_decay",
                "data.split.val_fraction", "train.num_workers")


def _convert(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a type hint, converting int -> float; raise naming ``name``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported type {hint}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name] or {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _convert(data[f.name], hint, f"{prefix}{f.name}")
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Check value ranges and choices; raise ``ConfigError`` naming the field."""
    flat = to_flat(cfg)
    for name, allowed in CHOICES.items():
        if flat[name] not in allowed:
            raise ConfigError(f"{name}: {flat[name]!r} is not one of {', '.join(allowed)}")
    for name in POSITIVE:
        if not flat[name] > 0:
            raise ConfigError(f"{name}: must be positive, got {flat[name]!r}")
    for name in NON_NEGATIVE:
        if flat[name] < 0:
            raise ConfigError(f"{name}: must not be negative, got {flat[name]!r}")
    if not 0 < cfg.data.split.test_fraction < 1:
        raise ConfigError(f"data.split.test_fraction: must lie in (0, 1), got {cfg.data.split.test_fraction}")
    if cfg.data.split.val_fraction >= 1:
        raise ConfigError(f"data.split.val_fraction: must be below 1, got {cfg.data.split.val_fraction}")
    if len(cfg.data.image_size) != 2 or min(cfg.data.image_size) < 16:
        raise ConfigError(f"data.image_size: expected [height, width] of at least 16 px, got {cfg.data.image_size}")
    if not 0 < cfg.loss.ohem_keep <= 1:
        raise ConfigError(f"loss.ohem_keep: must lie in (0, 1], got {cfg.loss.ohem_keep}")
    if cfg.data.split.method == "fold-file" and not cfg.data.split.fold_file:
        raise ConfigError("data.split.fold_file: required when data.split.method is fold-file")
    if cfg.sampler.batch_size < 2:
        raise ConfigError(f"sampler.batch_size: must be at least 2, got {cfg.sampler.batch_size}")
    return cfg


def from_dict(data: dict) -> Config:
    return validate(_build(Config, data))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_flat(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like field.name=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse {text!r} ({exc})") from None
    return data


PACKAGED = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package (``demo``, ``breakhis``, ...)."""
    return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (a file, or the name of a packaged one such as ``breakhis``), apply overrides, validate.

    Args:
        path: a YAML file, a packaged config name, or None for the defaults.
        overrides: dotted ``field.name=value`` strings, values parsed as YAML.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            packaged = PACKAGED / f"{path.name.removesuffix('.yaml')}.yaml"
            if path.parent != Path(".") or not packaged.is_file():
                raise ConfigError(f"{path}: config file not found (packaged configs: {', '.join(packaged_configs())})")
            path = packaged
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return from_dict(apply_overrides(data, overrides))


def save_config(cfg: Config, path: str | Path) -> None:
    from smse.io import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
