"""The one record type every loader produces, and the label maps of the two tasks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

MAGNIFICATIONS = (40, 100, 200, 400)
#: the label of tiles cut without labels (``smse tiles`` without ``--labels``): label-free training
UNLABELLED = "unlabelled"
UNKNOWN_MAGNIFICATION = 0


def mag_name(magnification: int) -> str:
    """``40`` -> ``40X``; the unknown magnification (0) -> ``unknown``."""
    return f"{magnification}X" if magnification else "unknown"


def canonical_path(path: str | os.PathLike) -> str:
    """The one spelling of an image's path that every record, split file and report uses.

    The folder is resolved (symbolic links, ``..``, relative to absolute); the file name is kept as
    it is, since a BreakHis name carries the image's labels even where the file is a link.
    """
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(folder), name)


@dataclass(frozen=True)
class Record:
    """One image and what is known of it.

    Attributes:
        path: absolute path of the image file, in ``canonical_path`` form.
        label: class name (``benign`` / ``malignant`` on BreakHis, any name in a manifest).
        tumor_type: finer type code (``A``, ``DC``, ...); equal to ``label`` where there is none.
        patient: patient (slide) identifier; splits never divide a patient.
        magnification: total magnification (40, 100, ...), 0 where unknown.
        split: ``train`` / ``val`` / ``test`` where a split is assigned.
        slide, x, y: the slide and level-0 centre the image was cut from (``smse tiles``), where known: the
            tiles of one spot at several magnifications share them (same-spot positives, localisation).
    """

    path: str
    label: str
    tumor_type: str
    patient: str
    magnification: int = UNKNOWN_MAGNIFICATION
    split: str | None = None
    slide: str | None = None
    x: float | None = None
    y: float | None = None

    @property
    def spot(self) -> str | None:
        """``slide@x,y``: one spot of tissue, whatever the magnification (None where the location is unknown)."""
        return None if self.slide is None or self.x is None or self.y is None else f"{self.slide}@{self.x:g},{self.y:g}"

    def with_split(self, split: str | None) -> Record:
        return replace(self, split=split)

    def target_name(self, task: str) -> str:
        """The class name of this record for ``task`` (``binary`` or ``type``)."""
        return self.tumor_type if task == "type" else self.label


@dataclass(frozen=True)
class ClassMap:
    """Ordered class names of one task; index = position."""

    task: str
    names: tuple[str, ...]

    @classmethod
    def from_records(cls, records: Iterable[Record], task: str = "binary") -> ClassMap:
        return cls(task, tuple(sorted({r.target_name(task) for r in records})))

    @property
    def labelled(self) -> bool:
        """False for unlabelled tiles only: no class to learn, positives from the same spot."""
        return self.names != (UNLABELLED,)

    def targets(self, records: Sequence[Record]) -> list[int]:
        """Class index of each record; -1 for a class this map does not know (foreign data to embed)."""
        lookup = {name: i for i, name in enumerate(self.names)}
        return [lookup.get(r.target_name(self.task), -1) for r in records]

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        return {"task": self.task, "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> ClassMap:
        return cls(d["task"], tuple(d["names"]))


__all__ = [
    "MAGNIFICATIONS",
    "UNKNOWN_MAGNIFICATION",
    "mag_name",
    "canonical_path",
    "Record",
    "ClassMap",
]
