"""A saved slide model applied to a new slide's tiles: slide probabilities and each tile's attention."""

from __future__ import annotations

import os

import numpy as np

from smse.data.records import mag_name
from smse.errors import CheckpointError, ConfigError
from smse.mil.bags import bag_of
from smse.mil.models import SlideModel
from smse.mil.train import predict_bags
from smse.runfiles import SlideRunFiles, file_fingerprint


def load_slide_model(folder: str | os.PathLike) -> tuple[SlideModel, dict]:
    """The model of a slide run folder (``smse train-slides --out``) and what was saved with it.

    Raises:
        CheckpointError: naming the file when it is missing, truncated or not a slide model.
    """
    files = SlideRunFiles(folder)
    state = files.read_model()
    cfg = state["config"]
    try:
        model = SlideModel(
            int(state["dimension"]),
            len(state["classes"]),
            cfg["pool"],
            cfg["hidden"],
            cfg["attention_hidden"],
            cfg["dropout"],
        )
        model.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{files.model}: a damaged slide model ({exc})") from None
    return model.eval(), state


def check_tile_model(state: dict, checkpoint: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Refuse tiles embedded by another tile model than the one the slide model learnt from.

    Raises:
        CheckpointError: naming both.
    """
    if file_fingerprint(checkpoint) != state["fingerprint"]:
        raise CheckpointError(
            f"--slide-model {folder}: it was trained on the embeddings of another tile model than {checkpoint} "
            f"(checkpoint fingerprints differ); give the tile checkpoint it was trained with: {_tile_run(folder)}"
        )


def _tile_run(folder: str | os.PathLike) -> str:
    try:
        tile = (SlideRunFiles(folder).read_config() or {}).get("tile_model") or {}
        return str(tile.get("checkpoint") or tile.get("run") or "unknown")
    except (CheckpointError, ValueError):
        return "unknown"


def cross_validated(folder: str | os.PathLike, pool: str) -> dict | None:
    """The slide model's own out-of-fold figures (``eval/metrics.json``): how far to trust its probability."""
    import json

    files = SlideRunFiles(folder)
    try:
        metrics = json.loads(files.metrics.read_text())
        r = metrics["methods"][pool]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out = {"slides": r["slides"], "patients": r["patients"], "accuracy": r["accuracy"], "folds": metrics["folds"]}
    if "roc_auc" in r:
        out["roc_auc"], out["roc_auc_interval"] = r["roc_auc"], r["intervals"]["roc_auc"]
    return out


def score_slide(
    model: SlideModel,
    state: dict,
    slide: str,
    embeddings: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    magnifications: np.ndarray,
) -> dict:
    """The slide's class probabilities under the slide model, and the attention of each tile (in input order).

    Raises:
        ConfigError: tiles of a magnification the slide model never saw.
    """
    axis = [int(m) for m in state["magnifications"]]
    unseen = sorted({int(m) for m in magnifications} - set(axis))
    if unseen:
        raise ConfigError(
            f"--magnifications: the slide model learnt from {', '.join(mag_name(m) for m in axis)} tiles, not "
            f"{', '.join(mag_name(m) for m in unseen)}"
        )
    if embeddings.shape[1] != int(state["dimension"]):
        raise CheckpointError(
            f"the slide model takes {state['dimension']}-dimensional embeddings, the tile model gives "
            f"{embeddings.shape[1]}"
        )
    bag = bag_of(slide, embeddings, xs, ys, magnifications, axis)
    probs, (att,) = predict_bags(model, [bag])
    spot = {(float(x), float(y)): i for i, (x, y) in enumerate(bag.centres)}
    col = {m: j for j, m in enumerate(axis)}
    tile_att = np.array([att[spot[(float(x), float(y))], col[int(m)]] for x, y, m in zip(xs, ys, magnifications)])
    classes = list(state["classes"])
    positive = state["positive"]
    return {
        "classes": classes,
        "probabilities": {c: float(p) for c, p in zip(classes, probs[0])},
        "predicted": classes[int(probs[0].argmax())],
        "positive": positive,
        "probability": float(probs[0][classes.index(positive)]),
        "pool": state["config"]["pool"],
        "attention": tile_att,
    }


__all__ = ["load_slide_model", "check_tile_model", "cross_validated", "score_slide"]
