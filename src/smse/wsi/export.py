"""Tiles of many slides written to folders, with the manifest CSV that ``smse train`` reads as it is."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from smse.data.records import UNLABELLED, mag_name
from smse.errors import ConfigError, DataError, OutputError, SlideError
from smse.io import describe, read_text, writable_folder, write_csv, write_json
from smse.wsi.reader import magnification_mpp, open_slide
from smse.wsi.tiles import TileSpec, plan_tiles, resample

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "patient", "magnification", "slide", "x", "y", "tumor_type")
#: tile file formats: PIL format name and save options
FORMATS = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {"compress_level": 1})}


@dataclass(frozen=True)
class SlideLabel:
    """What a label CSV says of one slide."""

    label: str
    patient: str
    tumor_type: str = ""


def read_labels(path: str | os.PathLike) -> dict[str, SlideLabel]:
    """Slide -> label from a CSV (UTF-8) with columns ``slide,label[,patient][,tumor_type]``.

    ``slide`` is the slide's file name, with or without its suffix; ``patient`` defaults to the
    slide (tiles of one patient always fall on one side of a split, so give it where a patient has
    several slides).
    """
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as exc:  # a path longer than the system looks up
        raise DataError(f"--labels: cannot look up a path of {len(os.fsencode(path))} bytes ({exc.strerror})") from None
    if not found:
        raise DataError(f"{path}: label file not found")
    out: dict[str, SlideLabel] = {}
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("slide", "label") if c not in columns]
    if missing:
        raise DataError(f"{path}: label file lacks column(s) {missing}; it has {columns}")
    for line, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if not row["slide"] or not row["label"]:
            raise DataError(f"{path}:{line}: empty slide or label")
        if row["slide"] in out:
            raise DataError(f"{path}:{line}: slide {row['slide']!r} is listed twice")
        out[row["slide"]] = SlideLabel(row["label"], row.get("patient") or row["slide"], row.get("tumor_type", ""))
    return out


class _Writer:
    """Resamples, encodes and writes tiles on a background thread while the next ones are read."""

    def __init__(self, image_format: str, pending: int = 32):
        self.format, self.options = FORMATS[image_format]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="smse-tiles")
        self.queue: deque[Future] = deque()
        self.pending = pending

    def _save(self, path: Path, region: Image.Image, box: tuple | None, size: tuple[int, int]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            resample(region, box, size).save(tmp, format=self.format, **self.options)
            os.replace(tmp, path)  # a tile is complete or absent; the manifest, written last, lists complete ones
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the tile ({describe(exc)})") from None

    def submit(self, path: Path, region: Image.Image, box: tuple | None, size: tuple[int, int]) -> None:
        """Resample (where ``box`` says), encode and write a tile read from the slide."""
        self.queue.append(self.pool.submit(self._save, path, region, box, size))
        while len(self.queue) > self.pending:
            self.queue.popleft().result()

    def close(self) -> None:
        try:
            while self.queue:
                self.queue.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class TilingResult:
    """What ``write_tiles`` wrote: the manifest, the tile count and one summary per slide."""

    manifest: Path
    tiles: int
    slides: list[dict]


def _labels_for(paths: Sequence[Path], labels: dict[str, SlideLabel] | None) -> dict[Path, SlideLabel]:
    if labels is None:
        return {p: SlideLabel(UNLABELLED, p.stem) for p in paths}
    missing = [p.name for p in paths if p.stem not in labels and p.name not in labels]
    if missing:
        raise DataError(f"the label file has no row for slide(s) {', '.join(missing)}")
    return {p: labels.get(p.stem) or labels[p.name] for p in paths}


def write_tiles(
    slides: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    spec: TileSpec = TileSpec(),
    labels: str | os.PathLike | dict[str, SlideLabel] | None = None,
    mpp: float | None = None,
    backend: str | None = None,
    image_format: str = "jpg",
    progress: bool = True,
) -> TilingResult:
    """Cut every slide into concentric multi-magnification tiles under ``out``, and write the manifest.

    Layout: ``out/<slide>/<mag>X/<slide>_x<X>_y<Y>_<mag>X.<format>`` where (X, Y) is the location's
    level-0 centre; ``out/manifest.csv`` with columns ``path,label,patient,magnification,slide,x,y,
    tumor_type`` (paths relative to ``out``); ``out/tiles.json`` with the tiling and each slide's
    levels, resolution and counts. Every slide is opened (and its resolution checked) before the
    first tile is cut. A slide without tissue is reported and skipped.

    Args:
        slides: slide files.
        out: output folder.
        spec: magnifications, tile size, grid, tissue threshold, cap.
        labels: a label CSV (``read_labels``) or its contents; None labels every tile ``unlabelled``.
        mpp: microns per level-0 pixel for slides whose metadata lacks it.
        backend: ``openslide`` or ``tiffslide`` (default: the first that imports).
        image_format: ``jpg`` (quality 95) or ``png``.
        progress: show a progress bar per slide.
    """
    paths = [Path(s) for s in slides]
    if not paths:
        raise ConfigError("no slides given")
    if image_format not in FORMATS:
        raise ConfigError(f"--format: one of {', '.join(FORMATS)}, got {image_format!r}")
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise DataError(f"two slides have the id {p.stem!r}: {seen[p.stem]} and {p}; rename one")
        seen[p.stem] = p
    label_of = _labels_for(paths, read_labels(labels) if isinstance(labels, (str, os.PathLike)) else labels)
    for p in paths:
        open_slide(p, backend, mpp).close()
    out = writable_folder(out, "--out")
    ext = image_format
    writer = _Writer(image_format)
    rows: list[list] = []
    summaries: list[dict] = []
    try:
        for p in paths:
            with open_slide(p, backend, mpp) as slide:
                plan = plan_tiles(slide, spec)
                summary = {
                    "slide": slide.name,
                    **slide.describe(),
                    "locations": len(plan),
                    "grid_cells": plan.candidates,
                    "sources": {
                        mag_name(m): {"level": s.level, "scale": round(s.scale, 4)} for m, s in plan.sources.items()
                    },
                }
                summaries.append(summary)
                if not len(plan):
                    log.warning(
                        "%s: no location with %.0f%% tissue at every magnification; no tiles",
                        slide.path,
                        100 * spec.min_tissue,
                    )
                    continue
                lab = label_of[p]
                for mag in spec.magnifications:
                    writable_folder(out / slide.name / mag_name(mag), "tile folder")
                for x, y in plan.centres(progress):
                    for mag, (region, box) in plan.read((x, y)).items():
                        rel = Path(slide.name) / mag_name(mag) / f"{slide.name}_x{x}_y{y}_{mag_name(mag)}.{ext}"
                        writer.submit(out / rel, region, box, spec.size)
                        rows.append([rel.as_posix(), lab.label, lab.patient, mag, slide.name, x, y, lab.tumor_type])
    finally:
        writer.close()
    if not rows:
        where = f"any of the {len(paths)} slides" if len(paths) > 1 else paths[0]
        raise SlideError(
            f"no tissue found on {where} "
            f"(no location with {100 * spec.min_tissue:.0f}% tissue in every tile); "
            "check the slides or lower --min-tissue"
        )
    for summary in summaries:
        summary["labels"] = sorted({r[1] for r in rows if r[4] == summary["slide"]})
    manifest = out / "manifest.csv"
    write_csv(manifest, MANIFEST_COLUMNS, rows)
    write_json(
        out / "tiles.json",
        {"tiling": {**spec.to_dict(), "format": image_format}, "tiles": len(rows), "slides": summaries},
    )
    return TilingResult(manifest, len(rows), summaries)


#: fewer locations than this on a slide make a thin training set
FEW_LOCATIONS = 4


def advice(result: TilingResult, spec: TileSpec) -> list[str]:
    """What to change when a tiling is too thin to train on: slides without tiles or with few locations (the
    grid's field of view against the slide's size, with the options that fix it), and a single class."""
    out = []
    empty = [s for s in result.slides if not s["locations"]]
    few = [s for s in result.slides if 0 < s["locations"] < FEW_LOCATIONS]
    if empty or few:
        mpp = magnification_mpp(spec.grid_magnification)
        fw, fh = spec.size[0] * mpp, spec.size[1] * mpp
        sizes = [(s["dimensions"][0] * s["mpp"], s["dimensions"][1] * s["mpp"]) for s in empty + few]
        sw, sh = min(w for w, _ in sizes), min(h for _, h in sizes)
        out.append(
            f"{len(empty)} of {len(result.slides)} slides gave no tiles and {len(few)} fewer than {FEW_LOCATIONS} "
            f"locations: a {mag_name(spec.grid_magnification)} grid cell of {spec.size[0]}x{spec.size[1]} px covers "
            f"{fw:.0f}x{fh:.0f} um, and the smallest of these slides is {sw:.0f}x{sh:.0f} um; use smaller tiles "
            f"(--tile 192x128), a finer grid (--grid 100X), less tissue per tile (--min-tissue 0.3) or larger "
            "slides (smse synth --wsi --size 8000x6000)"
        )
    labels = sorted({label for s in result.slides for label in s.get("labels", [])})
    if len(labels) == 1 and labels[0] != "unlabelled":
        out.append(f"every tile is {labels[0]!r}: smse train needs tiles of at least two classes")
    return out


__all__ = [
    "read_labels",
    "TilingResult",
    "write_tiles",
    "advice",
]
