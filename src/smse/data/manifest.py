"""CSV manifests (path, label, patient, magnification[, split][, tumor_type]) for any organ."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from smse.data.records import UNKNOWN_MAGNIFICATION, Record
from smse.errors import DataError
from smse.io import write_csv

REQUIRED = ("path", "label", "patient")
SPLITS = ("train", "val", "test")


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
    """Records from a manifest CSV; relative image paths are taken from the CSV's folder.

    Columns: ``path``, ``label``, ``patient`` (required), ``magnification`` (``40``, ``40X`` or
    empty), ``split`` (``train``/``val``/``test`` or empty), ``tumor_type`` (defaults to label).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest file not found")
    base = path.parent
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise DataError(f"{path}: manifest lacks column(s) {missing}; it has {columns}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            where = f"{path}:{line}"
            try:
                if not row["path"] or not row["label"] or not row["patient"]:
                    raise DataError(f"{where}: empty path, label or patient")
                image = Path(row["path"])
                image = image if image.is_absolute() else base / image
                if not image.is_file():
                    raise DataError(f"{where}: image {image} not found")
                split = row.get("split") or None
                if split is not None and split not in SPLITS:
                    raise DataError(f"{where}: split {split!r} is not one of {SPLITS}")
                records.append(Record(
                    path=str(image.resolve()), label=row["label"],
                    tumor_type=row.get("tumor_type") or row["label"], patient=row["patient"],
                    magnification=_magnification(row.get("magnification", ""), where), split=split,
                ))
            except DataError as exc:
                if not skip_bad:
                    raise
                skipped.append((row.get("path") or where, str(exc)))
    if not records:
        raise DataError(f"{path}: manifest lists no usable images")
    return records, skipped


def write_manifest(path: str | os.PathLike, records: list[Record]) -> None:
    """Write records as a manifest CSV (absolute paths)."""
    write_csv(path, ["path", "label", "tumor_type", "patient", "magnification", "split"],
              ([r.path, r.label, r.tumor_type, r.patient, r.magnification or "", r.split or ""] for r in records))
