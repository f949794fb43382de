"""Spots of tissue: the tiles that ``smse tiles`` cuts around one slide location at several magnifications.

Same-spot positives (``sampler.positives=same-spot``) pull the tiles of one spot together; their negatives
are the other spots, except the spots of the same slide whose tiles at the highest magnification overlap
the anchor's (they show the same cells, so they are neither positives nor negatives). Spots whose
lower-magnification tiles overlap are negatives: telling a spot from its neighbour one field away is what
localisation asks (on a real slide, ignoring every spot whose 100X tiles overlapped the anchor's lowered
localisation top-1 from 73% to 60%). Tiles sit one per grid cell at the grid magnification, so the grid
step (the smallest distance between two spot centres of a slide, per axis) is a cell; a tile at
magnification m spans grid / m cells; two spots overlap when their centres are closer than that span of
the highest magnification on both axes (with the grid at the highest magnification: never).

Cross-magnification localisation measures what same-spot training is for: for each tile at magnification
m, all tiles at another magnification m' are ranked by distance (within its slide, and over the whole
set); top-1 / top-5 is the share of queries whose own spot's m' tile ranks first / in the first five.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smse.data.records import Record, mag_name
from smse.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def grid_magnification(manifest: str | Path) -> int | None:
    """The grid magnification of ``smse tiles`` output (``tiles.json`` beside the manifest), or None."""
    meta = Path(manifest).parent / "tiles.json"
    try:
        return int(json.loads(meta.read_text())["tiling"]["grid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Spots:
    """Per image: its spot id, slide id and level-0 centre; per slide: the overlap span (level-0 px, x and y)."""

    spot: np.ndarray  # [N] int
    slide: np.ndarray  # [N] int
    xy: np.ndarray  # [N, 2] float
    span: np.ndarray  # [slides, 2] float

    @classmethod
    def of(cls, records: Sequence[Record], grid: int | None = None) -> Spots:
        """The spots of ``records``.

        Raises:
            DataError: when some image has no ``slide,x,y`` (naming one), or no spot has two magnifications.
        """
        missing = [r for r in records if r.spot is None]
        if missing:
            raise DataError(
                f"sampler.positives: same-spot positives need every image's slide,x,y (the manifest columns "
                f"`smse tiles` writes); {len(missing)} of {len(records)} images have none, e.g. {missing[0].path}"
            )
        spot_names = sorted({r.spot for r in records if r.spot})
        slide_names = sorted({r.slide for r in records if r.slide})
        spot_id = {s: i for i, s in enumerate(spot_names)}
        slide_id = {s: i for i, s in enumerate(slide_names)}
        spot = np.array([spot_id[r.spot] for r in records if r.spot], dtype=np.int64)
        slide = np.array([slide_id[r.slide] for r in records if r.slide], dtype=np.int64)
        xy = np.array([[r.x, r.y] for r in records], dtype=np.float64)
        mags = np.array([r.magnification for r in records])
        if np.bincount(spot).max(initial=0) < 2:
            raise DataError(
                "sampler.positives: same-spot positives need spots cut at two magnifications or more; "
                f"every one of the {len(spot_names)} spots has a single tile (tile with --magnifications 100X,400X)"
            )
        span = np.zeros((len(slide_names), 2))
        for s in range(len(slide_names)):
            rows = slide == s
            known = mags[rows][mags[rows] > 0]
            highest = known.max() if len(known) else 1
            narrowest = (grid or highest) / highest  # the highest magnification's tile, in grid cells
            for axis in (0, 1):
                steps = np.diff(np.unique(xy[rows, axis]))
                span[s, axis] = (steps.min() if len(steps) else 0.0) * narrowest
        return cls(spot, slide, xy, span)

    def ignore(self, idx: np.ndarray) -> torch.Tensor:
        """[B, B] True for two images of ``idx`` on overlapping, distinct spots of one slide."""
        slide, xy, spot = self.slide[idx], self.xy[idx], self.spot[idx]
        span = self.span[slide]
        near = (np.abs(xy[:, None, :] - xy[None, :, :]) < span[:, None, :]).all(axis=2)
        return torch.from_numpy((slide[:, None] == slide[None, :]) & near & (spot[:, None] != spot[None, :]))


def check_positives(records: Sequence[Record], positives: str, labelled: bool, metric: str = "pair") -> None:
    """Refuse a configuration that cannot train: class positives, or no metric loss, on unlabelled tiles.

    Raises:
        ConfigError: naming ``sampler.positives`` or ``loss.metric``.
    """
    if not labelled and metric == "none":
        raise ConfigError("loss.metric: unlabelled tiles train with a metric loss only (pair, triplet or infonce)")
    if positives in ("class", "both") and not labelled:
        raise ConfigError(
            f"sampler.positives: {positives!r} needs labels, and these {len(records)} images are unlabelled "
            "(`smse tiles` without --labels); use sampler.positives=same-spot"
        )


def localisation(
    emb: np.ndarray,
    slides: Sequence[str],
    xs: Sequence[float],
    ys: Sequence[float],
    mags: Sequence[int],
    ks: tuple[int, ...] = (1, 5),
) -> dict:
    """Cross-magnification localisation: does a tile find its own spot among the tiles of another magnification?

    For every ordered pair (m, m') of magnifications and every tile at m whose spot has a tile at m', the
    tiles at m' are ranked by squared Euclidean distance, among its slide's (``slide``) and among all
    (``all``). Returns, per pair and pooled over pairs (``pooled``), for each scope: ``top_k`` (share of
    queries whose own spot ranks within the first k), ``chance_top_k`` (k over the candidates, averaged),
    ``median_rank`` (1 = first), ``chance_median_rank`` and ``queries``.
    """
    emb = np.asarray(emb, dtype=np.float64)
    slides_a = np.asarray(slides)
    xs_a, ys_a, mags_a = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), np.asarray(mags)
    spot_of = [f"{s}@{x:g},{y:g}" for s, x, y in zip(slides_a, xs_a, ys_a)]
    present = sorted({int(m) for m in mags_a})
    out: dict = {"pairs": {}, "magnifications": [mag_name(m) for m in present]}
    pooled: dict[str, dict[str, list[float]]] = {"slide": {}, "all": {}}
    for m in present:
        for m2 in present:
            if m2 == m:
                continue
            q = np.flatnonzero(mags_a == m)
            c = np.flatnonzero(mags_a == m2)
            target = {spot_of[i]: j for j, i in enumerate(c)}
            q = np.array([i for i in q if spot_of[i] in target], dtype=int)
            if not len(q):
                continue
            d2 = np.maximum((emb[q] ** 2).sum(1)[:, None] + (emb[c] ** 2).sum(1)[None, :] - 2 * emb[q] @ emb[c].T, 0)
            own = np.array([target[spot_of[i]] for i in q])
            pair: dict = {}
            for scope in ("slide", "all"):
                allowed = slides_a[c][None, :] == slides_a[q][:, None] if scope == "slide" else np.ones_like(d2, bool)
                own_d = d2[np.arange(len(q)), own]
                # rank = 1 + the allowed candidates strictly closer (ties counted in the query's favour)
                rank = 1 + ((d2 < own_d[:, None]) & allowed).sum(axis=1)
                candidates = allowed.sum(axis=1)
                pair[scope] = _ranks_summary(rank, candidates, ks)
                acc = pooled[scope]
                acc.setdefault("rank", []).extend(rank.tolist())
                acc.setdefault("candidates", []).extend(candidates.tolist())
            out["pairs"][f"{mag_name(m)}->{mag_name(m2)}"] = pair
    out["pooled"] = {}
    for scope, acc in pooled.items():
        if not acc:
            continue
        out["pooled"][scope] = _ranks_summary(np.array(acc["rank"]), np.array(acc["candidates"]), ks)
    return out


def _ranks_summary(rank: np.ndarray, candidates: np.ndarray, ks: tuple[int, ...]) -> dict:
    """Top-k shares, median rank and their chance levels (a random ranking of ``candidates`` tiles)."""
    cand = candidates.astype(float)
    rows = {
        "queries": int(len(rank)),
        "median_rank": float(np.median(rank)),
        "chance_median_rank": float(np.median((cand + 1) / 2)),
    }
    for k in ks:
        rows[f"top_{k}"] = float((rank <= k).mean())
        rows[f"chance_top_{k}"] = float(np.minimum(k / cand, 1.0).mean())
    return rows


NAMES = {
    "embedding": "SMSE embedding",
    "frozen_features": "frozen backbone features with the model's zooms, not standardised (baseline)",
}


def localisation_grid(located: dict | None, pairs: bool = True) -> tuple[list[str], list[list[str]]]:
    """The localisation table as a header and rows of cells: each representation, pooled over the magnification
    pairs (and, with ``pairs``, per ordered pair), within the slide and over all tiles."""
    from smse.tables import pct

    head = [
        "representation",
        "magnifications",
        "scope",
        "top-1 (chance)",
        "top-5 (chance)",
        "median rank (chance)",
        "queries",
    ]
    rows = []
    for key, loc in (located or {}).items():
        for pair, scopes in [("pooled", loc["pooled"])] + (list(loc["pairs"].items()) if pairs else []):
            for scope in ("slide", "all"):
                r = scopes.get(scope)
                if r:
                    rows.append(
                        [
                            NAMES.get(key, key),
                            pair,
                            "own slide" if scope == "slide" else "all tiles",
                            f"{pct(r['top_1'])} ({pct(r['chance_top_1'])})",
                            f"{pct(r['top_5'])} ({pct(r['chance_top_5'])})",
                            f"{r['median_rank']:g} ({r['chance_median_rank']:g})",
                            str(r["queries"]),
                        ]
                    )
    return head, rows


def baseline_note(zooms: Sequence[int]) -> str:
    """What localisation's frozen baseline is, for the results table and the reports (``zooms``: the model's)."""
    if tuple(zooms) == (1,):
        return "The baseline is the backbone's plain features, not standardised."
    shown = ", ".join(str(int(z)) for z in zooms)  # whole numbers only: the reports show this text as is
    return (
        f"The baseline is the backbone's features averaged over the model's centre zooms {shown} (model.zooms), "
        "not standardised."
    )


def localisation_table(located: dict, images: int, zooms: Sequence[int] = (1,)) -> str:
    """Markdown: ``localisation_grid`` with every pair of magnifications, and what it measures (``zooms``: the
    model's ``model.zooms``, which its frozen baseline shares)."""
    head, rows = localisation_grid(located)
    baseline = f" {baseline_note(zooms)}" if "frozen_features" in located else ""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return (
        "\n".join(lines)
        + f"\n\nCross-magnification localisation on {images} test tiles: each tile at one magnification ranks the "
        "tiles at another by distance; top-k is the share whose own spot ranks within the first k (chance: k over "
        f"the candidates).{baseline}\n"
    )


__all__ = [
    "Spots",
    "baseline_note",
    "check_positives",
    "grid_magnification",
    "localisation",
    "localisation_grid",
    "localisation_table",
]
