"""Checkpoints: weights as safetensors with their config, class map and preprocessing; written atomically."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smse import __version__
from smse.config import Config, from_dict, to_dict, zooms_of
from smse.data.records import ClassMap
from smse.errors import CheckpointError, ConfigError, OutputError
from smse.io import atomic_path, describe_error
from smse.models import Embedder, Heads, create_backbone

log = logging.getLogger(__name__)

FORMAT = "smse-checkpoint-2"  # 2: EfficientNet-Lite as TensorFlow-padded timm models with their own scaling


def save_checkpoint(
    path: str | Path,
    model: Embedder,
    cfg: Config,
    class_map: ClassMap,
    epoch: int,
    metrics: dict | None = None,
    backbone_weights: str = "",
    state: dict | None = None,
) -> None:
    """Write ``model``'s weights (or ``state``, a state dict of that model) and everything needed to use them."""
    state = {k: v.detach().cpu().contiguous() for k, v in (state or model.state_dict()).items()}
    meta = {
        "format": FORMAT,
        "smse_version": __version__,
        "config": json.dumps(to_dict(cfg)),
        "class_map": json.dumps(class_map.to_dict()),
        "preprocessing": json.dumps(
            {
                "mean": model.mean.flatten().tolist(),
                "std": model.std.flatten().tolist(),
                "image_size": cfg.data.image_size,
                "interpolation": model.interpolation,
                "crop_pct": model.crop_pct,
                "zooms": list(model.zooms),
            }
        ),
        "epoch": str(epoch),
        "metrics": json.dumps(metrics or {}),
        "backbone_weights": backbone_weights,
    }
    with atomic_path(path) as tmp:  # on any failure the previous checkpoint stays as it was
        try:
            save_file(state, str(tmp), metadata=meta)
        except SafetensorError as exc:  # a full disk or a quota reaches us as safetensors' error, not an OSError
            raise OutputError(f"{path}: cannot write the checkpoint ({describe_error(exc)})") from None


def build_model(cfg: Config, num_classes: int, pretrained: bool | None = None) -> tuple[Embedder, str]:
    """Backbone + heads from a config; returns the model and where the backbone weights came from."""
    m = cfg.model
    backbone = create_backbone(
        m.backbone,
        m.pretrained if pretrained is None else pretrained,
        m.checkpoint_path if pretrained is not False else None,
    )
    size = tuple(cfg.data.image_size)
    native = backbone.input_size
    if backbone.fixed_input_size and size != native:
        if native is None:
            raise ConfigError(f"model.backbone: {m.backbone} takes a fixed input size only, but does not say which")
        raise ConfigError(
            f"data.image_size: {m.backbone} takes {native[0]}x{native[1]} images only, not {size[0]}x{size[1]}; "
            f"set data.image_size=[{native[0]}, {native[1]}]"
        )
    if native and size != native:
        log.info("%s: native input %s, images resized to %s", m.backbone, native, size)
    heads = Heads(
        backbone.num_features,
        m.embedding_dim,
        num_classes,
        normalize=m.normalize,
        classifier=m.classifier,
        knn_k=m.knn_k,
    )
    preprocessing = backbone.preprocessing
    if cfg.data.interpolation != "auto":
        preprocessing = dataclasses.replace(preprocessing, interpolation=cfg.data.interpolation)
    return Embedder(backbone.module, heads, preprocessing, zooms_of(cfg)), backbone.weights


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Embedder, Config, ClassMap, dict]:
    """Rebuild the model of a checkpoint file; returns model (eval mode), config, class map and metadata.

    Raises:
        CheckpointError: for a missing or unreadable file, or one from another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format')!r} is not {FORMAT!r} "
            f"(written by smse {meta.get('smse_version', 'unknown')}, this is {__version__})"
        )
    cfg = from_dict(json.loads(meta["config"]))
    class_map = ClassMap.from_dict(json.loads(meta["class_map"]))
    model, _ = build_model(cfg, len(class_map), pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes ({exc})") from None
    prep = json.loads(meta["preprocessing"])
    model.mean.copy_(torch.tensor(prep["mean"]).view(1, 3, 1, 1))
    model.std.copy_(torch.tensor(prep["std"]).view(1, 3, 1, 1))
    model.interpolation = prep.get("interpolation", "bilinear")  # checkpoints before it was recorded: bilinear
    model.crop_pct = prep.get("crop_pct", 1.0)
    model.zooms = tuple(prep.get("zooms", [1]))  # as trained, whatever model.zooms=auto would resolve to now
    return model.to(device).eval(), cfg, class_map, meta


def find_checkpoint(run: str | Path, which: str = "best") -> Path:
    """``run`` may be a run folder (its ``best``/``last`` checkpoint) or a checkpoint file."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise CheckpointError(f"{run}: no such run folder or checkpoint")
    from smse.runfiles import RunFiles

    path = RunFiles(run).checkpoint(which)
    if not path.is_file():
        raise CheckpointError(f"{run}: no {which}.safetensors here; is it a finished smse run folder?")
    return path


__all__ = ["FORMAT", "build_model", "find_checkpoint", "load_checkpoint", "save_checkpoint"]
