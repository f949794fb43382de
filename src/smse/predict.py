"""Predictions for new images: class, probabilities and the most similar reference cases."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from smse.api import ReferenceIndex, load_model
from smse.data.breakhis import iter_image_files, parse_name
from smse.data.images import IMAGE_SUFFIXES
from smse.errors import ConfigError, DataError, ImageError
from smse.io import write_csv
from smse.runtime import resolve_device


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the images below them (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(iter_image_files(p))
        elif p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def _magnification_of(path: Path) -> str:
    try:
        return str(parse_name(path.name)["magnification"])
    except DataError:
        return ""


def predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    out_csv: str | Path | None = None,
    k: int = 5,
    batch_size: int = 32,
    which: str = "best",
    device: str = "auto",
    backend: str | None = None,
) -> list[dict]:
    """Classify images and find their ``k`` nearest reference images (the run's training and validation images).

    An unreadable image gets a row with its error and the rest go on; ``out_of_distribution`` is 1 where the
    nearest reference is farther than ``ReferenceIndex.guide()["ood_threshold"]``.
    """
    if k < 1:
        raise ConfigError(f"k: the number of nearest references must be at least 1, got {k}")
    model = load_model(run, which, resolve_device(device))
    index = ReferenceIndex.from_run(run, model, backend)
    files = expand_inputs(inputs)
    class_map = model.class_map
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, ok = [], []
        for f in chunk:
            row: dict[str, Any] = {"path": str(f), "magnification": _magnification_of(f), "error": ""}
            try:
                images.append(model.transform(f))
                ok.append(row)
            except ImageError as exc:
                row["error"] = exc.reason
            rows.append(row)
        if not images:
            continue
        emb, probs = model.infer(torch.stack(images), batch_size)
        hits = index.search(emb, k)
        ood = hits.out_of_distribution
        if ood is None:  # search() flags outliers by default; None would mean it was told not to
            raise RuntimeError("ReferenceIndex.search returned no out_of_distribution flags")
        label_of = hits.labels if class_map.task == "binary" else hits.tumor_types
        for q, (row, p) in enumerate(zip(ok, probs)):
            row["out_of_distribution"] = int(ood[q])
            if class_map.labelled:  # a label-free model has neighbours, no class
                row["predicted"] = class_map.names[int(p.argmax())]
                row.update({f"p_{c}": float(v) for c, v in zip(class_map.names, p)})
            for r in range(hits.indices.shape[1]):
                row[f"nn{r + 1}_path"] = str(hits.paths[q, r])
                row[f"nn{r + 1}_label"] = str(label_of[q, r])
                row[f"nn{r + 1}_magnification"] = int(hits.magnifications[q, r])
                row[f"nn{r + 1}_distance"] = float(hits.distances[q, r])
    if out_csv:
        k = min(k, len(index.embeddings))  # a k above the reference set's size gives every reference
        classes = list(class_map.names) if class_map.labelled else []
        columns = (
            ["path", "magnification"]
            + (["predicted"] if classes else [])
            + [f"p_{c}" for c in classes]
            + ["out_of_distribution"]
            + [f"nn{r}_{f}" for r in range(1, k + 1) for f in ("path", "label", "magnification", "distance")]
            + ["error"]
        )
        write_csv(
            out_csv,
            columns,
            ([f"{row[c]:.6f}" if isinstance(row.get(c), float) else row.get(c, "") for c in columns] for row in rows),
        )
    return rows


__all__ = [
    "predict",
]
