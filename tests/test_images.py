import io
import os

import numpy as np
import pytest
from PIL import Image

from smse.data.images import ImageCache, load_resized, read_image
from smse.errors import ImageError
from tests.conftest import png_bomb, write_png


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_odd_modes_become_rgb8(tmp_path, mode):
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "I;16":
        arr = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
        Image.fromarray(arr).save(path)
    else:
        write_png(path, 0, mode=mode) if mode != "CMYK" else Image.new("CMYK", (30, 20)).save(path)
    image = read_image(path)
    assert image.mode == "RGB"
    assert image.size == ((30, 20) if mode in ("I;16", "CMYK") else (35, 23))
    if mode == "I;16":  # 16-bit maps the full 0..65535 range onto 0..255
        np.testing.assert_array_equal(np.asarray(image)[..., 0], np.round(arr / 65535 * 255).astype(np.uint8))


def test_rgba_is_composited_on_white(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(path)
    assert np.asarray(read_image(path)).min() == 255


@pytest.mark.parametrize("size", [(700, 460), (700, 456), (500, 328)])
def test_odd_sizes_resize_to_target(tmp_path, size):
    path = write_png(tmp_path / "x.png", 0, size=size)
    assert load_resized(path, (32, 48)).shape == (32, 48, 3)


def test_truncated_corrupt_empty_missing_name_the_file(tmp_path):
    path = write_png(tmp_path / "t.png", 0, size=(200, 100))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="t.png: corrupt or truncated"):
        read_image(path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all" * 10)
    with pytest.raises(ImageError, match="junk.png: not an image"):
        read_image(junk)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: file is empty"):
        read_image(empty)
    with pytest.raises(ImageError, match="gone.png: file not found"):
        read_image(tmp_path / "gone.png")


def test_cache_matches_direct_decode_and_follows_changes(tmp_path):
    path = write_png(tmp_path / "x.png", 0, size=(70, 46))
    cache = ImageCache(tmp_path / "cache", (23, 35))
    first = cache.load(str(path))
    np.testing.assert_array_equal(first, load_resized(path, (23, 35)))
    entries = list((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))
    np.testing.assert_array_equal(cache.load(str(path)), first)
    write_png(path, 1, size=(70, 46))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    second = cache.load(str(path))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, load_resized(path, (23, 35)))


def test_cache_recovers_from_a_damaged_entry(tmp_path):
    path = write_png(tmp_path / "x.png", 0)
    cache = ImageCache(tmp_path / "cache", (16, 16))
    cache.load(str(path))
    (entry,) = list((tmp_path / "cache").rglob("*.npy"))
    entry.write_bytes(b"garbage")
    assert cache.load(str(path)).shape == (16, 16, 3)


def test_file_objects_and_the_pixel_limit(tmp_path):
    path = write_png(tmp_path / "x.png", 0, size=(60, 40))
    with open(path, "rb") as handle:
        assert read_image(handle).size == (60, 40)
    data = path.read_bytes()
    np.testing.assert_array_equal(
        np.asarray(read_image(io.BytesIO(data), name="upload.png")), np.asarray(read_image(path))
    )
    assert read_image(io.BytesIO(data), max_pixels=2400).size == (60, 40)
    with pytest.raises(ImageError, match=r"^upload.png: image is 60x40 = 2,400 pixels, over the limit of 2,399$"):
        read_image(io.BytesIO(data), max_pixels=2399, name="upload.png")
    with pytest.raises(ImageError, match="^upload.png: file is empty"):
        read_image(io.BytesIO(b""), name="upload.png")
    with pytest.raises(ImageError, match="^<upload>: not an image"):
        read_image(io.BytesIO(b"text" * 10))


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(5000, 5000))  # 24 kB that decode to 25 MB
    with pytest.raises(
        ImageError, match="bomb.png: image is 5000x5000 = 25,000,000 pixels, over the limit of 1,000,000"
    ):
        read_image(bomb, max_pixels=1_000_000)
    assert read_image(bomb).size == (5000, 5000)  # under PIL's own limit
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_bomb(20_000, 20_000, rows=1))  # 400 megapixels: over twice PIL's limit
    with pytest.raises(ImageError, match="huge.png: too large to decode safely, a possible decompression bomb"):
        read_image(huge)
    with pytest.raises(ImageError, match="huge.png: too large to decode safely"):
        read_image(huge, max_pixels=10**12)  # PIL's limit still holds
