"""Whole-slide tiles: `smse tiles` against bare read_region calls for the same regions, side by side.

`smse tiles` finds the tissue on a thumbnail, cuts each location's tiles at every magnification
(resampling where no level matches), encodes and writes them, and writes the manifest. The
baseline only calls the slide library's own ``read_region`` for exactly the regions `smse tiles`
reads. Both run per backend (OpenSlide, tiffslide), interleaved over rounds, best round each; lossless
PNG tiles (``--format png``) are timed once, for information.

Run: python benchmarks/wsi.py [--quick]   (renders a synthetic 20x slide under benchmarks/out once)
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, machine  # noqa: E402

from smse.synth.wsi import generate_slides  # noqa: E402
from smse.wsi import TileSpec, available_backends, open_slide, plan_tiles, write_tiles  # noqa: E402
from smse.wsi.reader import BACKENDS  # noqa: E402
from smse.wsi.tiles import resample, window  # noqa: E402

#: scan -> (level-0 size, um/px): 3 x 2.25 mm and 4 x 3 mm of glass
SCANS = {"40x": ((12000, 9000), 0.25), "20x": ((8000, 6000), 0.5)}


def bench_slide(size: tuple[int, int], mpp: float) -> Path:
    """One synthetic slide under benchmarks/out (rendered once)."""
    root = OUT / f"wsi-{size[0]}x{size[1]}-{mpp}"
    if not (root / "labels.csv").exists():
        generate_slides(root, patients=1, seed=0, size=size, mpp=mpp, proportions="DC=1", workers=1)
    return next((root / "slides").glob("*.tiff"))


def regions(path: Path, spec: TileSpec, backend: str) -> tuple[list, str]:
    """(level, level-0 location, size) of every region `smse tiles` reads, and where each magnification comes from."""
    lib = BACKENDS[backend]()
    out = []
    with open_slide(path, backend) as slide:
        plan = plan_tiles(slide, spec)
        sources = ", ".join(
            f"{m}X: level {s.level}" + ("" if s.scale == 1 else f" resampled {s.scale:g}:1")
            for m, s in plan.sources.items()
        )
        for centre in plan.locations:
            for source in plan.sources.values():
                (x, y, w, h), _ = window(slide, source, tuple(centre), spec.size)
                ds = slide.level_downsamples[source.level]
                out.append((source.level, (lib.to_level0(x, ds), lib.to_level0(y, ds)), (w, h)))
    return out, sources


def measure(path: Path, spec: TileSpec, backend: str) -> dict:
    """Tiles/s of bare read_region calls and of `smse tiles` on one slide with one backend."""
    lib = BACKENDS[backend]()
    todo, sources = regions(path, spec, backend)

    def bare() -> int:
        handle = lib.open(str(path))
        for level, location, region in todo:
            handle.read_region(location, level, region)
        handle.close()
        return len(todo)

    def smse_tiles(image_format: str) -> int:
        out = Path(tempfile.mkdtemp(prefix="smse-wsi-bench-"))
        try:
            return write_tiles([path], out, spec, backend=backend, image_format=image_format, progress=False).tiles
        finally:
            shutil.rmtree(out)

    runs = {"bare": bare, "jpg": lambda: smse_tiles("jpg")}
    best = {k: float("inf") for k in runs}
    counts = {}
    for fn in runs.values():  # warm-up: file cache, imports
        fn()
    for _ in range(3):
        for name, fn in runs.items():
            start = time.perf_counter()
            counts[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    start = time.perf_counter()  # lossless tiles, for information: one run
    counts["png"] = smse_tiles("png")
    best["png"] = time.perf_counter() - start
    rate = {k: counts[k] / best[k] for k in best}
    return {
        "backend": backend,
        "tiles": counts["bare"],
        "sources": sources,
        "rates": rate,
        "ratio_jpg": rate["jpg"] / rate["bare"],
        "ratio_png": rate["png"] / rate["bare"],
        "cpu_ms_per_tile": cpu_breakdown(path, spec, backend, bare),
    }


def cpu_breakdown(path: Path, spec: TileSpec, backend: str, bare) -> dict:
    """CPU milliseconds per tile (all threads; other processes' load does not count) of each step, one pass each."""
    with open_slide(path, backend) as slide:
        plan = plan_tiles(slide, spec)
        start = time.process_time()
        n = bare()
        steps = {"bare read_region": time.process_time() - start}
        start = time.process_time()
        regions = [region for centre in plan.locations for region in plan.read(tuple(centre)).values()]
        steps["smse read (one per level)"] = time.process_time() - start
    start = time.process_time()
    tiles = [resample(image, box, spec.size) for image, box in regions]
    steps["resample"] = time.process_time() - start
    start = time.process_time()
    for tile in tiles:
        tile.save(io.BytesIO(), format="JPEG", quality=95)
    steps["JPEG encode"] = time.process_time() - start
    return {k: 1000 * v / n for k, v in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small 20x slide and fewer locations")
    args = parser.parse_args()
    scans = {"20x": ((4000, 3000), 0.5)} if args.quick else SCANS
    spec = TileSpec(size=(700, 460), grid=400, min_tissue=0.25, max_locations=20 if args.quick else 150)
    rows = []
    for scan, (size, mpp) in scans.items():
        path = bench_slide(size, mpp)
        for backend in available_backends():
            rows.append({"scan": scan, "size": list(size), "mpp": mpp, **measure(path, spec, backend)})
    print(
        f"# whole-slide tiles: 700x460 px tiles at 40X, 100X, 200X, 400X, up to {spec.max_locations} locations "
        f"(one per 400X field with 25% tissue in every tile); {date.today()}; {machine()}"
    )
    print(
        "| scan | backend | tiles | bare read_region tiles/s | smse tiles (jpg) tiles/s | ratio "
        "| smse tiles --format png tiles/s (one run) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scan']} ({r['size'][0]}x{r['size'][1]} px, {r['mpp']} um/px) | {r['backend']} | {r['tiles']} "
            f"| {r['rates']['bare']:.1f} | {r['rates']['jpg']:.1f} | {r['ratio_jpg']:.2f} | {r['rates']['png']:.1f} "
            f"| {r['ratio_png']:.2f} |"
        )
    for scan in scans:
        print(f"{scan}: " + next(r["sources"] for r in rows if r["scan"] == scan))
    steps = list(rows[0]["cpu_ms_per_tile"])
    print("\nCPU ms per tile (process time, all threads):")
    print("| scan | backend | " + " | ".join(steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for r in rows:
        print(f"| {r['scan']} | {r['backend']} | " + " | ".join(f"{r['cpu_ms_per_tile'][k]:.2f}" for k in steps) + " |")
    print("target: smse tiles (default jpg) / bare read_region >= 0.8")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "wsi.json").write_text(json.dumps({"spec": spec.to_dict(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
