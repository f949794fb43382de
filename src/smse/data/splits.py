"""Patient-disjoint splits: seeded stratified 70/30 repeats, official fold files, and a leakage guard."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from smse.data.records import Record
from smse.errors import DataError, LeakageError
from smse.io import read_text


def patient_labels(records: Sequence[Record], task: str = "binary") -> dict[str, str]:
    """Majority class of each patient for ``task`` (ties broken by name)."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        votes[r.patient][r.target_name(task)] += 1
    return {p: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for p, c in votes.items()}


def stratified_patient_split(patients: dict[str, str], fraction: float, seed: int) -> set[str]:
    """Pick about ``fraction`` of the patients of each class (at least one where a class has two)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = defaultdict(list)
    for patient, label in sorted(patients.items()):
        by_class[label].append(patient)
    picked: set[str] = set()
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        n = int(round(fraction * len(group)))
        n = 0 if len(group) == 1 else min(max(n, 1), len(group) - 1)
        picked.update(group[i] for i in order[:n])
    return picked


def seeded_split(
    records: Sequence[Record],
    test_fraction: float = 0.3,
    val_fraction: float = 0.15,
    seed: int = 0,
    task: str = "binary",
) -> list[Record]:
    """Assign train/val/test by patient, stratified by the task's class; val is carved out of the training patients.

    A class with a single patient keeps it in training.

    Raises:
        DataError: when no class has two patients, so that the test split would be empty.
    """
    patients = patient_labels(records, task)
    test = stratified_patient_split(patients, test_fraction, seed)
    per_class = Counter(patients.values())
    if not test and len(per_class) > 1:
        counts = ", ".join(f"{c} {n}" for c, n in sorted(per_class.items()))
        raise DataError(
            f"data.split: every class has a single patient ({counts} for data.task={task}), and a patient's "
            "images never lie on two sides, so the test split would be empty: a patient-disjoint evaluation "
            "needs at least two patients of some class"
        )
    rest = {p: c for p, c in patients.items() if p not in test}
    val = stratified_patient_split(rest, val_fraction, seed + 7919) if val_fraction > 0 else set()
    split = {p: "test" if p in test else "val" if p in val else "train" for p in patients}
    return [r.with_split(split[r.patient]) for r in records]


def carve_validation(records: Sequence[Record], val_fraction: float, seed: int, task: str = "binary") -> list[Record]:
    """Move about ``val_fraction`` of the training patients to ``val`` (test is untouched)."""
    train = [r for r in records if r.split == "train"]
    if val_fraction <= 0 or not train:
        return list(records)
    val = stratified_patient_split(patient_labels(train, task), val_fraction, seed + 7919)
    return [r.with_split("val") if r.split == "train" and r.patient in val else r for r in records]


def read_fold_file(path: str | os.PathLike, fold: int | None = None) -> dict[str, str]:
    """File name -> ``train``/``test`` from ``dsfoldN.txt`` (pipe format) or Kaggle ``Folds.csv``.

    Args:
        path: the fold file.
        fold: which fold of a ``Folds.csv`` (required there; ignored for ``dsfoldN.txt``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: fold file not found")
    out: dict[str, str] = {}
    if path.suffix.lower() == ".csv":
        if fold is None:
            raise DataError(f"{path}: a Folds.csv holds several folds; set data.split.fold")
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        need = {"fold", "mag", "grp", "filename"}
        if not need <= set(reader.fieldnames or []):
            raise DataError(f"{path}: expected columns {sorted(need)}, found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if _fold_number(row["fold"], path, line) == fold:
                out[_group(row["filename"].replace("\\", "/").rsplit("/", 1)[-1], row["grp"], path, line, out)] = row[
                    "grp"
                ]
        if not out:
            raise DataError(f"{path}: no rows for fold {fold}")
        return out
    for line, text in enumerate(read_text(path).splitlines(), start=1):
        text = text.strip()
        if not text:
            continue
        parts = text.split("|")
        if len(parts) != 4:
            raise DataError(f"{path}:{line}: expected filename|mag|fold|grp, got {text!r}")
        out[_group(parts[0], parts[3], path, line, out)] = parts[3]
    return out


def _fold_number(text: str, path: Path, line: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{path}:{line}: fold {text!r} is not a whole number") from None


def _group(name: str, grp: str, path: Path, line: int, seen: dict) -> str:
    if grp not in ("train", "test"):
        raise DataError(f"{path}:{line}: group {grp!r} is neither train nor test")
    if name in seen and seen[name] != grp:
        raise DataError(f"{path}:{line}: {name} is listed as both train and test")
    return name


def apply_fold_file(records: Sequence[Record], mapping: dict[str, str]) -> list[Record]:
    """Set each record's split from a fold mapping; records the file does not list are dropped."""
    return [r.with_split(mapping[Path(r.path).name]) for r in records if Path(r.path).name in mapping]


def check_split(records: Sequence[Record], hashes: dict[str, str] | None = None) -> None:
    """Refuse a split in which a patient or a byte-identical image lies on two sides.

    Raises:
        LeakageError: naming up to ten offending patients or file pairs.
    """
    sides: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.split is None:
            raise LeakageError(f"{r.path}: record has no split")
        sides[r.patient].add(r.split)
    shared = sorted(p for p, s in sides.items() if len(s) > 1)
    problems = []
    if shared:
        problems.append(
            f"{len(shared)} patient(s) on both sides: "
            + ", ".join(f"{p} ({'/'.join(sorted(sides[p]))})" for p in shared[:10])
        )
    if hashes:
        first: dict[str, Record] = {}
        pairs = []
        for r in records:
            other = first.setdefault(hashes[r.path], r)
            if other.split != r.split:
                pairs.append(f"{other.path} ({other.split}) == {r.path} ({r.split})")
        if pairs:
            problems.append(f"{len(pairs)} identical image(s) on both sides: " + "; ".join(pairs[:10]))
    if problems:
        raise LeakageError("split leaks: " + " | ".join(problems))


__all__ = [
    "patient_labels",
    "seeded_split",
    "carve_validation",
    "read_fold_file",
    "apply_fold_file",
    "check_split",
]
