"""Guards on a run folder: one training at a time, resuming only onto the same split, Ctrl-C, finite numbers."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn

from smse.config import Config
from smse.data.records import Record
from smse.errors import DataError, Interrupted, OutputError, RunLockedError, TrainingDiverged
from smse.io import describe, writable_folder
from smse.runfiles import RunFiles
from smse.runtime import Dist

logger = logging.getLogger(__name__)

SPLIT_FIELDS = ("label", "tumor_type", "patient", "magnification", "split")


@contextmanager
def locked(run: str | os.PathLike) -> Iterator[Path]:
    """Hold the run folder's lock (created with the folder) for the duration of the block.

    The lock is the operating system's (``flock``), so it is released when the process ends,
    however it ends.

    Raises:
        RunLockedError: at once, naming the folder and the process that holds it.
        OutputError: when the folder cannot be created or written.
    """
    existed = Path(run).exists()
    run = writable_folder(run, "out folder", "choose another out")
    with _flock(run):
        try:
            yield run
        finally:  # only the holder of the lock tidies
            _tidy(run, existed)


def _tidy(run: Path, existed: bool) -> None:
    """A training refused before it wrote anything (bad data, bad config) leaves no folder and no lock behind."""
    files = RunFiles(run)
    try:
        if {p.name for p in run.iterdir()} <= {files.lock.name}:
            files.lock.unlink(missing_ok=True)
            if not existed:
                run.rmdir()
    except OSError:  # the folder is in use or gone: nothing to tidy
        pass


@contextmanager
def _flock(run: Path) -> Iterator[None]:
    """The operating system's lock on the run folder's lock file (``filelock``), which holds this process's id."""
    path = RunFiles(run).lock
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLockedError(
            f"{run}: another training (process {_holder(path)}) is writing into this run folder; "
            "wait for it to end, or choose another out"
        ) from None
    except OSError as exc:  # a read-only folder, or a file system without locks (some network mounts)
        raise OutputError(f"{path}: cannot take the run folder's lock ({describe(exc)})") from None
    try:
        try:
            path.write_text(f"{os.getpid()}\n")
        except OSError:  # Windows keeps the locked bytes from other handles: the holder stays unnamed
            pass
        yield
    finally:
        lock.release()


def _holder(path: Path) -> str:
    """The process id the lock's holder wrote into it, or "unknown"."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def guarded(train: Callable[..., Path]) -> Callable[..., Path]:
    """Wrap ``train(cfg, ...)``: lock ``cfg.out`` (on the main process) and turn Ctrl-C into ``Interrupted``.

    ``Interrupted`` says what was saved and how to resume; the command line exits with 130.
    """

    @functools.wraps(train)
    def run_guarded(cfg: Config, *args, **kwargs) -> Path:
        with locked(cfg.out) if Dist.from_env().main else nullcontext():
            try:
                return train(cfg, *args, **kwargs)
            except KeyboardInterrupt:
                raise Interrupted(resume_hint(Path(cfg.out))) from None

    return run_guarded


def resume_hint(run: Path) -> str:
    """What an interrupted training left in ``run`` and how to go on."""
    state = RunFiles(run).read_state()
    if state is None:
        return (
            f"interrupted before the first epoch ended; nothing in {run} to resume: run the same command to start again"
        )
    epoch = state["epoch"]
    return (
        f"interrupted; {run} holds the run after epoch {epoch} (state.pt, last.safetensors): "
        "run the same command again to resume from there"
    )


def split_fingerprint(records: Sequence[Record]) -> str:
    """A digest of every image's path, labels, patient, magnification and split: equal iff the split is."""
    h = hashlib.sha1()
    for r in sorted(records, key=lambda r: r.path):
        h.update("\t".join([r.path] + [str(getattr(r, f)) for f in SPLIT_FIELDS]).encode() + b"\n")
    return h.hexdigest()


def check_resume_data(state: dict | None, records: Sequence[Record], run: Path) -> None:
    """Refuse to resume a run onto data or a split other than the one it was trained on.

    Raises:
        DataError: naming the run folder and what changed (images added or removed, patients
            that moved to another split, labels that changed).
    """
    if state is None or state.get("data") == split_fingerprint(records):
        return
    changes = _changes(*RunFiles(run).read_split_as_saved(), records)
    if "data" not in state and not changes:
        return  # a run from before the fingerprint was saved, with the very same split
    raise DataError(
        f"{run}: the data changed since this run started ({'; '.join(changes) or 'split.csv is missing'}); "
        "resuming would mix two splits: choose another out, or restore the data"
    )


def _changes(saved: Sequence[Record], gone: Sequence[str], records: Sequence[Record]) -> list[str]:
    """What differs between a run's saved split (its records, and the paths of its images no longer on disk) and
    ``records``, in a few phrases with examples."""
    if not saved and not gone:
        return []
    old = {r.path: {f: str(getattr(r, f) or "") for f in SPLIT_FIELDS} for r in saved}
    new = {r.path: {f: str(getattr(r, f) or "") for f in SPLIT_FIELDS} for r in records}
    out = []
    added, removed = sorted(set(new) - set(old)), sorted((set(old) - set(new)) | set(gone))
    if added:
        out.append(f"{len(added)} image(s) added, e.g. {added[0]}")
    if removed:
        out.append(f"{len(removed)} image(s) gone, e.g. {removed[0]}")
    moved = sorted(
        {
            (new[p]["patient"], old[p]["split"], new[p]["split"])
            for p in set(old) & set(new)
            if old[p]["split"] != new[p]["split"]
        }
    )
    if moved:
        out.append(
            f"{len(moved)} patient(s) moved between splits: " + ", ".join(f"{p} ({a} -> {b})" for p, a, b in moved[:5])
        )
    relabelled = sorted(
        p for p in set(old) & set(new) if any(old[p][f] != new[p][f] for f in SPLIT_FIELDS if f != "split")
    )
    if relabelled:
        out.append(f"{len(relabelled)} image(s) with another label, patient or magnification, e.g. {relabelled[0]}")
    return out


def check_finite_weights(module: nn.Module, epoch: int, run: Path) -> None:
    """Refuse to save weights that became NaN or infinite (a diverged run can keep a finite loss).

    Raises:
        TrainingDiverged: naming the first such tensor and the last good checkpoint.
    """
    bad = next((name for name, p in module.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise TrainingDiverged(
            f"weights {bad} became non-finite in epoch {epoch}; the last good checkpoint is "
            f"{run / 'last.safetensors'}; lower train.lr?"
        )


def check_finite_outputs(checkpoint: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Refuse a model whose embeddings or probabilities hold NaN or infinity: nothing downstream could use them.

    Raises:
        TrainingDiverged: naming the checkpoint and how many rows of which array are not finite.
    """
    for name, array in arrays.items():
        array = np.asarray(array)
        rows = ~np.isfinite(array).all(axis=tuple(range(1, array.ndim)))
        if rows.any():
            raise TrainingDiverged(
                f"{checkpoint}: the model gives non-finite {name} for {int(rows.sum())} of "
                f"{len(array)} images; its training diverged: train again with a lower train.lr"
            )


__all__ = [
    "locked",
    "guarded",
    "split_fingerprint",
    "check_resume_data",
    "check_finite_weights",
    "check_finite_outputs",
]
