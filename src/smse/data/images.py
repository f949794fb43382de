"""Reading images as 8-bit RGB with clear errors, and an on-disk cache of decoded, resized arrays."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from smse.errors import ImageError
from smse.io import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MIN_SIDE = 8  # pixels; anything smaller is a thumbnail or an icon, not a field of view


def default_max_pixels() -> int | None:
    """The default pixel limit: PIL's decompression-bomb error threshold, 2 x ``Image.MAX_IMAGE_PIXELS``.

    That is about 179 megapixels (None: no limit, where ``Image.MAX_IMAGE_PIXELS`` is None). It is also the
    ceiling of any larger limit: PIL refuses to open images above it.
    """
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * limit


def check_size(name: str, width: int, height: int, max_pixels: int | None = None) -> None:
    """Refuse an image under ``MIN_SIDE`` pixels a side, or over ``max_pixels`` (default ``default_max_pixels()``).

    The one size check of every input kind: a file's header, a PIL image, an array, a tensor.

    Raises:
        ImageError: naming the image and its size.
    """
    limit = max_pixels if max_pixels is not None else default_max_pixels()
    if limit is not None and width * height > limit:
        raise ImageError(name, f"image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(name, f"image is only {width}x{height} pixels")


def as_rgb8(image: Image.Image, name: str, max_pixels: int | None = None) -> Image.Image:
    """The one conversion of every image, decoded from a file or given in memory: sizes checked (``check_size``),
    then 8-bit RGB (``to_rgb8``). A path and ``PIL.Image.open`` of that path give the same pixels.

    Raises:
        ImageError: naming the image, for one under 8 px a side, over the pixel limit, or that cannot be decoded.
    """
    check_size(name, image.width, image.height, max_pixels)
    try:
        rgb = to_rgb8(image)
        rgb.load()
    except Exception as exc:  # noqa: BLE001 - a lazily opened image decodes here; damage makes PIL raise many kinds
        raise ImageError(name, f"corrupt or truncated image ({str(exc) or type(exc).__name__})") from None
    return rgb


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert grayscale, palette, RGBA and 16-bit images to 8-bit RGB (transparency composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, path: str, max_pixels: int | None = None) -> tuple[Image.Image, str]:
    """Decode the bytes of image file ``path`` fully; returns the 8-bit RGB image and the file's own mode.

    Args:
        max_pixels: refuse images with more pixels than this, read from the header before any decoding
            (default: PIL's decompression-bomb error threshold, ``default_max_pixels()``, about 179 megapixels,
            which also stays the ceiling of a larger limit). PIL's warning at half that is not a refusal.

    Raises:
        ImageError: naming the file, for empty, truncated, corrupt, tiny (< 8 px) or oversized images.
    """
    if not data:
        raise ImageError(path, "file is empty")
    limit = max_pixels if max_pixels is not None else default_max_pixels()
    try:
        with warnings.catch_warnings():
            # PIL warns from half its error threshold on; the limit here is ``limit``, checked from the same header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                mode = image.mode
                check_size(path, image.width, image.height, limit)
                image.load()
                rgb = as_rgb8(image, path, limit)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file PIL can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"too large to decode safely, a possible decompression bomb ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - damaged bytes make PIL raise many kinds; each means a bad file
        raise ImageError(path, f"corrupt or truncated image ({str(exc) or type(exc).__name__})") from None
    return rgb, mode


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an image file.

    Raises:
        ImageError: naming the file when it is missing or cannot be read.
    """
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(str(path), "file not found") from None
    except OSError as exc:
        raise ImageError(str(path), f"cannot read the file ({exc.strerror or exc})") from None


def read_image(
    source: str | os.PathLike | BinaryIO, max_pixels: int | None = None, name: str | None = None
) -> Image.Image:
    """Decode a file (a path or a binary file object) fully into an 8-bit RGB image.

    Args:
        source: a path, or an open binary file such as an upload's bytes in ``io.BytesIO``.
        max_pixels: refuse images with more pixels than this (see ``decode_image``).
        name: what errors call the file (default: the path, or the file object's ``name``).

    Raises:
        ImageError: naming the file, for a missing, empty, truncated, undecodable, tiny or too large image.
    """
    if isinstance(source, (str, os.PathLike)):
        return decode_image(read_bytes(source), name or str(source), max_pixels)[0]
    return decode_image(source.read(), name or str(getattr(source, "name", "<upload>")), max_pixels)[0]


#: PIL's filter of each interpolation name (timm's names)
RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def resize_image(image: Image.Image, size: tuple[int, int], interpolation: str = "bilinear") -> Image.Image:
    """Resize to ``size`` = (height, width) the way every training image is resized (antialiased)."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), RESAMPLING[interpolation], reducing_gap=2.0)
    return image


def resize_channels(image: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """Resize a CxHxW float image to ``size`` = (height, width) as ``resize_image`` resizes 8-bit RGB: PIL's filter,
    channel by channel in 32-bit float, so a float image and its 8-bit version come out alike (to rounding)."""
    channels = [Image.fromarray(np.ascontiguousarray(c, np.float32), "F") for c in image]
    return np.stack([np.asarray(resize_image(c, size, interpolation)) for c in channels])


def load_resized(path: str | os.PathLike, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """Decode ``path`` and resize it to ``size`` = (height, width); returns HxWx3 uint8."""
    return np.asarray(resize_image(read_image(path), size, interpolation), dtype=np.uint8)


class ImageCache:
    """Decoded, resized uint8 arrays on disk, keyed by path, file size, mtime and target size.

    A changed file gets a new key, so a stale entry is never served. Entries are written
    atomically, so a killed run leaves no half-written array.
    """

    def __init__(self, root: str | os.PathLike, size: tuple[int, int], interpolation: str = "bilinear"):
        suffix = "" if interpolation == "bilinear" else f"-{interpolation}"
        self.root = Path(root) / "images" / f"{size[0]}x{size[1]}{suffix}"
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    def key(self, path: str) -> str:
        st = os.stat(path)
        ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{self.size}"
        return hashlib.sha1(ident.encode()).hexdigest()

    def load(self, path: str) -> np.ndarray:
        try:
            key = self.key(path)
        except FileNotFoundError:
            raise ImageError(str(path), "file not found") from None
        entry = self.root / key[:2] / f"{key}.npy"
        if entry.exists():
            try:
                return np.load(entry)
            except (OSError, ValueError):
                entry.unlink(missing_ok=True)
        array = load_resized(path, self.size, self.interpolation)
        with atomic_path(entry) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)
        return array


def default_cache_dir() -> Path:
    """``$SMSE_CACHE_DIR``, else ``~/.cache/smse``."""
    env = os.environ.get("SMSE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "smse"


__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_SIDE",
    "default_max_pixels",
    "check_size",
    "as_rgb8",
    "to_rgb8",
    "decode_image",
    "read_bytes",
    "read_image",
    "resize_image",
    "resize_channels",
    "load_resized",
    "ImageCache",
    "default_cache_dir",
]
