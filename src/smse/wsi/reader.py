"""One reader for whole-slide images: OpenSlide when it imports, tiffslide otherwise."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smse.data.images import to_rgb8
from smse.errors import ConfigError, SlideError

log = logging.getLogger(__name__)

#: microns per pixel times objective power: the whole-slide convention (a 40x objective scans at ~0.25 um/px)
MPP_TIMES_OBJECTIVE = 10.0
#: BreakHis magnifications are total magnifications: objective power times this eyepiece
EYEPIECE = 10.0
#: a level up to this much coarser than a target resolution is still used (and upsampled slightly)
LEVEL_TOLERANCE = 0.05
#: pixels per band when a thumbnail is read band by band
BAND_PIXELS = 1 << 23


def magnification_mpp(magnification: float) -> float:
    """Microns per pixel of a total (BreakHis) magnification.

    BreakHis 40X, 100X, 200X and 400X are 4x, 10x, 20x and 40x objectives behind a 10x eyepiece;
    slide scanners record the objective power, and the common convention is 10 / power microns per
    pixel. So 40X, 100X, 200X and 400X are 2.5, 1.0, 0.5 and 0.25 um/px.
    """
    if magnification <= 0:
        raise ConfigError(f"magnification must be positive, got {magnification}")
    return MPP_TIMES_OBJECTIVE * EYEPIECE / magnification


@dataclass(frozen=True)
class Backend:
    """A slide library: how to open a file (a handle with OpenSlide's API) and which errors mean "not a slide"."""

    name: str
    open: Callable[[str], Any]
    not_a_slide: tuple[type[BaseException], ...]
    #: level pixel and downsample -> the level-0 coordinate that the library maps back to that pixel
    to_level0: Callable[[int, float], int]


def _openslide() -> Backend:
    import openslide

    return Backend("openslide", openslide.OpenSlide, (openslide.OpenSlideError,), lambda x, ds: round(x * ds))


def _tiffslide() -> Backend:
    import zlib

    import tifffile
    import tiffslide

    # RuntimeError: the decoders' errors (imagecodecs' DeflateError, JpegError, ...) on a file cut short or corrupt
    not_a_slide = (
        tifffile.TiffFileError,
        ValueError,
        KeyError,
        IndexError,
        NotImplementedError,
        OSError,
        RuntimeError,
        zlib.error,
    )
    return Backend(
        "tiffslide", tiffslide.TiffSlide, not_a_slide, lambda x, ds: math.ceil(x * ds)
    )  # tiffslide truncates location / downsample


#: backend name -> factory, in order of preference
BACKENDS: dict[str, Callable[[], Backend]] = {"openslide": _openslide, "tiffslide": _tiffslide}


def _load(name: str) -> Backend | None:
    try:
        return BACKENDS[name]()
    except (ImportError, OSError):  # OSError: openslide-python without the OpenSlide library
        return None


def available_backends() -> list[str]:
    """The backends whose library imports here, in order of preference."""
    return [name for name in BACKENDS if _load(name) is not None]


def _backend(name: str | None) -> Backend:
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"--backend: unknown slide backend {name!r} (known: {', '.join(BACKENDS)})")
    for candidate in [name] if name else list(BACKENDS):
        lib = _load(candidate)
        if lib is not None:
            return lib
    raise ConfigError(f"no slide reader: {name or ' or '.join(BACKENDS)} does not import; pip install 'smse[wsi]'")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, raising SlideError for a path the system refuses to look up (longer than it allows).

    Raises:
        SlideError: naming the path (shortened) and its length.
    """
    try:
        return path.is_file()
    except OSError as exc:
        shown = str(path) if len(str(path)) <= 120 else f"{str(path)[:60]}...{str(path)[-40:]}"
        raise SlideError(
            f"{shown}: cannot look up this path of {len(os.fsencode(path))} bytes ({exc.strerror})"
        ) from None


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and math.isfinite(number) else None


def _rgb(region: Image.Image, path: Path) -> Image.Image:
    """A region in any 8-bit mode -> RGB, transparent parts on white."""
    if region.mode == "RGB":
        return region
    if region.mode.startswith(("I", "F")):
        raise SlideError(f"{path}: {region.mode} pixels; only 8-bit slides are read")
    if region.mode == "RGBA" and region.getchannel("A").getextrema()[0] == 255:
        return region.convert("RGB")  # opaque: drop alpha without compositing
    return to_rgb8(region)


class Slide:
    """An open whole-slide image whose resolution is known; regions come back as RGB images or arrays.

    Attributes:
        path: the file.
        name: the file name without its suffix (the slide id of tiles and manifests).
        backend: the library that reads it (``openslide`` or ``tiffslide``).
        dimensions: level-0 (width, height) in pixels.
        level_dimensions: (width, height) of each pyramid level.
        level_downsamples: level-0 pixels per pixel of each level.
        mpp: microns per level-0 pixel.
        mpp_source: ``metadata``, ``objective power`` (10 / power) or ``given`` (the ``mpp`` argument).
        objective_power: the scanner's objective power from the metadata (None where absent).
    """

    def __init__(self, path: str | os.PathLike, backend: str | None = None, mpp: float | None = None):
        self.path = Path(path)
        self.name = self.path.stem
        if not _is_file(self.path):
            raise SlideError(f"{self.path}: slide file not found")
        lib = _backend(backend)
        self.backend = lib.name
        self._lib = lib
        try:
            self._handle = lib.open(str(self.path))
            self.dimensions = tuple(int(v) for v in self._handle.dimensions)
            self.level_dimensions = [tuple(int(v) for v in d) for d in self._handle.level_dimensions]
            self.level_downsamples = [float(d) for d in self._handle.level_downsamples]
            properties = dict(self._handle.properties)
        except lib.not_a_slide as exc:
            raise SlideError(f"{self.path}: not a whole-slide image {lib.name} can read ({exc})") from None
        self.properties = properties
        self.objective_power = _positive(properties.get(f"{lib.name}.objective-power"))
        try:
            self.mpp, self.mpp_source = self._resolution(properties, mpp)
        except (SlideError, ConfigError):
            self._handle.close()
            raise

    def _resolution(self, properties: dict, given: float | None) -> tuple[float, str]:
        if given is not None:
            if _positive(given) is None:
                raise ConfigError(f"--mpp: microns per pixel must be positive, got {given}")
            return float(given), "given"
        mpp_x = _positive(properties.get(f"{self.backend}.mpp-x"))
        mpp_y = _positive(properties.get(f"{self.backend}.mpp-y"))
        if mpp_x and mpp_y:
            if abs(mpp_x - mpp_y) > 0.01 * mpp_x:
                log.warning("%s: non-square pixels (%.4f x %.4f um); using their mean", self.path, mpp_x, mpp_y)
            return (mpp_x + mpp_y) / 2, "metadata"
        if self.objective_power:
            mpp = MPP_TIMES_OBJECTIVE / self.objective_power
            log.warning(
                "%s: no microns per pixel in the metadata; taking %.3f from the %gx objective (10 / power)",
                self.path,
                mpp,
                self.objective_power,
            )
            return mpp, "objective power"
        raise SlideError(
            f"{self.path}: the slide's metadata gives neither microns per pixel nor objective power; "
            "give its resolution with --mpp (e.g. --mpp 0.25 for a scan with a 40x objective)"
        )

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of ``level``."""
        return self.mpp * self.level_downsamples[level]

    def best_level(self, mpp: float) -> int:
        """The coarsest level at least as fine as ``mpp`` (within ``LEVEL_TOLERANCE``); level 0 when none is."""
        fine_enough = [i for i in range(self.level_count) if self.level_mpp(i) <= mpp * (1 + LEVEL_TOLERANCE)]
        return max(fine_enough, key=self.level_mpp) if fine_enough else 0

    def read_image(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        """Pixels [x, x + width) x [y, y + height) of ``level`` (level coordinates) as RGB; outside is white."""
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lw), min(y + height, lh)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return self._read(level, x, y, width, height)
        out = Image.new("RGB", (width, height), (255, 255, 255))
        if x1 > x0 and y1 > y0:
            out.paste(self._read(level, x0, y0, x1 - x0, y1 - y0), (x0 - x, y0 - y))
        return out

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``read_image`` as an HxWx3 uint8 array."""
        return np.asarray(self.read_image(level, x, y, width, height))

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        ds = self.level_downsamples[level]
        location = (self._lib.to_level0(x, ds), self._lib.to_level0(y, ds))
        try:
            region = self._handle.read_region(location, level, (width, height))
        except self._lib.not_a_slide as exc:
            raise SlideError(
                f"{self.path}: cannot read level {level} at ({x}, {y}); the file is cut short or corrupt? "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return _rgb(region, self.path)

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """A reduced copy of the whole slide, read band by band so that no level is ever held whole.

        It comes from the coarsest level at most twice smaller than ``max_side`` asks, reduced by
        the integer factor nearest the rest of the way.

        Returns:
            The HxWx3 uint8 thumbnail (its longer side about ``max_side``, between half and twice
            that, or the whole level 0 of a smaller slide) and its scale: level-0 pixels per
            thumbnail pixel.
        """
        target = max(self.dimensions) / max_side
        level = max(
            (i for i in range(self.level_count) if self.level_downsamples[i] <= 2 * target),
            key=lambda i: self.level_downsamples[i],
            default=0,
        )
        factor = max(1, round(target / self.level_downsamples[level]))
        lw, lh = self.level_dimensions[level]
        rows = factor * max(1, BAND_PIXELS // (lw * factor))
        bands = []
        for y in range(0, lh, rows):
            band = self.read_image(level, 0, y, lw, min(rows, lh - y))
            bands.append(np.asarray(band.reduce(factor) if factor > 1 else band))
        return np.concatenate(bands, axis=0), factor * self.level_downsamples[level]

    def describe(self) -> dict:
        """Size, levels and resolution, for logs and reports."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "dimensions": list(self.dimensions),
            "levels": [
                {"size": list(d), "downsample": round(ds, 4), "mpp": round(self.mpp * ds, 4)}
                for d, ds in zip(self.level_dimensions, self.level_downsamples)
            ],
            "mpp": round(self.mpp, 5),
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
        }

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.path.name}, {w}x{h}, {self.level_count} levels, {self.mpp:.4f} um/px, {self.backend})"


def open_slide(path: str | os.PathLike, backend: str | None = None, mpp: float | None = None) -> Slide:
    """Open a whole-slide image (OpenSlide when it imports, tiffslide otherwise, or the ``backend`` named).

    Args:
        path: SVS, NDPI, MRXS, pyramidal TIFF, ... (what the backend reads).
        backend: ``openslide`` or ``tiffslide``; None picks the first that imports.
        mpp: microns per level-0 pixel, overriding the metadata (needed where the metadata has none).

    Raises:
        SlideError: naming the file, when it is missing, not a slide, or of unknown resolution.
    """
    return Slide(path, backend, mpp)


__all__ = [
    "MPP_TIMES_OBJECTIVE",
    "magnification_mpp",
    "BACKENDS",
    "available_backends",
    "Slide",
    "open_slide",
]
