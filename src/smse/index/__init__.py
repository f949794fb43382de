"""Similar-case search over a slide archive: a persistent index of tile embeddings (faiss) with their metadata
(SQLite), built with a run's model, searched by images or embeddings, tile by tile or slide by slide.

    from smse.index import Index

    index = Index.build("runs/tiles", ["tiles/manifest.csv", "slides/a.svs"], "archive")   # or Index.open("archive")
    result = index.search(["query.png"], k=10, magnification="any", by="slide")   # or "b.svs", "b.svs@x,y,w,h"
    for slide in result.slides:
        print(slide.rank, slide.slide, slide.score, [(r.x, r.y, r.magnification) for r in slide.regions[:3]])

The folder's files, the index kinds and why SQLite: ``smse.index.store``; the slide-ranking rule:
``smse.index.search``; whole slides and regions as sources and queries: ``smse.index.slides``.
"""

from smse.index.archive import LOCK_TIMEOUT, Index, IndexLockedError, info_lines
from smse.index.search import SearchResult, SlideHit, TileHit, parse_magnification_filter, rank_slides
from smse.index.slides import Region, SlideQuery, SlideReading, parse_slide_query
from smse.index.store import FLAT_MAX, KINDS, default_params

__all__ = [
    "Index",
    "IndexLockedError",
    "LOCK_TIMEOUT",
    "info_lines",
    "SearchResult",
    "SlideHit",
    "TileHit",
    "parse_magnification_filter",
    "rank_slides",
    "Region",
    "SlideQuery",
    "SlideReading",
    "parse_slide_query",
    "FLAT_MAX",
    "KINDS",
    "default_params",
]
