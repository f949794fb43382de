"""Text files read in one way, and atomic writes (a file is either the old version or the complete new one)."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smse.errors import DataError, OutputError, SmseError

_HINTS = {
    getattr(errno, "EDQUOT", errno.ENOSPC): "the disk quota is used up: free some space and run again",
    errno.ENOSPC: "the disk is full: free some space and run again",
    errno.EACCES: "no permission to write there: choose a writable place",
    errno.EPERM: "no permission to write there: choose a writable place",
    errno.EROFS: "the file system is read-only: choose a writable place",
    errno.EEXIST: "a file stands where a folder is needed",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "it is a folder: give a file name",
}


def describe(exc: OSError) -> str:
    """The reason of a failed write and what to do about it, in one phrase."""
    reason = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno)
    return f"{reason}; {hint}" if hint else reason


def describe_error(exc: BaseException) -> str:
    """``describe`` for any error of a write: an ``OSError``, or a library's that carries one in its text
    (safetensors: ``... (os error 28)``; torch's zip writer: ``unexpected pos``, how it reports a full disk)."""
    if isinstance(exc, OSError):
        return describe(exc)
    text = str(exc).strip() or type(exc).__name__
    code = re.search(r"os error (\d+)", text)
    if code is not None:
        hint = _HINTS.get(int(code.group(1)))
        return f"{text}; {hint}" if hint else text
    if "unexpected pos" in text or "failed writing" in text:
        return f"{text}; the disk is probably full: free some space and run again"
    return text


def read_text(path: str | os.PathLike, error: type[SmseError] = DataError) -> str:
    """The text of a UTF-8 file (a byte-order mark, as some spreadsheet programs write, is dropped).

    Raises:
        error: naming the file when it cannot be read or is not UTF-8.
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def writable_folder(path: str | os.PathLike, name: str, hint: str = "") -> Path:
    """Create the folder ``path`` if needed and check that files can be written in it.

    Raises:
        OutputError: naming ``name`` (what the folder is for), the path, the reason and ``hint``.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OutputError(
            f"{name} {path}: cannot write there ({describe(exc)})" + (f"; {hint}" if hint else "")
        ) from None
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    Raises:
        OutputError: naming ``path`` when it cannot be written (the old file, if any, is left as it was).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: cannot write ({_HINTS[errno.EISDIR]})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({describe(exc)})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({describe(exc)})") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file atomically: a header row, then ``rows``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, indented for people."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


__all__ = [
    "describe",
    "describe_error",
    "read_text",
    "writable_folder",
    "atomic_path",
    "write_text",
    "write_csv",
    "write_json",
]
