"""Bags of tile embeddings, one per slide: the spots (tile centres) of a slide at every magnification."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smse.data.records import mag_name
from smse.errors import DataError
from smse.wsi.export import SlideLabel


@dataclass
class Bag:
    """One slide's tiles, spot by spot.

    Attributes:
        slide: the slide's name.
        patient: its patient (slides of one patient fall on one side of a split).
        label: the slide's label ("" where unknown: a bag to predict).
        features: [S, M, D] tile embeddings; zeros where a spot lacks a magnification.
        mask: [S, M] True where the tile exists.
        centres: [S, 2] level-0 (x, y) of every spot.
        magnifications: the M axis.
        positive: [S, M] the tile classifier's probability of the positive class (NaN where absent or unknown).
    """

    slide: str
    patient: str
    label: str
    features: np.ndarray
    mask: np.ndarray
    centres: np.ndarray
    magnifications: tuple[int, ...]
    positive: np.ndarray

    @property
    def tiles(self) -> int:
        return int(self.mask.sum())


def bag_of(
    slide: str,
    embeddings: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    magnifications: np.ndarray,
    axis: Sequence[int],
    positive: np.ndarray | None = None,
    patient: str = "",
    label: str = "",
) -> Bag:
    """The bag of one slide's tiles: tiles sharing a centre (x, y) form a spot; ``axis`` orders magnifications."""
    centres, spot = np.unique(np.stack([xs, ys], 1), axis=0, return_inverse=True)
    spot = spot.reshape(-1)
    index = {m: i for i, m in enumerate(axis)}
    col = np.array([index[int(m)] for m in magnifications], dtype=np.int64)
    features = np.zeros((len(centres), len(axis), embeddings.shape[1]), np.float32)
    mask = np.zeros((len(centres), len(axis)), bool)
    pos = np.full((len(centres), len(axis)), np.nan, np.float32)
    features[spot, col] = embeddings
    mask[spot, col] = True
    if positive is not None:
        pos[spot, col] = positive
    return Bag(slide, patient or slide, label, features, mask, centres, tuple(int(m) for m in axis), pos)


def _names(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(sorted(names)[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def match_labels(slides: Sequence[str], labels: Mapping[str, SlideLabel], where: str) -> dict[str, SlideLabel]:
    """Each tiled slide's label; a label file's slide may be written with its file suffix.

    Raises:
        DataError: naming the slides without a label, and the labelled slides that have no tiles.
    """
    by_stem = {}
    for name, value in labels.items():
        by_stem[name] = value
        by_stem.setdefault(Path(name).stem, value)
    missing = [s for s in slides if s not in by_stem]
    if missing:
        raise DataError(f"{where}: no label for {len(missing)} tiled slide(s): {_names(missing)}; add them")
    tiled = set(slides)
    unknown = [n for n in labels if n not in tiled and Path(n).stem not in tiled]
    if unknown:
        raise DataError(
            f"{where}: {len(unknown)} labelled slide(s) have no tiles in the manifest: {_names(unknown)} "
            "(not tiled, or no tissue found); tile them or remove them from the labels"
        )
    return {s: by_stem[s] for s in slides}


def bags_from_embeddings(
    arrays: Mapping[str, np.ndarray],
    labels: Mapping[str, SlideLabel] | None,
    positive_class: str | None,
    where: str = "the tile manifest",
    labels_where: str = "--labels",
) -> list[Bag]:
    """One bag per slide from a ``save_embeddings`` file's arrays (tiles with ``slide,x,y``).

    Args:
        arrays: embeddings, slides, xs, ys, magnifications and, where the tile model has classes,
            probabilities and class_names.
        labels: slide -> label (None: bags without labels).
        positive_class: the class whose tile probability is kept (the mean-probability rule's score).

    Raises:
        DataError: tiles without a slide or centre, slides without labels or labels without tiles.
    """
    if "slides" not in arrays:
        raise DataError(f"{where}: tiles without slide,x,y columns; slide-level learning needs the tiles of smse tiles")
    slides = arrays["slides"].astype(str)
    xs, ys = arrays["xs"].astype(np.float64), arrays["ys"].astype(np.float64)
    bad = (slides == "") | ~np.isfinite(xs) | ~np.isfinite(ys)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} tile(s) without a slide or centre (x, y)")
    mags = arrays["magnifications"].astype(np.int64)
    axis = sorted({int(m) for m in mags})
    positive = None
    if positive_class is not None and "probabilities" in arrays:
        names = [str(c) for c in arrays["class_names"]]
        if positive_class in names:
            positive = arrays["probabilities"][:, names.index(positive_class)]
    slide_names, first, inverse = np.unique(slides, return_index=True, return_inverse=True)
    by_slide = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])  # one pass
    rows_of = {str(slide_names[k]): by_slide[k] for k in np.argsort(first)}  # in the order the slides first appear
    names_in_order = list(rows_of)
    matched = match_labels(names_in_order, labels, labels_where) if labels is not None else {}
    bags = []
    for name in names_in_order:
        rows = rows_of[name]
        label = matched.get(name)
        bags.append(
            bag_of(
                name,
                arrays["embeddings"][rows],
                xs[rows],
                ys[rows],
                mags[rows],
                axis,
                None if positive is None else positive[rows],
                patient=label.patient if label else name,
                label=label.label if label else "",
            )
        )
    return bags


def collate(bags: Sequence[Bag]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags padded to the largest spot count: features [B, S, M, D] and mask [B, S, M] (padding masked out)."""
    s = max(len(b.centres) for b in bags)
    m, d = bags[0].features.shape[1:]
    x = np.zeros((len(bags), s, m, d), np.float32)
    mask = np.zeros((len(bags), s, m), bool)
    for i, b in enumerate(bags):
        x[i, : len(b.centres)] = b.features
        mask[i, : len(b.centres)] = b.mask
    return torch.from_numpy(x), torch.from_numpy(mask)


def describe(bags: Sequence[Bag]) -> str:
    """A line on the bags: slides, tiles, spots per slide, magnifications."""
    tiles = [b.tiles for b in bags]
    spots = [len(b.centres) for b in bags]
    mags = ", ".join(mag_name(m) for m in bags[0].magnifications) if bags else "-"
    return (
        f"{len(bags)} slides, {sum(tiles)} tiles at {mags}; {min(spots)}-{max(spots)} spots a slide "
        f"(median {int(np.median(spots))})"
    )


__all__ = ["Bag", "bag_of", "bags_from_embeddings", "collate", "describe", "match_labels"]
