"""Whole-slide images in the archive: tiled the way the run's tiles were, embedded tile by tile, read back by id.

A whole slide is an index source (``smse index build/add RUN SLIDE.svs``) and a query (``smse search INDEX
SLIDE.svs``: its tiles together are the case; ``SLIDE.svs@x,y,w,h``: the tiles whose centre lies in that box of
level-0 pixels). Its tissue is found and placed on a grid by ``smse.wsi.tiles.plan_tiles``, with the tiling of the
index (the run's training tiling, ``smse.wsi.slide_predict.tiling_of_run``, else ``TileSpec``'s defaults), so that
the tiles of every magnification are the fields the model learnt from; each tile is embedded by the run's model
(``Model.infer``) straight from the slide, without files in between.

A tile of a slide is recorded in the index with ``path`` = ``<slide file>#x<X>_y<Y>_<mag>X`` (``tile_path``): the
slide file and the tile's level-0 centre and magnification, from which ``read_tile`` cuts it again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smse.errors import ConfigError, DataError, SlideError
from smse.io import atomic_path

log = logging.getLogger(__name__)

#: file suffixes read as whole-slide images (whatever ``smse.wsi.reader.open_slide`` opens)
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".tif", ".tiff")
#: tiles embedded per forward pass (whole locations: a batch may pass it by the magnifications of one location)
BATCH_SIZE = 64
_TILE_PATH = re.compile(r"^(?P<file>.+)#x(?P<x>-?\d+)_y(?P<y>-?\d+)_(?P<mag>\d+)X$")
_REGION = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")
_REGION_LIKE = re.compile(r"^[\s\d.,+\-eE]*$")


#: suffixes that are whole-slide images or plain images: such a file is a slide when it is a pyramid
AMBIGUOUS_SUFFIXES = (".tif", ".tiff")
#: a one-level TIFF larger than this (either side) is a slide, not an image
PLAIN_IMAGE_SIDE = 8192


def is_slide_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a whole-slide image by its suffix (a TIFF may be either: see ``is_slide``)."""
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def is_slide(path: str | os.PathLike) -> bool:
    """Whether the file ``path`` is a whole-slide image: by its suffix, and for a TIFF (an image format too) when
    it opens as a slide with more than one pyramid level or a side over ``PLAIN_IMAGE_SIDE`` pixels."""
    if not is_slide_file(path):
        return False
    if Path(path).suffix.lower() not in AMBIGUOUS_SUFFIXES:
        return True
    from smse.wsi.reader import open_slide

    try:
        with open_slide(path, mpp=1.0) as slide:  # (the resolution does not matter here)
            return slide.level_count > 1 or max(slide.dimensions) > PLAIN_IMAGE_SIDE
    except (DataError, ConfigError, OSError):
        return False


def tile_path(slide_file: str | os.PathLike, x: int, y: int, magnification: int) -> str:
    """The index's ``path`` of the tile of ``slide_file`` centred on level-0 (x, y) at ``magnification``."""
    return f"{slide_file}#x{int(x)}_y{int(y)}_{int(magnification)}X"


@dataclass(frozen=True)
class SlideTile:
    """Where a tile of a slide lies: the slide file, the level-0 centre and the magnification."""

    file: str
    x: int
    y: int
    magnification: int


def parse_tile_path(path: str) -> SlideTile | None:
    """The slide tile a ``tile_path`` names; None for any other path (an image file)."""
    found = _TILE_PATH.match(path)
    if found is None or not is_slide_file(found["file"]):
        return None
    return SlideTile(found["file"], int(found["x"]), int(found["y"]), int(found["mag"]))


@dataclass(frozen=True)
class Region:
    """A box of level-0 pixels: x, y (its top-left corner), width, height."""

    x: int
    y: int
    w: int
    h: int

    def holds(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Which of the points (xs, ys) lie in the box (left and top edges in, right and bottom out)."""
        return (xs >= self.x) & (xs < self.x + self.w) & (ys >= self.y) & (ys < self.y + self.h)


@dataclass(frozen=True)
class SlideQuery:
    """A query by a whole slide (``region`` None) or by a region of it, as written (``text``)."""

    text: str
    path: Path
    region: Region | None = None


def parse_slide_query(item: str | os.PathLike) -> SlideQuery | None:
    """``SLIDE.svs`` or ``SLIDE.svs@x,y,w,h`` (level-0 pixels) as a slide query; None for anything else (an image).

    A file that exists under the whole name is that file, '@' or not; a ``.tif`` / ``.tiff`` file is a slide when
    it is a pyramid (``is_slide``), else an image.

    Raises:
        ConfigError: naming the query, for a region that is not four whole numbers (w, h at least 1), or a region
            of a file that is not a whole-slide image.
    """
    text = os.fspath(item)
    path = Path(text)
    if is_slide_file(path) and (path.suffix.lower() not in AMBIGUOUS_SUFFIXES or is_slide(path)):
        return SlideQuery(text, path)
    if "@" not in text or path.exists():
        return None
    head, tail = text.rsplit("@", 1)
    if not is_slide_file(head):
        if _REGION_LIKE.match(tail):
            raise ConfigError(
                f"{text}: a region (@x,y,w,h) is for whole-slide images ({', '.join(SLIDE_SUFFIXES)}); "
                f"{Path(head).name} is not one"
            )
        return None
    found = _REGION.match(tail)
    if found is None or int(found[3]) < 1 or int(found[4]) < 1:
        raise ConfigError(
            f"{text}: a region is SLIDE@x,y,w,h, four whole numbers of level-0 pixels (x, y from 0; width and "
            f"height at least 1), got {tail!r}"
        )
    return SlideQuery(text, Path(head), Region(*(int(v) for v in found.groups())))


@dataclass(frozen=True)
class SlideReading:
    """How whole-slide images are opened and sampled.

    Attributes:
        mpp: microns per level-0 pixel, for slides whose metadata lacks it (overrides the metadata).
        backend: ``openslide`` or ``tiffslide`` (default: the first that imports).
        max_locations: at most this many locations per slide (None: the tiling's own cap, which is none unless
            the index was built with ``--max-tiles``).
        batch_size: tiles per forward pass.
    """

    mpp: float | None = None
    backend: str | None = None
    max_locations: int | None = None
    batch_size: int = BATCH_SIZE

    def __post_init__(self) -> None:
        if self.max_locations is not None and self.max_locations < 1:
            raise ConfigError(f"--max-tiles: at least 1, got {self.max_locations}")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"--mpp: microns per pixel must be positive, got {self.mpp}")


def tiling_from_dict(data: Mapping[str, Any], where: str = "index.json") -> Any:
    """The ``TileSpec`` of an ``index.json`` ``tiling`` entry.

    Raises:
        DataError: naming ``where`` when the entry is not a tiling.
    """
    from smse.wsi.tiles import TileSpec

    try:
        return TileSpec.from_dict(data)
    except (ConfigError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{where}: field 'tiling' is not a tiling ({exc})") from None


@dataclass
class SlideTiles:
    """The embedded tiles of one slide (or of a region of it), location by location, each location's
    magnifications in the tiling's order.

    Attributes:
        file: the slide file as given (resolved for index sources).
        name: the slide id (the file name without its suffix, as in ``smse tiles``).
        embeddings: [n, d] float32.
        xs, ys: [n] level-0 centres.
        magnifications: [n].
        locations: how many locations the tiles stand at.
    """

    file: str
    name: str
    embeddings: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    magnifications: np.ndarray
    locations: int

    @property
    def paths(self) -> list[str]:
        return [tile_path(self.file, x, y, m) for x, y, m in zip(self.xs, self.ys, self.magnifications)]


def check_slide(path: str | os.PathLike, reading: SlideReading) -> None:
    """Open ``path`` as a slide and close it: a missing, foreign or unresolved slide is refused before any work.

    Raises:
        SlideError: naming the file.
    """
    from smse.wsi.reader import open_slide

    open_slide(path, reading.backend, reading.mpp).close()


def embed_slide(
    model: Any,
    path: str | os.PathLike,
    spec: Any,
    reading: SlideReading = SlideReading(),
    region: Region | None = None,
    query: str | None = None,
    progress: bool = False,
) -> SlideTiles:
    """Tile the slide ``path`` as ``spec`` says (only the locations inside ``region`` where given) and embed every
    tile of every magnification with ``model`` (``smse.api.Model``).

    A slide without tissue gives no tiles (a warning); a region without tissue is refused.

    Raises:
        SlideError: the slide cannot be read; ``region`` starts outside the slide or holds no tissue location
            (naming ``query``, the query as written).
    """
    from smse.progress import progress as report_progress
    from smse.wsi.reader import open_slide
    from smse.wsi.tiles import plan_tiles

    if reading.max_locations is not None:
        spec = dataclasses.replace(spec, max_locations=reading.max_locations)
    name = query or str(path)
    with open_slide(path, reading.backend, reading.mpp) as slide:
        if region is None:
            plan = plan_tiles(slide, spec)
            centres = plan.locations
            if not len(centres):
                log.warning(
                    "%s: no location with %.0f%% tissue at every magnification; no tiles",
                    slide.path,
                    100 * spec.min_tissue,
                )
        else:
            width, height = slide.dimensions
            if region.x >= width or region.y >= height:
                raise SlideError(f"{name}: the box starts outside the slide, which is {width}x{height} level-0 pixels")
            plan = plan_tiles(slide, dataclasses.replace(spec, max_locations=None))
            inside = plan.locations[region.holds(plan.locations[:, 0], plan.locations[:, 1])]
            if not len(inside):
                raise SlideError(
                    f"{name}: no tissue tile has its centre in the box x {region.x} to {region.x + region.w}, "
                    f"y {region.y} to {region.y + region.h} (the slide's {len(plan)} tissue locations, on a grid of "
                    f"{plan.cell[0]:.0f}x{plan.cell[1]:.0f} level-0 pixels, lie elsewhere); choose a box on tissue"
                )
            if spec.max_locations is not None and len(inside) > spec.max_locations:
                rng = np.random.default_rng(spec.seed)
                inside = inside[np.sort(rng.choice(len(inside), spec.max_locations, replace=False))]
            centres = inside
        keys: list[tuple[int, int, int]] = []
        embs: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        for x, y in report_progress(
            [(int(x), int(y)) for x, y in centres],
            desc=f"embedding {slide.name}",
            unit="locations",
            enabled=progress and len(centres) > 1,
        ):
            for mag, tile in plan.cut((x, y)).items():
                keys.append((x, y, mag))
                batch.append(tile)
            if len(batch) >= reading.batch_size:
                embs.append(model.infer(batch, len(batch))[0])
                batch.clear()
        if batch:
            embs.append(model.infer(batch, len(batch))[0])
        dim = int(model.module.heads.embed.out_features)
        return SlideTiles(
            file=str(path),
            name=slide.name,
            embeddings=np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, dim), np.float32),
            xs=np.array([k[0] for k in keys], dtype=np.int64),
            ys=np.array([k[1] for k in keys], dtype=np.int64),
            magnifications=np.array([k[2] for k in keys], dtype=np.int64),
            locations=len(centres),
        )


def write_slide_part(path: Path, tiles: SlideTiles, label: str = "", patient: str = "", tumor_type: str = "") -> None:
    """The tiles of a slide as an index part (``smse embed``'s arrays: embeddings, paths, labels, tumour types,
    patients, magnifications, slides, xs, ys), written atomically.

    Raises:
        OutputError: naming the file when it cannot be written.
    """
    n = len(tiles.embeddings)
    arrays = {
        "embeddings": np.asarray(tiles.embeddings, dtype=np.float32),
        "paths": np.array(tiles.paths, dtype=str).reshape(n),
        "labels": np.full(n, label, dtype=object).astype(str),
        "tumor_types": np.full(n, tumor_type, dtype=object).astype(str),
        "patients": np.full(n, patient or tiles.name, dtype=object).astype(str),
        "magnifications": tiles.magnifications.astype(np.int64),
        "slides": np.full(n, tiles.name, dtype=object).astype(str),
        "xs": tiles.xs.astype(np.float64),
        "ys": tiles.ys.astype(np.float64),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its bool flag


def read_tile(tile: SlideTile, size: tuple[int, int], mpp: float | None = None, backend: str | None = None):
    """The tile ``tile`` cut again from its slide: a PIL RGB image of ``size`` (the index's tile size).

    Raises:
        SlideError: the slide file is gone or unreadable.
    """
    from PIL import Image

    from smse.wsi.reader import open_slide
    from smse.wsi.tiles import TileSpec, cut, sources

    spec = TileSpec(magnifications=(tile.magnification,), size=size)
    with open_slide(tile.file, backend, mpp) as slide:
        source = sources(slide, spec)[tile.magnification]
        return Image.fromarray(cut(slide, source, (tile.x, tile.y), size), "RGB")


def slide_labels(labels: Any, paths: list[Path]) -> dict[Path, tuple[str, str, str]]:
    """(label, patient, tumour type) of each slide in ``paths`` from ``labels`` (a label CSV of ``smse tiles
    --labels``, or its ``read_labels`` contents); None: unknown label, the slide as its patient.

    Raises:
        DataError: naming the slides the label file has no row for.
    """
    from smse.wsi.export import read_labels

    if labels is None:
        return {p: ("", Path(p).stem, "") for p in paths}
    table = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else labels
    missing = [p.name for p in paths if p.stem not in table and p.name not in table]
    if missing:
        where = f"{labels}" if isinstance(labels, (str, os.PathLike)) else "labels"
        raise DataError(f"{where}: no row for slide(s) {', '.join(missing)}")
    out = {}
    for p in paths:
        row = table.get(p.stem) or table[p.name]
        out[p] = (row.label, row.patient, row.tumor_type)
    return out


__all__ = [
    "SLIDE_SUFFIXES",
    "BATCH_SIZE",
    "AMBIGUOUS_SUFFIXES",
    "is_slide_file",
    "is_slide",
    "tile_path",
    "SlideTile",
    "parse_tile_path",
    "Region",
    "SlideQuery",
    "parse_slide_query",
    "SlideReading",
    "tiling_from_dict",
    "SlideTiles",
    "check_slide",
    "embed_slide",
    "write_slide_part",
    "read_tile",
    "slide_labels",
]
