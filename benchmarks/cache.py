"""Image loading: PNG decode + resize every time vs the on-disk cache of resized uint8 arrays.

Run: python benchmarks/cache.py   (uses ../shared/data/breakhis-sample when present: real 700x460 PNGs)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SAMPLE, machine, synthetic_set, timed  # noqa: E402

from smse.data.breakhis import iter_image_files  # noqa: E402
from smse.data.images import ImageCache, load_resized  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="time only the first N images")
    args = parser.parse_args()
    files = (
        list(iter_image_files(SAMPLE))
        if SAMPLE.exists()
        else list(iter_image_files(synthetic_set(8, 4, size=(700, 460))))
    )[: args.limit]
    size = (224, 336)
    cache_root = Path(tempfile.mkdtemp())
    cache = ImageCache(cache_root, size)
    for f in files:  # fill the cache (first epoch)
        cache.load(str(f))
    uncached = timed(lambda: [load_resized(f, size) for f in files], repeat=3)
    cached = timed(lambda: [cache.load(str(f)) for f in files], repeat=3)
    shutil.rmtree(cache_root)
    n = len(files)
    print(
        f"# image loading, {n} files from "
        f"{'the real BreakHis sample' if SAMPLE.exists() else 'synthetic 700x460 PNGs'}, "
        f"resized to {size[1]}x{size[0]}; {date.today()}; {machine()}"
    )
    print("| path | images/s |")
    print("|---|---|")
    print(f"| decode PNG + resize | {n / uncached:.0f} |")
    print(f"| cached array | {n / cached:.0f} |")
    print(f"ratio cached / uncached: {uncached / cached:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
