"""The BreakHis folder tree and file names, parsed exactly; counts validated against the archive."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from smse.data.images import IMAGE_SUFFIXES
from smse.data.records import MAGNIFICATIONS, Record
from smse.errors import DataError

CLASS_FOLDERS = {"B": "benign", "M": "malignant"}
TYPE_FOLDERS = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
TYPE_CLASS = {"A": "B", "F": "B", "PT": "B", "TA": "B", "DC": "M", "LC": "M", "MC": "M", "PC": "M"}
TYPES = tuple(TYPE_FOLDERS)

#: Images per tumour type and magnification in the complete archive (7,909 images).
ARCHIVE_COUNTS = {
    "A": (114, 113, 111, 106),
    "F": (253, 260, 264, 237),
    "PT": (109, 121, 108, 115),
    "TA": (149, 150, 140, 130),
    "DC": (864, 903, 896, 788),
    "LC": (156, 170, 163, 137),
    "MC": (205, 222, 196, 169),
    "PC": (145, 142, 135, 138),
}
ARCHIVE_TOTAL = 7909

FILE_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<type>A|F|PT|TA|DC|LC|MC|PC)-(?P<year>\d{2})-(?P<slide>\d+[A-Z]*)"
    r"-(?P<mag>\d+)-(?P<seq>\d{3})\.png$"
)


def parse_name(name: str) -> dict:
    """Parse a BreakHis file name into class code, type, year, slide id, magnification, sequence.

    Slide ids keep their letter suffixes (``22549AB``): suffixed ids are different slides.

    Raises:
        DataError: naming the file when it is not a BreakHis name or its magnification is unknown.
    """
    m = FILE_RE.match(name)
    if not m:
        raise DataError(f"{name}: not a BreakHis file name (expected SOB_<B|M>_<type>-<yy>-<slide>-<mag>-<nnn>.png)")
    mag = int(m["mag"])
    if mag not in MAGNIFICATIONS:
        raise DataError(f"{name}: unknown magnification {mag}X (expected one of 40, 100, 200, 400)")
    if TYPE_CLASS[m["type"]] != m["cls"]:
        raise DataError(f"{name}: tumour type {m['type']} does not belong to class {m['cls']}")
    return {
        "cls": m["cls"],
        "type": m["type"],
        "year": m["year"],
        "slide": m["slide"],
        "magnification": mag,
        "seq": int(m["seq"]),
        "patient": f"{m['year']}-{m['slide']}",
        "slide_folder": f"SOB_{m['cls']}_{m['type']}_{m['year']}-{m['slide']}",
    }


def find_breast_root(path: str | os.PathLike) -> Path:
    """Locate ``histology_slides/breast`` at or below ``path`` (official tree or the doubly nested copy).

    The folder is returned in canonical form (symbolic links and ``..`` resolved), so every record's
    path is written the same way however the data root was given.
    """
    path = Path(os.path.realpath(path))
    if not path.exists():
        raise DataError(f"{path}: folder does not exist")
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    if path.name == "breast" and path.parent.name == "histology_slides":
        return path
    for candidate in (
        path / "histology_slides" / "breast",
        path / "BreaKHis_v1" / "histology_slides" / "breast",
        path / "BreaKHis_v1" / "BreaKHis_v1" / "histology_slides" / "breast",
    ):
        if candidate.is_dir():
            return candidate
    found = sorted(p for p in path.glob("*/*/*/histology_slides/breast") if p.is_dir())
    if found:
        return found[0]
    raise DataError(f"{path}: no BreakHis tree (histology_slides/breast) found here or below")


def record_from_path(path: Path, breast_root: Path, real_folders: dict[str, str] | None = None) -> Record:
    """Build a record from one file of the tree, checking that every folder agrees with its name.

    The record's path is canonical (``canonical_path``) where a folder on the way is a symbolic link;
    ``real_folders`` caches the resolved folders over a scan.
    """
    rel = path.relative_to(breast_root).parts
    if len(rel) != 6 or rel[1] != "SOB":
        raise DataError(f"{path}: not at <class>/SOB/<type>/<slide>/<mag>X/<file> under {breast_root}")
    info = parse_name(rel[5])
    expected = (
        CLASS_FOLDERS[info["cls"]],
        "SOB",
        TYPE_FOLDERS[info["type"]],
        info["slide_folder"],
        f"{info['magnification']}X",
    )
    for got, want, what in zip(rel[:5], expected, ("class", "SOB", "type", "slide", "magnification")):
        if got != want:
            raise DataError(f"{path}: {what} folder {got!r} disagrees with the file name (expected {want!r})")
    return Record(
        path=os.path.join(_real_folder(str(path.parent), real_folders), path.name),
        label=CLASS_FOLDERS[info["cls"]],
        tumor_type=info["type"],
        patient=info["patient"],
        magnification=info["magnification"],
    )


def _real_folder(folder: str, cache: dict[str, str] | None) -> str:
    if cache is None:
        return os.path.realpath(folder)
    if folder not in cache:
        cache[folder] = os.path.realpath(folder)
    return cache[folder]


def _unreadable(exc: OSError) -> None:
    raise DataError(f"{exc.filename}: cannot read this folder ({exc.strerror}); its images would be left out")


def iter_image_files(root: Path) -> Iterable[Path]:
    """Image files below ``root`` in sorted order, hidden files skipped; folders that are symbolic links followed.

    Raises:
        DataError: naming a folder that cannot be listed, a symbolic link that leads nowhere, or a folder reached
            twice (a link loop, or two links to one folder), rather than leaving its images out or counting them twice.
    """
    reached: dict[str, str] = {}  # canonical folder -> the path it was first reached by
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in reached:
            raise DataError(
                f"{dirpath}: leads to {real}, already reached as {reached[real]} (a symbolic link loop, or two links "
                "to one folder); its images would be counted twice, so remove the link"
            )
        reached[real] = dirpath
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield path  # a broken link named as an image is reported by name where it is read
            elif path.is_symlink() and not path.exists():  # os.walk lists a link to a missing folder as a file
                raise DataError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist")


def scan_breakhis(
    path: str | os.PathLike, magnifications: Sequence[int] | None = None, skip_bad: bool = False
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Records for every image of a BreakHis tree; with ``skip_bad`` bad names are skipped and returned.

    Returns:
        The records (sorted by path) and the ``(path, reason)`` of each skipped file.
    """
    root = find_breast_root(path)
    if magnifications is not None:
        unknown = sorted(set(magnifications) - set(MAGNIFICATIONS))
        if unknown:
            raise DataError(f"data.magnifications: unknown magnification(s) {unknown}; BreakHis has {MAGNIFICATIONS}")
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    real_folders: dict[str, str] = {}
    for file in iter_image_files(root):
        try:
            record = record_from_path(file, root, real_folders)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((str(file), str(exc).split(": ", 1)[-1]))
            continue
        if magnifications is None or record.magnification in magnifications:
            records.append(record)
    if not records and not skipped:
        raise DataError(f"{root}: no BreakHis images found")
    return records, skipped


def check_counts(records: Sequence[Record]) -> str:
    """One line comparing the counts per type and magnification with the complete archive."""
    counts = Counter((r.tumor_type, r.magnification) for r in records)
    if len(records) == ARCHIVE_TOTAL and all(
        counts[(t, m)] == n for t, row in ARCHIVE_COUNTS.items() for m, n in zip(MAGNIFICATIONS, row)
    ):
        return "counts match the complete BreakHis archive (7,909 images)"
    over = [f"{t}@{m}X" for t, row in ARCHIVE_COUNTS.items() for m, n in zip(MAGNIFICATIONS, row) if counts[(t, m)] > n]
    if over:
        return f"more images than the archive holds for {', '.join(over)}: not the official BreakHis set"
    return f"a subset of the archive ({len(records)} of {ARCHIVE_TOTAL:,} images)"


__all__ = [
    "CLASS_FOLDERS",
    "TYPE_FOLDERS",
    "TYPE_CLASS",
    "TYPES",
    "parse_name",
    "find_breast_root",
    "iter_image_files",
    "scan_breakhis",
    "check_counts",
]
