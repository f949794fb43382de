"""Run configuration: dataclasses, YAML files, dotted command-line overrides, validation by field name."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from smse.errors import ConfigError
from smse.io import read_text, write_text


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: ``low`` and ``high`` bounds, each inclusive unless ``open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"{'<' if self.high_open else '<='} {high}"


def _number(value: float | None) -> str:
    return "" if value is None else str(int(value)) if float(value).is_integer() else f"{value:g}"


def ranged(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A dataclass field whose value ``validate`` keeps within a range (None, where allowed, passes)."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open)})


SEED_MAX = 2**32 - 1

# the choices of every field that takes one of a few words: written once, here; validation and the
# error messages read them from these types
SplitMethod = Literal["auto", "seeded", "fold-file", "manifest"]  # auto: a manifest's split column if it has one
DataFormat = Literal["auto", "breakhis", "manifest"]
Task = Literal["binary", "type"]
Duplicates = Literal["prefer-ductal", "drop-conflicts", "keep"]
Classifier = Literal["head", "knn"]  # head: PReLU + linear on the embedding; knn: vote of the nearest references
ClassificationLossName = Literal["rfl", "ce", "balanced-ce", "focal", "ohem"]
MetricLossName = Literal["none", "pair", "triplet", "infonce"]  # infonce: NT-Xent on cosine / temperature
Mining = Literal["all", "semihard", "hard"]
SamplerMode = Literal["cross-magnification", "pooled", "single"]
#: whose images are positives of the metric loss: the anchor's class, its own spot at another magnification
#: (tiles from `smse tiles`: the manifest's slide,x,y; no label needed), or both
Positives = Literal["class", "same-spot", "both"]
SamplerBalance = Literal["none", "patient"]  # patient: each patient drawn as often, whatever its image count
Device = Literal["auto", "cpu", "cuda", "mps"]
KnnBackend = Literal["torch", "faiss"]  # faiss: pip install 'smse[faiss]'
# the neighbourhood term's neighbours: every image of the batch, those of the image's own magnification only, or
# every image with the teacher's features centred per magnification (the microscope's offset removed)
StructureScope = Literal["all", "magnification", "centred"]
#: how images are resized; auto: the backbone's own (timm's data config: bicubic for most ImageNet weights)
Interpolation = Literal["auto", "bilinear", "bicubic", "lanczos", "nearest"]


@dataclass
class SplitConfig:
    """How images are divided into train / val / test, always by patient."""

    method: SplitMethod = "auto"
    fold_file: str | None = None
    fold: int = ranged(1, 1)
    test_fraction: float = ranged(0.3, 0, 1, low_open=True, high_open=True)
    val_fraction: float = ranged(0.15, 0, 1, high_open=True)
    seed: int = ranged(0, 0, SEED_MAX)


@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    root: str = "smse-demo/data"
    format: DataFormat = "auto"
    task: Task = "binary"
    magnifications: list[int] | None = None
    image_size: list[int] = field(default_factory=lambda: [128, 192])
    interpolation: Interpolation = "auto"
    duplicates: Duplicates = "prefer-ductal"
    skip_bad: bool = False
    cache_dir: str | None = None
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ModelConfig:
    """Backbone, embedding and classifier heads."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    checkpoint_path: str | None = None
    embedding_dim: int = ranged(128, 1, 65536)
    normalize: bool = True
    freeze_backbone: bool = True
    views: int = ranged(4, 1, 256)
    standardize: bool = True  # frozen mode: features standardised by the training images' mean and std
    #: the features are the backbone's mean over centre crops of 1/z of each side (z in zooms), enlarged back
    #: to the image size: [1] is the plain image; [1, 2, 4] puts a tile and its spot's tiles at 2x and 4x the
    #: magnification on shared terms (same-spot localisation), at len(zooms) times the backbone's cost;
    #: auto: [1, 2, 4] with sampler.positives same-spot or both, [1] otherwise (see ``zooms_of``)
    zooms: list[int] | Literal["auto"] = "auto"
    classifier: Classifier = "head"
    knn_k: int = ranged(15, 1, 100_000)


@dataclass
class LossConfig:
    """Classification loss, metric loss and their weights."""

    classification: ClassificationLossName = "rfl"
    metric: MetricLossName = "pair"
    margin: float = ranged(1.0, 0, 100, low_open=True)
    alpha: float = ranged(2.0, 0, 1000, low_open=True)
    gamma: float = ranged(1.2, 0, 100)
    balance: bool = True
    ohem_keep: float = ranged(0.5, 0, 1, low_open=True)
    mining: Mining = "semihard"
    metric_weight: float = ranged(1.0, 0, 1000)
    classification_weight: float = ranged(1.0, 0, 1000)
    structure_weight: float = ranged(0.0, 0, 1000)  # keeps the heads' input features' neighbourhoods (0: off)
    structure_temperature: float = ranged(0.1, 0, 100, low_open=True)
    structure_scope: StructureScope = "all"
    temperature: float = ranged(0.1, 0, 100, low_open=True)  # of loss.metric=infonce
    same_spot_weight: float = ranged(1.0, 0, 1000)  # with sampler.positives=both: the same-spot term's weight


@dataclass
class SamplerConfig:
    """How training batches are drawn."""

    mode: SamplerMode = "cross-magnification"
    positives: Positives = "class"
    balance: SamplerBalance = "none"
    same_patient: bool = False
    magnification: int = ranged(100, 1)
    batch_size: int = ranged(64, 2, 1_000_000)


@dataclass
class TrainConfig:
    """Optimiser, schedule and hardware."""

    epochs: int = ranged(30, 1, 1_000_000)
    lr: float = ranged(1e-3, 0, 10, low_open=True)
    weight_decay: float = ranged(1e-4, 0, 1)
    step_size: int = ranged(8, 1)
    lr_gamma: float = ranged(0.1, 0, 1, low_open=True)
    device: Device = "auto"
    amp: bool = True
    num_workers: int = ranged(0, 0, 1024)
    deterministic: bool = True  # bit-identical reruns; false lets torch pick faster nondeterministic kernels
    batches_per_epoch: int | None = ranged(None, 1, 1_000_000_000)  # None: ceil(images / batch), at least ...
    min_batches_per_epoch: int = ranged(10, 1, 1_000_000)  # ... this many, so small sets train long enough


@dataclass
class EvalConfig:
    """Evaluation extras."""

    knn_k: int = ranged(5, 1, 100_000)
    knn_backend: KnnBackend = "torch"


#: the schemes of MLflow tracking stores (a plain folder is MLflow's retired file store)
MLFLOW_SCHEMES = ("sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql")


@dataclass
class LogConfig:
    """Where a run is tracked besides its own folder (off by default)."""

    tensorboard: bool = False  # event files in RUN/tensorboard: pip install 'smse[tensorboard]'
    mlflow: str | None = None  # a tracking URI (sqlite:///mlflow.db, http://host:5000): pip install 'smse[mlflow]'
    mlflow_experiment: str = "smse"


@dataclass
class Config:
    """A whole run."""

    seed: int = ranged(0, 0, SEED_MAX)
    out: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _choices(cls: type | None = None, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Dotted field name -> its allowed words, for every ``Literal`` field (nested sections too)."""
    cls = cls or Config
    out: dict[str, tuple[str, ...]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out.update(_choices(hint, f"{prefix}{f.name}."))
        elif typing.get_origin(hint) is Literal:
            out[f"{prefix}{f.name}"] = typing.get_args(hint)
    return out


# every spelling of a decimal number: 1e-3, 1E-3, .5, 5., 1.0e+20, -2 (YAML 1.1 reads some of them as strings)
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _short(value: Any, most: int = 80) -> str:
    """``repr(value)``, cut to ``most`` characters: an error line names a value, it does not echo a long one."""
    text = repr(value)
    return text if len(text) <= most else f"{text[: most - 5]}...{text[-1]}"


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
                if isinstance(value, (list, tuple)) and typing.get_origin(arg) is list:
                    raise  # a list that fails the list's rule: that rule's own message (e.g. naming the item)
                errors.append(str(exc))
        words = [w for arg in args if typing.get_origin(arg) is Literal for w in typing.get_args(arg)]
        if words and len(errors) > 1:  # e.g. a list or auto: say both, not only the first
            lists = ["a list"] if any(typing.get_origin(arg) is list for arg in args) else []
            raise ConfigError(f"{name}: expected {' or '.join(lists + list(words))}, got {_short(value)}")
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
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
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name] or {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _convert(data[f.name], hint, f"{prefix}{f.name}")
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Check value ranges and choices; raise ``ConfigError`` naming the field."""
    flat = to_flat(cfg)
    for name, allowed in CHOICES.items():  # also for values set in Python after loading
        if flat[name] not in allowed:
            raise ConfigError(f"{name}: {flat[name]!r} is not one of {', '.join(allowed)}")
    for name, bounds, value in _ranged_fields(cfg):
        if value is not None and value not in bounds:
            raise ConfigError(f"{name}: must be {bounds}, got {value!r}")
    if len(cfg.data.image_size) != 2 or not all(16 <= v <= 8192 for v in cfg.data.image_size):
        raise ConfigError(f"data.image_size: expected [height, width] of 16 to 8192 px, got {cfg.data.image_size}")
    zooms = cfg.model.zooms
    if zooms == "auto":
        zooms = list(zooms_of(cfg))
    elif (
        not isinstance(zooms, list)
        or not zooms
        or len(zooms) > 8
        or len(set(zooms)) != len(zooms)
        or not all(isinstance(z, int) and not isinstance(z, bool) and 1 <= z <= 16 for z in zooms)
    ):
        raise ConfigError(
            f"model.zooms: auto, or one to eight different whole numbers from 1 to 16 such as [1, 2, 4], "
            f"got {_short(zooms)}"
        )
    if min(cfg.data.image_size) / max(zooms) < 8:
        auto = cfg.model.zooms == "auto"
        resolved = f" (auto: {zooms} with sampler.positives={cfg.sampler.positives})" if auto else ""
        raise ConfigError(
            f"model.zooms: a zoom of {max(zooms)}{resolved} leaves a crop under 8 px of the "
            f"{min(cfg.data.image_size)} px side of data.image_size; set model.zooms=[1] or a larger data.image_size"
        )
    if cfg.data.split.method == "fold-file" and not cfg.data.split.fold_file:
        raise ConfigError("data.split.fold_file: required when data.split.method is fold-file")
    if cfg.log.mlflow and cfg.log.mlflow.split("://", 1)[0] not in MLFLOW_SCHEMES:
        raise ConfigError(
            f"log.mlflow: {cfg.log.mlflow!r} is not a tracking URI smse can log to; give sqlite:///mlflow.db "
            "(a local store that works offline) or a server's http(s)://host:port (MLflow no longer writes "
            "folders of files)"
        )
    if cfg.data.magnifications is not None and min(cfg.data.magnifications, default=1) < 1:
        raise ConfigError(f"data.magnifications: must be positive, got {cfg.data.magnifications}")
    return cfg


#: ``model.zooms=auto`` with spot positives: a tile's field, its centre half and its centre quarter (the
#: fields of the same spot at 2x and 4x the magnification). On a real slide, localisation top-1 64.5% for
#: the frozen features so pooled against 13.6% for the plain ones (BENCHMARKS.md, "Same-spot positives").
SPOT_ZOOMS = (1, 2, 4)


def zooms_of(cfg: Config) -> tuple[int, ...]:
    """The centre zooms whose features the model averages: ``model.zooms``, with ``auto`` resolved."""
    return resolve_zooms(cfg.model.zooms, cfg.sampler.positives)


def resolve_zooms(zooms: list[int] | str, positives: str) -> tuple[int, ...]:
    """``model.zooms`` given ``sampler.positives``: ``auto`` is ``SPOT_ZOOMS`` with spot positives, else (1,)."""
    if zooms == "auto":
        return SPOT_ZOOMS if positives in ("same-spot", "both") else (1,)
    return tuple(int(z) for z in zooms)


def _ranged_fields(obj: Any, prefix: str = "") -> list[tuple[str, Range, Any]]:
    """(dotted name, range, value) of every field declared with ``ranged``, in nested sections too."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_ranged_fields(value, f"{prefix}{f.name}."))
        elif "range" in f.metadata:
            out.append((f"{prefix}{f.name}", f.metadata["range"], value))
    return out


def from_dict(data: dict) -> Config:
    return validate(_build(Config, data))


def build_checked(cls: type, data: dict, prefix: str = "") -> Any:
    """Any config dataclass from a dict: unknown fields, types, choices and ranges refused naming the field."""
    obj = _build(cls, data, prefix)
    for name, bounds, value in _ranged_fields(obj, prefix):
        if value is not None and value not in bounds:
            raise ConfigError(f"{name}: must be {bounds}, got {value!r}")
    return obj


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
            reason = " ".join(str(exc).split())  # one line: YAML's message spans several
            raise ConfigError(f"{key}: cannot parse {text!r} ({reason})") from None
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
            data = yaml.safe_load(read_text(path, ConfigError)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected sections such as train: and data:, got {type(data).__name__}")
    return from_dict(apply_overrides(data, overrides))


def save_config(cfg: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


CHOICES = _choices()


__all__ = [
    "SplitConfig",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "SamplerConfig",
    "TrainConfig",
    "EvalConfig",
    "LogConfig",
    "Config",
    "validate",
    "from_dict",
    "build_checked",
    "to_dict",
    "to_flat",
    "packaged_configs",
    "load_config",
    "save_config",
    "CHOICES",
    "SPOT_ZOOMS",
    "resolve_zooms",
    "zooms_of",
]
