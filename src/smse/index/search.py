"""What a search of an archive index answers: tile hits, slides ranked by their tiles' votes, and the filters.

Distances are squared Euclidean in the embedding, as everywhere in smse (``ReferenceIndex``, ``smse predict``,
the web page): on a model that normalises its embeddings (``model.normalize``, the default) they lie in [0, 4]
and rank exactly as cosine similarity does.

Ranking slides (``by="slide"``): the query tiles together are one case (the tiles of a slide, or the images
of one case at several magnifications). Each query tile's k nearest tiles vote for the slides they belong to,
the neighbour at rank r with weight 1/r; a slide's score is the sum of its votes over all query tiles.
Slides are ranked by score, higher first; ties go to the slide whose best matching tile is nearer, then to
the slide name. Each hit slide comes with its matching regions: every index tile that voted for it (once,
with its smallest distance to any query tile), nearest first, with its centre x, y, magnification and path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smse.errors import ConfigError

#: ``magnification=``: every magnification, the query's own, or a list of magnifications
MagnificationFilter = str | Sequence[int]
_TILE_NAME = re.compile(r"_(\d+)X\.[A-Za-z0-9]+$")


def parse_magnification_filter(value: Any) -> str | tuple[int, ...]:
    """``any``, ``same``, or magnifications (``"40X,100X"``, ``[40, 100]``) as a sorted tuple.

    Raises:
        ConfigError: naming ``magnification`` for anything else.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("any", "same"):
            return text
        from smse.wsi.tiles import parse_magnifications

        mags = parse_magnifications(value, "magnification")
    else:
        try:
            mags = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"magnification: any, same or a list such as 40X,100X, got {value!r}") from None
        if any(m < 1 for m in mags):
            raise ConfigError(f"magnification: magnifications are positive, got {value!r}")
    if not mags:
        raise ConfigError(f"magnification: any, same or a list such as 40X,100X, got {value!r}")
    return tuple(sorted(set(mags)))


def magnification_from_name(name: str) -> int | None:
    """The magnification a file name gives: a BreakHis name (``SOB_M_DC-14-2523-400-001.png``) or a tile of
    ``smse tiles`` (``slide_x100_y200_400X.jpg``); None otherwise."""
    from smse.data.breakhis import parse_name
    from smse.errors import DataError

    base = Path(name).name
    try:
        return int(parse_name(base)["magnification"])
    except DataError:
        pass
    found = _TILE_NAME.search(base)
    return int(found.group(1)) if found else None


@dataclass
class TileHit:
    """One index tile found for a query tile."""

    query: int
    rank: int
    id: int
    distance: float
    slide: str
    patient: str
    label: str
    tumor_type: str
    magnification: int
    x: float | None
    y: float | None
    path: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SlideHit:
    """One slide ranked by the votes of the query tiles' neighbours (see the module's docstring)."""

    rank: int
    slide: str
    score: float
    votes: int
    best_distance: float
    patient: str
    label: str
    tumor_type: str
    regions: list[TileHit] = field(default_factory=list)

    def to_dict(self) -> dict:
        head = {k: v for k, v in asdict(self).items() if k != "regions"}
        return {**head, "regions": [r.to_dict() for r in self.regions]}


@dataclass
class SearchResult:
    """The answer of ``Index.search``: per query its tile hits (nearest first), and with ``by="slide"`` the ranked
    slides."""

    by: str
    queries: list[str]
    tiles: list[list[TileHit]]
    slides: list[SlideHit] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """Flat rows for a CSV: one per tile hit (``by="tile"``), or one per matching region of each hit slide."""
        if self.by == "tile":
            return [{"query_path": self.queries[h.query], **h.to_dict()} for hits in self.tiles for h in hits]
        out = []
        for s in self.slides:
            head = {
                "slide_rank": s.rank,
                "slide": s.slide,
                "score": round(s.score, 6),  # a sum of 1 / rank votes: 6 decimals say all it holds
                "votes": s.votes,
                "best_distance": s.best_distance,
                "patient": s.patient,
                "label": s.label,
                "tumor_type": s.tumor_type,
            }
            for r in s.regions:
                out.append(
                    {
                        **head,
                        "region_id": r.id,
                        "x": r.x,
                        "y": r.y,
                        "magnification": r.magnification,
                        "distance": r.distance,
                        "path": r.path,
                        "query": r.query,
                        "query_path": self.queries[r.query],
                    }
                )
        return out

    def to_dict(self) -> dict:
        base: dict[str, Any] = {"by": self.by, "queries": self.queries}
        if self.by == "slide":
            base["slides"] = [s.to_dict() for s in self.slides]
        else:
            base["hits"] = [[h.to_dict() for h in hits] for hits in self.tiles]
        return base


def rank_slides(tiles: Sequence[Sequence[TileHit]], top: int) -> list[SlideHit]:
    """The ``top`` slides by the votes of every query tile's neighbours (``tiles[q]``: nearest first): the
    neighbour at rank r votes 1/r for its slide; ties by the best distance, then by name."""
    score: dict[str, float] = {}
    votes: dict[str, int] = {}
    best: dict[str, float] = {}
    regions: dict[str, dict[int, TileHit]] = {}
    for hits in tiles:
        for r, hit in enumerate(hits, start=1):
            s = hit.slide
            score[s] = score.get(s, 0.0) + 1.0 / r
            votes[s] = votes.get(s, 0) + 1
            best[s] = min(best.get(s, float("inf")), hit.distance)
            held = regions.setdefault(s, {})
            if hit.id not in held or hit.distance < held[hit.id].distance:
                held[hit.id] = hit
    order = sorted(score, key=lambda s: (-score[s], best[s], s))[:top]
    out = []
    for rank, s in enumerate(order, start=1):
        found = sorted(regions[s].values(), key=lambda h: (h.distance, h.id))
        first = found[0]
        out.append(
            SlideHit(
                rank=rank,
                slide=s,
                score=score[s],
                votes=votes[s],
                best_distance=best[s],
                patient=first.patient,
                label=first.label,
                tumor_type=first.tumor_type,
                regions=found,
            )
        )
    return out


__all__ = [
    "MagnificationFilter",
    "parse_magnification_filter",
    "magnification_from_name",
    "TileHit",
    "SlideHit",
    "SearchResult",
    "rank_slides",
]
