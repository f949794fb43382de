"""Progress of long steps: a bar on a terminal (or in a notebook), a log line every few percent otherwise.

A step that reads thousands of images or embeds them takes minutes on a CPU; written to a file or a
pipe (a batch job, ``| tee``), a bar would be silent or garbled, so there the step logs
``desc: done/total unit (percent), elapsed, about remaining`` every ``EVERY`` of the way, through the
``smse`` logger the command line shows on standard error.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("smse.progress")

#: share of the work between two log lines when the output is not a terminal
EVERY = 0.05


def _interactive() -> bool:
    return "ipykernel" in sys.modules or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    weights: Iterable[int] | None = None,
) -> Iterable[T]:
    """``iterable``, reporting its progress as it is consumed.

    Args:
        total: the number of work units (default ``len(iterable)``).
        weights: work units of each item (e.g. images per batch); default 1 each.
        enabled: False gives ``iterable`` back untouched.
    """
    if not enabled:
        return iterable
    items = list(iterable) if total is None and not hasattr(iterable, "__len__") else iterable
    sizes = list(weights) if weights is not None else None
    total = total if total is not None else (sum(sizes) if sizes is not None else len(items))  # type: ignore[arg-type]
    if _interactive():
        from tqdm.auto import tqdm

        return _bar(items, sizes, tqdm(total=total, desc=desc, unit=unit, leave=False))
    return _lines(items, sizes, total, desc, unit)


def _bar(items, sizes, bar) -> Iterator:
    try:
        for k, item in enumerate(items):
            yield item
            bar.update(sizes[k] if sizes is not None else 1)
    finally:
        bar.close()


def _lines(items, sizes, total: int, desc: str, unit: str) -> Iterator:
    start = time.monotonic()
    done, next_at = 0, EVERY * total
    for k, item in enumerate(items):
        yield item
        done += sizes[k] if sizes is not None else 1
        if done >= next_at or done == total:
            elapsed = time.monotonic() - start
            left = elapsed / done * (total - done) if done else 0.0
            log.info(
                "%s: %d/%d %s (%.0f%%), %.0f s, about %.0f s left",
                desc,
                done,
                total,
                unit,
                100.0 * done / max(total, 1),
                elapsed,
                left,
            )
            while next_at <= done:
                next_at += EVERY * total


def batch_sizes(total: int, batch_size: int) -> list[int]:
    """The sizes of the batches ``range(0, total, batch_size)`` cuts: ``progress``'s weights for batched work."""
    return [min(batch_size, total - start) for start in range(0, total, batch_size)]


__all__ = ["EVERY", "batch_sizes", "progress"]
