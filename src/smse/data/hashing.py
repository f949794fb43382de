"""One cached pass over each image file (hash, size, a full decode), and the policy for identical images."""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path

from smse.data.images import decode_image, read_bytes
from smse.data.records import Record
from smse.errors import ConfigError, ImageError
from smse.io import write_json
from smse.progress import progress

DUPLICATE_POLICIES = ("prefer-ductal", "drop-conflicts", "keep")


@dataclass(frozen=True)
class FileInfo:
    """What one pass over a file's bytes tells: content hash, header size and mode, any error."""

    sha1: str
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str | None = None


def inspect_file(path: str) -> FileInfo:
    """Hash ``path`` and decode it fully, as training will: every kind of damage shows here, once."""
    try:
        data = read_bytes(path)
    except ImageError as exc:
        return FileInfo("", error=exc.reason)
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        image, mode = decode_image(data, path)
    except ImageError as exc:
        return FileInfo(sha1, error=exc.reason)
    return FileInfo(sha1, image.width, image.height, mode)


#: entries written by an older check are inspected again (3: the pixel limit became PIL's error threshold,
#: about 179 megapixels, where 2 refused images from its warning threshold, about 89.5, on)
CACHE_VERSION = 3


def inspect_files(paths: Sequence[str], cache_dir: str | os.PathLike | None = None) -> dict[str, FileInfo]:
    """``inspect_file`` for each path, reusing ``cache_dir/files.json`` keyed by path, size and mtime."""
    cache_file = Path(cache_dir) / "files.json" if cache_dir else None
    cached: dict[str, list] = {}
    if cache_file and cache_file.exists():
        try:
            stored = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        if isinstance(stored, dict) and stored.get("version") == CACHE_VERSION:
            cached = stored["files"]
    out: dict[str, FileInfo] = {}
    todo: list[tuple[str, list[int]]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            out[path] = FileInfo("", error=f"cannot read the file ({exc.strerror or exc})")
            continue
        stamp = [st.st_size, st.st_mtime_ns]
        hit = cached.get(path)
        if hit and hit[:2] == stamp:
            out[path] = FileInfo(*hit[2:])
        else:
            todo.append((path, stamp))
    for path, stamp in progress(
        todo, desc="reading images (full decode and hash, once)", unit="images", enabled=len(todo) > 0
    ):
        info = inspect_file(path)
        out[path] = info
        cached[path] = stamp + list(astuple(info))
    out = {p: out[p] for p in paths if p in out}  # the caller's order
    if cache_file and todo:
        write_json(cache_file, {"version": CACHE_VERSION, "files": cached})
    return out


@dataclass
class DuplicateReport:
    """Groups of byte-identical images and what the policy did with them."""

    groups: list[list[str]] = field(default_factory=list)
    conflicting: list[list[str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        n_dup = sum(len(g) for g in self.groups)
        return (
            f"{len(self.groups)} groups of identical images ({n_dup} files), "
            f"{len(self.conflicting)} with conflicting labels; {len(self.dropped)} files dropped"
        )


def duplicate_groups(records: Sequence[Record], hashes: dict[str, str]) -> list[list[Record]]:
    """Groups (size >= 2) of records whose files have identical bytes."""
    by_hash: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_hash[hashes[r.path]].append(r)
    return [sorted(g, key=lambda r: r.path) for g in by_hash.values() if len(g) > 1]


def resolve_duplicates(
    records: Sequence[Record], hashes: dict[str, str], policy: str = "prefer-ductal"
) -> tuple[list[Record], DuplicateReport]:
    """Apply a duplicate policy; returns the kept records and a report.

    Policies:
        prefer-ductal: keep one copy of each identical group; where copies carry different
            tumour types (the BreakHis 13412 slide filed as both DC and LC) keep the ductal
            copy, else the first path.
        drop-conflicts: keep one copy of each same-label group; drop every copy of a group
            whose labels conflict.
        keep: keep everything (the split guard still refuses identical images across a split).
    """
    if policy not in DUPLICATE_POLICIES:
        raise ConfigError(f"data.duplicates: unknown policy {policy!r}; choose one of {DUPLICATE_POLICIES}")
    report = DuplicateReport()
    drop: set[str] = set()
    for group in duplicate_groups(records, hashes):
        report.groups.append([r.path for r in group])
        conflict = len({(r.label, r.tumor_type) for r in group}) > 1
        if conflict:
            report.conflicting.append([r.path for r in group])
        if policy == "keep":
            continue
        if conflict and policy == "drop-conflicts":
            drop.update(r.path for r in group)
            continue
        keep = next((r for r in group if r.tumor_type == "DC"), group[0])
        drop.update(r.path for r in group if r is not keep)
    report.dropped = sorted(drop)
    return [r for r in records if r.path not in drop], report


__all__ = [
    "inspect_files",
    "DuplicateReport",
    "resolve_duplicates",
]
