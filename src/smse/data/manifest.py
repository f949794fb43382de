"""CSV manifests (path, label, patient, magnification[, split][, tumor_type][, slide, x, y]) for any organ."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from smse.data.records import UNKNOWN_MAGNIFICATION, Record, canonical_path
from smse.errors import DataError
from smse.io import read_text, write_csv

REQUIRED = ("path", "label", "patient")
SPLITS = ("train", "val", "test")
FIELDS = ("label", "tumor_type", "patient", "magnification", "split")


def _magnification(value: str, where: str) -> int:
    text = (value or "").strip().upper().removesuffix("X")
    if not text:
        return UNKNOWN_MAGNIFICATION
    try:
        mag = int(float(text))
    except ValueError:
        raise DataError(f"{where}: magnification {value!r} is not a number") from None
    if mag <= 0:
        raise DataError(f"{where}: magnification {value!r} must be positive")
    return mag


def read_manifest(path: str | os.PathLike, skip_bad: bool = False) -> tuple[list[Record], list[tuple[str, str]]]:
    """Records from a manifest CSV (UTF-8, with or without a byte-order mark).

    Relative image paths are taken from the CSV's folder. Columns: ``path``, ``label``, ``patient``
    (required), ``magnification`` (``40``, ``40X`` or empty), ``split`` (``train``/``val``/``test``
    or empty), ``tumor_type`` (defaults to label), ``slide,x,y`` (a tile's slide and level-0 centre, as
    ``smse tiles`` writes them; all three or none).
    A row repeated verbatim counts once.

    Raises:
        DataError: naming the file and line, for a bad row (unless ``skip_bad``), two rows of one image
            that disagree, or two spellings of one label, tumour type or patient that differ only in
            case or spaces.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest file not found")
    base = path.parent
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    first: dict[str, tuple[int, Record]] = {}  # path -> (line, record) of the image's first row
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {missing}; it has {columns}")
    for line, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        try:
            record = _record(row, base, f"{path}:{line}")
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((row.get("path") or f"{path}:{line}", str(exc)))
            continue
        earlier_line, earlier = first.setdefault(record.path, (line, record))
        if earlier_line == line:
            records.append(record)
        elif earlier != record:
            raise DataError(
                f"{path}:{line}: {record.path} is also listed on line {earlier_line}, with "
                + ", ".join(
                    f"{f} {getattr(record, f)!r} here and {getattr(earlier, f)!r} there"
                    for f in FIELDS
                    if getattr(record, f) != getattr(earlier, f)
                )
            )
    if not records:
        raise DataError(f"{path}: manifest lists no usable images")
    _check_spellings(records, {p: line for p, (line, _) in first.items()}, path)
    return records, skipped


def _record(row: dict[str, str], base: Path, where: str) -> Record:
    if not row["path"] or not row["label"] or not row["patient"]:
        raise DataError(f"{where}: empty path, label or patient")
    image = Path(row["path"])
    image = image if image.is_absolute() else base / image
    try:
        found = image.is_file()
    except OSError as exc:  # a path the system cannot take (over its length limit, say)
        raise DataError(f"{where}: image path cannot be used ({exc.strerror or exc})") from None
    if not found:
        raise DataError(f"{where}: image {image} not found")
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {SPLITS}")
    slide, x, y = _location(row, where)
    return Record(
        path=canonical_path(image),
        label=row["label"],
        tumor_type=row.get("tumor_type") or row["label"],
        patient=row["patient"],
        magnification=_magnification(row.get("magnification", ""), where),
        split=split,
        slide=slide,
        x=x,
        y=y,
    )


def _location(row: dict[str, str], where: str) -> tuple[str | None, float | None, float | None]:
    """The optional ``slide,x,y`` of a row (a tile's slide and level-0 centre): all three, or none."""
    slide, x, y = row.get("slide") or None, row.get("x") or None, row.get("y") or None
    if slide is None and x is None and y is None:
        return None, None, None
    if slide is None or x is None or y is None:
        missing = [n for n, v in (("slide", slide), ("x", x), ("y", y)) if v is None]
        raise DataError(f"{where}: a tile's location needs slide, x and y; {', '.join(missing)} empty")
    try:
        fx, fy = float(x), float(y)
    except ValueError:
        raise DataError(f"{where}: x {x!r} and y {y!r} must be numbers (level-0 pixels)") from None
    if not (math.isfinite(fx) and math.isfinite(fy)):
        raise DataError(f"{where}: x {x!r} and y {y!r} must be finite")
    return slide, fx, fy


def _check_spellings(records: list[Record], line_of: dict[str, int], path: Path) -> None:
    """Refuse two spellings of one name (``Benign`` / ``benign``): they would count as two classes or patients."""
    for name in ("label", "tumor_type", "patient"):
        first: dict[str, Record] = {}
        for r in records:
            value = getattr(r, name)
            other = first.setdefault(" ".join(value.split()).casefold(), r)
            if getattr(other, name) != value:
                raise DataError(
                    f"{path}: {name} {getattr(other, name)!r} (line {line_of[other.path]}) and {value!r} "
                    f"(line {line_of[r.path]}) differ only in case or spaces; write one name one way"
                )


def write_manifest(path: str | os.PathLike, records: list[Record]) -> None:
    """Write records as a manifest CSV (absolute paths; ``slide,x,y`` where any record has a location)."""
    located = any(r.slide is not None for r in records)
    columns = ["path", "label", "tumor_type", "patient", "magnification", "split"]
    write_csv(
        path,
        columns + (["slide", "x", "y"] if located else []),
        (
            [r.path, r.label, r.tumor_type, r.patient, r.magnification or "", r.split or ""]
            + ([r.slide or "", "" if r.x is None else f"{r.x:g}", "" if r.y is None else f"{r.y:g}"] if located else [])
            for r in records
        ),
    )


__all__ = [
    "read_manifest",
    "write_manifest",
]
