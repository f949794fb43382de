"""Concentric multi-magnification tiles at tissue locations, cut from the pyramid level nearest each resolution."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from smse.data.records import MAGNIFICATIONS
from smse.errors import ConfigError
from smse.progress import progress as report_progress
from smse.wsi.reader import Slide, magnification_mpp
from smse.wsi.tissue import TissueMap, tissue_mask

#: BreakHis images are 700x460 pixels (width x height) at every magnification
DEFAULT_SIZE = (700, 460)
#: 1000X is 0.1 um/px, finer than any scanner: a higher one would tile a slide into billions of grid cells
MAX_MAGNIFICATION = 1000
#: a tile side beyond this would not fit in memory a batch at a time (BreakHis: 700)
MAX_TILE_SIDE = 8192

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileSpec:
    """How a slide is cut into tiles.

    Attributes:
        magnifications: total (BreakHis) magnifications; each is cut at ``magnification_mpp`` um/px
            (40X, 100X, 200X, 400X: 2.5, 1.0, 0.5, 0.25 um/px).
        size: tile (width, height) in pixels, the same at every magnification.
        grid: the magnification whose field of view spaces the locations (default: the lowest of
            ``magnifications``), so that its tiles touch without overlapping.
        min_tissue: the least tissue share, on the thumbnail's mask, of every tile of a location.
        max_locations: at most this many locations per slide (a seeded random sample); None for all.
        seed: the seed of that sample.
    """

    magnifications: tuple[int, ...] = MAGNIFICATIONS
    size: tuple[int, int] = DEFAULT_SIZE
    grid: int | None = None
    min_tissue: float = 0.5
    max_locations: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.magnifications or any(not 0 < m <= MAX_MAGNIFICATION for m in self.magnifications):
            raise ConfigError(
                f"--magnifications: magnifications from 1X to {MAX_MAGNIFICATION}X such as 40X,100X, "
                f"got {self.magnifications}"
            )
        if len(set(self.magnifications)) != len(self.magnifications):
            raise ConfigError(f"--magnifications: {self.magnifications} repeats a magnification")
        if min(self.size) < 8 or max(self.size) > MAX_TILE_SIDE:
            raise ConfigError(
                f"--tile: from 8x8 to {MAX_TILE_SIDE}x{MAX_TILE_SIDE} pixels, got {self.size[0]}x{self.size[1]}"
            )
        if self.grid is not None and not 0 < self.grid <= MAX_MAGNIFICATION:
            raise ConfigError(f"--grid: a magnification from 1X to {MAX_MAGNIFICATION}X, got {self.grid}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ConfigError(f"--seed: a whole number of at least 0, got {self.seed!r}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue: a share in [0, 1], got {self.min_tissue}")
        if self.max_locations is not None and self.max_locations < 1:
            raise ConfigError(f"--max-tiles: at least 1, got {self.max_locations}")

    @property
    def grid_magnification(self) -> int:
        return self.grid or min(self.magnifications)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TileSpec:
        """The spec of ``to_dict`` (``tiles.json``'s ``tiling``); fields it lacks take their defaults.

        Raises:
            ConfigError, KeyError, TypeError, ValueError, IndexError: not a tiling (callers name the file).
        """
        return cls(
            magnifications=tuple(int(m) for m in data["magnifications"]),
            size=(int(data["size"][0]), int(data["size"][1])),
            grid=data.get("grid"),
            min_tissue=float(data.get("min_tissue", 0.5)),
            max_locations=data.get("max_locations"),
            seed=int(data.get("seed", 0)),
        )

    def to_dict(self) -> dict:
        return {
            "magnifications": list(self.magnifications),
            "size": list(self.size),
            "grid": self.grid_magnification,
            "min_tissue": self.min_tissue,
            "max_locations": self.max_locations,
            "seed": self.seed,
        }


def parse_magnifications(text: str, option: str = "--magnifications") -> tuple[int, ...]:
    """``40X,100X,200X,400X`` (or ``40,100``) -> (40, 100, 200, 400).

    Raises:
        ConfigError: naming ``option``, for anything but whole magnifications from 1X to ``MAX_MAGNIFICATION``
            (``inf``, ``nan``, ``1e400``, ``40.5``, ``-40`` included).
    """
    out = []
    for v in text.split(","):
        if not v.strip():
            continue
        try:
            number = float(v.strip().upper().removesuffix("X"))
        except ValueError:
            raise ConfigError(f"{option}: expected a list such as 40X,100X,200X,400X, got {text!r}") from None
        if not (math.isfinite(number) and number == int(number) and 1 <= number <= MAX_MAGNIFICATION):
            raise ConfigError(
                f"{option}: whole magnifications from 1X to {MAX_MAGNIFICATION}X such as 40X,100X, got {v.strip()!r}"
            )
        out.append(int(number))
    return tuple(out)


@dataclass(frozen=True)
class Source:
    """Where the tiles of one magnification come from.

    Attributes:
        magnification: total magnification.
        mpp: microns per tile pixel.
        level: the pyramid level read.
        scale: level pixels per tile pixel (1: read as is; above 1: downsampled; below 1: upsampled).
        field: the tile's (width, height) in level-0 pixels.
    """

    magnification: int
    mpp: float
    level: int
    scale: float
    field: tuple[float, float]


def sources(slide: Slide, spec: TileSpec) -> dict[int, Source]:
    """The level and scale of every magnification of ``spec`` on ``slide``."""
    out = {}
    w, h = spec.size
    for mag in spec.magnifications:
        mpp = magnification_mpp(mag)
        level = slide.best_level(mpp)
        out[mag] = Source(mag, mpp, level, mpp / slide.level_mpp(level), (w * mpp / slide.mpp, h * mpp / slide.mpp))
        if out[mag].scale < 1.0 - 0.05:  # finer than the scan: pixels are invented, not seen
            log.warning(
                "%s: %dX tiles (%.3g um/px) are enlarged %.2gx from the scan's finest %.3g um/px; they hold no "
                "more detail than the scan",
                slide.name,
                mag,
                mpp,
                1 / out[mag].scale,
                slide.mpp,
            )
    return out


def window(
    slide: Slide, source: Source, centre: tuple[float, float], size: tuple[int, int]
) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float] | None]:
    """Where the tile of ``source`` centred on the level-0 point ``centre`` is read from.

    Returns the region (x, y, width, height) of ``source.level`` to read, and the sub-pixel box
    inside it to resample to ``size``, or None where the region is the tile as it is: a level at
    exactly the tile's resolution is read as is (the field snapped to the nearest level pixel); any
    other is read with a margin for the resampling filter.
    """
    w, h = size
    ds = slide.level_downsamples[source.level]
    xl = (centre[0] - source.field[0] / 2) / ds
    yl = (centre[1] - source.field[1] / 2) / ds
    if abs(source.scale - 1.0) < 1e-6:
        return (round(xl), round(yl), w, h), None
    wl, hl = w * source.scale, h * source.scale
    margin = int(math.ceil(max(source.scale, 1.0))) + 1
    x0, y0 = math.floor(xl) - margin, math.floor(yl) - margin
    x1, y1 = math.ceil(xl + wl) + margin, math.ceil(yl + hl) + margin
    return (x0, y0, x1 - x0, y1 - y0), (xl - x0, yl - y0, xl - x0 + wl, yl - y0 + hl)


def _integral(v: float) -> bool:
    return abs(v - round(v)) < 1e-6


def resample(image: Image.Image, box: tuple[float, float, float, float] | None, size: tuple[int, int]) -> Image.Image:
    """A tile from the region ``window`` gave: the box resampled to ``size``.

    An integer factor k on whole pixels averages k x k blocks, as pyramid levels are made; any other
    scale is bilinear (antialiased when reducing), which keeps sub-pixel positions.
    """
    if box is None:
        return image
    k = (box[2] - box[0]) / size[0]
    if (
        k >= 2
        and _integral(k)
        and _integral((box[3] - box[1]) / size[1] - k)
        and _integral(box[0])
        and _integral(box[1])
    ):
        x0, y0, k = round(box[0]), round(box[1]), round(k)
        return image.reduce(k, box=(x0, y0, x0 + k * size[0], y0 + k * size[1]))
    return image.resize(size, Image.Resampling.BILINEAR, box=box)


def cut(slide: Slide, source: Source, centre: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """The tile of ``source`` centred on the level-0 point ``centre``: an HxWx3 uint8 array of ``size`` (w, h)."""
    region, box = window(slide, source, centre, size)
    return np.asarray(resample(slide.read_image(source.level, *region), box, size))


@dataclass
class TilePlan:
    """The tissue locations of one slide and how each magnification's tile is cut there.

    Attributes:
        slide: the open slide.
        spec: the tiling.
        sources: magnification -> level and scale.
        locations: [N, 2] level-0 (x, y) centres shared by the tiles of all magnifications.
        tissue_fraction: [N] the least tissue share over the location's tiles.
        tissue: the thumbnail's tissue mask and scale.
        thumbnail: the HxWx3 thumbnail the mask was computed on.
        cell: the grid's (width, height) in level-0 pixels.
        candidates: grid cells on the slide, with or without tissue.
    """

    slide: Slide
    spec: TileSpec
    sources: dict[int, Source]
    locations: np.ndarray
    tissue_fraction: np.ndarray
    tissue: TissueMap
    thumbnail: np.ndarray
    cell: tuple[float, float]
    candidates: int

    def __len__(self) -> int:
        return len(self.locations)

    def box(self, magnification: int, centre: tuple[float, float]) -> tuple[float, float, float, float]:
        """The level-0 box (x0, y0, x1, y1) of the tile of ``magnification`` at ``centre``."""
        fw, fh = self.sources[magnification].field
        return centre[0] - fw / 2, centre[1] - fh / 2, centre[0] + fw / 2, centre[1] + fh / 2

    def cut(self, centre: tuple[float, float]) -> dict[int, np.ndarray]:
        """The tiles of every magnification at ``centre``, as HxWx3 uint8 arrays."""
        return {
            mag: np.asarray(resample(region, box, self.spec.size)) for mag, (region, box) in self.read(centre).items()
        }

    def read(self, centre: tuple[float, float]) -> dict[int, tuple[Image.Image, tuple | None]]:
        """The regions the tiles at ``centre`` are cut from, with their boxes: ``resample`` finishes each tile.

        Concentric tiles taken from one level share one read: the region enclosing them all.
        """
        windows = {mag: window(self.slide, src, centre, self.spec.size) for mag, src in self.sources.items()}
        out = {}
        for level in sorted({src.level for src in self.sources.values()}):
            mags = [mag for mag, src in self.sources.items() if src.level == level]
            regions = np.array([windows[mag][0] for mag in mags])
            x0, y0 = regions[:, 0].min(), regions[:, 1].min()
            x1, y1 = (regions[:, 0] + regions[:, 2]).max(), (regions[:, 1] + regions[:, 3]).max()
            image = self.slide.read_image(level, int(x0), int(y0), int(x1 - x0), int(y1 - y0))
            for mag, (x, y, w, h) in zip(mags, regions):
                whole = (x, y, w, h) == (x0, y0, x1 - x0, y1 - y0)
                out[mag] = (image if whole else image.crop((x - x0, y - y0, x - x0 + w, y - y0 + h)), windows[mag][1])
        return {mag: out[mag] for mag in self.sources}

    def centres(self, progress: bool = False) -> Iterator[tuple[int, int]]:
        """The locations' level-0 centres, with a progress bar when asked."""
        for x, y in report_progress(
            self.locations, desc=f"tiling {self.slide.name}", unit="locations", enabled=progress
        ):
            yield int(x), int(y)

    def tiles(self, progress: bool = False) -> Iterator[tuple[tuple[int, int], dict[int, np.ndarray]]]:
        """(centre, magnification -> tile) for every location, one location in memory at a time."""
        for centre in self.centres(progress):
            yield centre, self.cut(centre)


def plan_tiles(slide: Slide, spec: TileSpec, thumbnail_side: int = 1024) -> TilePlan:
    """Find the tissue on a thumbnail and place locations on a grid over it.

    The grid's cell is the field of view of ``spec.grid_magnification``, centred on the slide; a
    cell's centre is a location when every tile of every magnification there holds at least
    ``spec.min_tissue`` tissue.
    """
    thumbnail, scale = slide.thumbnail(thumbnail_side)
    tissue = TissueMap(tissue_mask(thumbnail), scale)
    src = sources(slide, spec)
    grid_mpp = magnification_mpp(spec.grid_magnification)
    cw, ch = spec.size[0] * grid_mpp / slide.mpp, spec.size[1] * grid_mpp / slide.mpp
    width, height = slide.dimensions
    nx, ny = int(width // cw), int(height // ch)
    xs = (width - nx * cw) / 2 + (np.arange(nx) + 0.5) * cw
    ys = (height - ny * ch) / 2 + (np.arange(ny) + 0.5) * ch
    gx, gy = np.meshgrid(xs, ys)
    centres = np.rint(np.column_stack([gx.ravel(), gy.ravel()])).astype(np.int64)
    fraction = np.ones(len(centres))
    for s in src.values():
        fw, fh = s.field
        x, y = centres[:, 0].astype(float), centres[:, 1].astype(float)
        fraction = np.minimum(fraction, tissue.fraction(x - fw / 2, y - fh / 2, x + fw / 2, y + fh / 2))
    keep = np.flatnonzero(fraction >= spec.min_tissue)
    if spec.max_locations is not None and len(keep) > spec.max_locations:
        rng = np.random.default_rng(spec.seed)
        keep = np.sort(rng.choice(keep, spec.max_locations, replace=False))
    return TilePlan(
        slide, spec, src, centres[keep].reshape(-1, 2), fraction[keep], tissue, thumbnail, (cw, ch), len(centres)
    )


__all__ = [
    "TileSpec",
    "parse_magnifications",
    "window",
    "resample",
    "cut",
    "TilePlan",
    "plan_tiles",
]
