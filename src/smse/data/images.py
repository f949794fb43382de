"""Reading images as 8-bit RGB with clear errors, and an on-disk cache of decoded, resized arrays."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from smse.errors import ImageError
from smse.io import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert grayscale, palette, RGBA and 16-bit images to 8-bit RGB."""
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


def read_image(source: str | os.PathLike | BinaryIO, max_pixels: int | None = None,
               name: str | None = None) -> Image.Image:
    """Decode a file (a path or a binary file object) fully into an 8-bit RGB image.

    Args:
        source: a path, or an open binary file such as an upload's bytes in ``io.BytesIO``.
        max_pixels: refuse images with more pixels than this, read from the header before any decoding
            (default: PIL's decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``).
        name: what errors call the file (default: the path, or the file object's ``name``).

    Raises:
        ImageError: naming the file, for a missing, empty, truncated, undecodable or too large image.
    """
    is_path = isinstance(source, (str, os.PathLike))
    name = name or (str(source) if is_path else str(getattr(source, "name", "<upload>")))
    try:
        if _byte_size(source, is_path) == 0:
            raise ImageError(name, "file is empty")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_pixels(name, *image.size, max_pixels)
                image.load()
                rgb = to_rgb8(image)
                rgb.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image file PIL can identify") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(name, f"too many pixels, a possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(name, f"corrupt or truncated image ({exc})") from None
    if rgb.width < 8 or rgb.height < 8:
        raise ImageError(name, f"image is only {rgb.width}x{rgb.height} pixels")
    return rgb


def _byte_size(source: str | os.PathLike | BinaryIO, is_path: bool) -> int:
    if is_path:
        return os.path.getsize(source)
    start = source.tell()
    end = source.seek(0, os.SEEK_END)
    source.seek(start)
    return end - start


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageError(name, f"image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}")


def resize_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``size`` = (height, width) the way every training image is resized (bilinear, antialiased)."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return image


def load_resized(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Decode ``path`` and resize it to ``size`` = (height, width); returns HxWx3 uint8."""
    return np.asarray(resize_image(read_image(path), size), dtype=np.uint8)


class ImageCache:
    """Decoded, resized uint8 arrays on disk, keyed by path, file size, mtime and target size.

    A changed file gets a new key, so a stale entry is never served. Entries are written
    atomically, so a killed run leaves no half-written array.
    """

    def __init__(self, root: str | os.PathLike, size: tuple[int, int]):
        self.root = Path(root) / "images" / f"{size[0]}x{size[1]}"
        self.size = (int(size[0]), int(size[1]))

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
        array = load_resized(path, self.size)
        with atomic_path(entry) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)
        return array


def default_cache_dir() -> Path:
    """``$SMSE_CACHE_DIR``, else ``~/.cache/smse``."""
    env = os.environ.get("SMSE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "smse"
