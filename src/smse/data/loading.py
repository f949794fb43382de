"""From a data config to checked, de-duplicated, split records, with one summary line."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from smse.config import DataConfig
from smse.data.breakhis import check_counts, scan_breakhis
from smse.data.hashing import DuplicateReport, inspect_files, resolve_duplicates
from smse.data.images import default_cache_dir
from smse.data.manifest import read_manifest
from smse.data.records import UNLABELLED, Record
from smse.data.splits import (
    apply_fold_file,
    carve_validation,
    check_split,
    read_fold_file,
    seeded_split,
)
from smse.errors import ConfigError, DataError, ImageError
from smse.io import writable_folder

logger = logging.getLogger(__name__)

#: what to do about a bad image, true of every command that loads data: ``embed`` and ``serve --reference`` take
#: no --skip-bad, so the advice names the commands that do
SKIP_ADVICE = (
    " (fix or remove the file; smse train skips and lists bad files with data.skip_bad=true, "
    "smse data summary with --skip-bad)"
)


@dataclass
class LoadedData:
    """Records ready for training, and what happened on the way."""

    records: list[Record]
    hashes: dict[str, str]
    #: every file found and not used, with the reason: bad files, and images the split leaves out (``left_out``)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: DuplicateReport = field(default_factory=DuplicateReport)
    counts_note: str = ""
    sizes: Counter = field(default_factory=Counter)
    #: the images of ``skipped`` that were readable but that the split leaves out (a fold file that omits them)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    #: file names a fold file lists that are not under the data root (a subset of the archive, or a wrong root)
    not_found: list[str] = field(default_factory=list)

    def summary_line(self) -> str:
        by_label = Counter(r.label for r in self.records)
        by_mag = Counter(r.magnification for r in self.records)
        patients = len({r.patient for r in self.records})
        parts = [
            f"{len(self.records)} images, {patients} patients",
            ", ".join(f"{k} {v}" for k, v in sorted(by_label.items())),
            ", ".join(f"{m}X {n}" if m else f"unknown {n}" for m, n in sorted(by_mag.items())),
        ]
        if self.counts_note:
            parts.append(self.counts_note)
        bad = len(self.skipped) - len(self.left_out)
        if bad:
            parts.append(f"{bad} bad file(s) skipped")
        if self.left_out:
            reasons = Counter(why for _, why in self.left_out)
            parts.append(
                f"{len(self.left_out)} of {len(self.records) + len(self.left_out)} images left out: "
                + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
            )
        if self.not_found:
            missing = f"{len(self.not_found):,}"
            parts.append(f"the fold file lists {missing} images not found here (e.g. {self.not_found[0]})")
        if self.duplicates.groups:
            parts.append(self.duplicates.summary())
        return "; ".join(parts)


def cache_dir_of(cfg: DataConfig) -> Path:
    """The cache folder (``data.cache_dir``, else ``$SMSE_CACHE_DIR``, else ``~/.cache/smse``), checked writable."""
    return writable_folder(
        Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
        "cache folder",
        "choose a writable one with data.cache_dir, --cache-dir or $SMSE_CACHE_DIR",
    )


def scan(cfg: DataConfig) -> tuple[list[Record], list[tuple[str, str]], str]:
    """Records as found on disk (no checks of image bytes); returns records, skipped, counts note."""
    root = Path(cfg.root)
    fmt = cfg.format
    if fmt == "auto":
        fmt = "manifest" if root.suffix.lower() == ".csv" else "breakhis"
    if fmt == "manifest":
        records, skipped = read_manifest(root, cfg.skip_bad)
        if cfg.magnifications:
            records = [r for r in records if r.magnification in cfg.magnifications]
        return records, skipped, ""
    records, skipped = scan_breakhis(root, cfg.magnifications, cfg.skip_bad)
    return records, skipped, check_counts(records)


def load_data(cfg: DataConfig, split: bool = True) -> LoadedData:
    """Scan, verify every image once (cached), resolve duplicates, and assign a leak-free split.

    Raises:
        ImageError: for the first unreadable image, unless ``cfg.skip_bad``.
        LeakageError: when the split puts a patient or an identical image on both sides.
    """
    records, skipped, note = scan(cfg)
    infos = inspect_files([r.path for r in records], cache_dir_of(cfg))
    good = []
    for r in records:
        error = infos[r.path].error
        if error is None:
            good.append(r)
        elif cfg.skip_bad:
            skipped.append((r.path, error))
        else:
            raise ImageError(r.path, error + SKIP_ADVICE)
    if not good:
        raise DataError(f"{cfg.root}: no readable images")
    hashes = {r.path: infos[r.path].sha1 for r in good}
    kept, report = resolve_duplicates(good, hashes, cfg.duplicates)
    sizes = Counter(f"{infos[r.path].width}x{infos[r.path].height} {infos[r.path].mode}" for r in good)
    data = LoadedData(kept, hashes, skipped, report, note, sizes)
    if split:
        check_classes(kept, cfg)
        data.records = assign_split(kept, cfg)
        _count_left_out(data, kept, cfg)
        check_split(data.records, hashes)
    return data


def _count_left_out(data: LoadedData, found: list[Record], cfg: DataConfig) -> None:
    """Name the images that were found and read but that the split leaves out (a fold file that omits them).

    They join ``data.skipped`` (so ``data.json`` lists them, with the reason), are counted in the summary
    line, and are logged as a warning: a run never trains on less than it was pointed at without a word.
    """
    used = {r.path for r in data.records}
    method = split_method(cfg, found)
    why = (
        f"not listed in the fold file {cfg.split.fold_file}"
        if method == "fold-file"
        else f"given no split by data.split.method={method}"
    )
    if method == "fold-file" and cfg.split.fold_file:
        present = {Path(r.path).name for r in found}
        data.not_found = sorted(set(read_fold_file(cfg.split.fold_file, cfg.split.fold)) - present)
        if data.not_found:
            logger.info(
                "%s: %d images the fold file lists are not under %s (e.g. %s): a subset of the archive?",
                cfg.split.fold_file,
                len(data.not_found),
                cfg.root,
                data.not_found[0],
            )
    data.left_out = [(r.path, why) for r in found if r.path not in used]
    if not data.left_out:
        return
    data.skipped.extend(data.left_out)
    names = ", ".join(Path(p).name for p, _ in data.left_out[:5]) + (", ..." if len(data.left_out) > 5 else "")
    logger.warning(
        "%s: %d of the %d images found there are %s; they are left out of the run (data.json lists them): %s",
        cfg.root,
        len(data.left_out),
        len(found),
        why,
        names,
    )


def check_classes(records: list[Record], cfg: DataConfig) -> None:
    """Refuse a dataset with one class for the task: every score on it would read 100%. Unlabelled tiles
    (label-free training with same-spot positives) are the exception."""
    counts = Counter(r.target_name(cfg.task) for r in records)
    if len(counts) == 1:
        ((name, n),) = counts.items()
        if name == UNLABELLED:
            return
        patients = len({r.patient for r in records})
        raise DataError(
            f"{cfg.root}: every image is of one class for data.task={cfg.task}: {name!r} "
            f"({n} images, {patients} patients); a classifier needs at least two classes"
        )


def split_method(cfg: DataConfig, records: list[Record]) -> str:
    """``data.split.method``, with ``auto`` made concrete: the manifest's split column when it has one, else seeded."""
    if cfg.split.method != "auto":
        return cfg.split.method
    return "manifest" if any(r.split for r in records) else "seeded"


def assign_split(records: list[Record], cfg: DataConfig) -> list[Record]:
    """Apply ``cfg.split``: seeded patient split, official fold file, or the manifest's own column."""
    s = cfg.split
    method = split_method(cfg, records)
    if method != "manifest" and any(r.split for r in records):
        logger.warning("%s: the manifest's split column is not used, since data.split.method is %s", cfg.root, method)
    if method == "seeded":
        return seeded_split(records, s.test_fraction, s.val_fraction, s.seed, cfg.task)
    if method == "fold-file":
        if s.fold_file is None:  # validate() refuses this; a DataConfig built in Python may not have been validated
            raise ConfigError("data.split.fold_file: required when data.split.method is fold-file")
        mapped = apply_fold_file(records, read_fold_file(s.fold_file, s.fold))
        if not mapped:
            raise DataError(f"{s.fold_file}: lists none of the {len(records)} images found under {cfg.root}")
        return carve_validation(mapped, s.val_fraction, s.seed, cfg.task)
    missing = [r.path for r in records if r.split is None]
    if len(missing) == len(records):
        raise DataError(f"{cfg.root}: data.split.method is manifest, but no image has a split there")
    if missing:
        raise DataError(
            f"{missing[0]}: this image has no split in {cfg.root} while others have one; "
            "fill the split column for every row, or set data.split.method=seeded"
        )
    if any(r.split == "val" for r in records):
        return list(records)
    return carve_validation(records, s.val_fraction, s.seed, cfg.task)


__all__ = [
    "LoadedData",
    "cache_dir_of",
    "scan",
    "load_data",
    "split_method",
]
