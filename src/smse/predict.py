"""Predictions for new images: class, probabilities and the most similar reference cases."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from smse.checkpoint import find_checkpoint, load_checkpoint
from smse.data.breakhis import iter_image_files, parse_name
from smse.data.images import IMAGE_SUFFIXES, load_resized
from smse.data.transforms import to_tensor
from smse.errors import CheckpointError, ConfigError, DataError, ImageError
from smse.io import write_csv
from smse.retrieval import search
from smse.runfolder import check_finite_outputs
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


@torch.no_grad()
def predict(run: str | Path, inputs: Sequence[str | Path], out_csv: str | Path | None = None, k: int = 5,
            batch_size: int = 32, which: str = "best", device: str = "auto", backend: str | None = None) -> list[dict]:
    """Classify images and find their ``k`` nearest reference images (the run's training set).

    An unreadable image gets a row with its error and the rest go on.
    """
    if k < 1:
        raise ConfigError(f"k: the number of nearest references must be at least 1, got {k}")
    checkpoint = find_checkpoint(run, which)
    model, cfg, class_map, _ = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    model.to(dev).eval()
    ref_path = checkpoint.parent / "reference.npz"
    if not ref_path.exists():
        raise CheckpointError(f"{ref_path}: no reference embeddings; run `smse evaluate {run}` first")
    with np.load(ref_path) as npz:
        ref = {k: npz[k] for k in npz.files}  # an NpzFile would re-read an array on every access
    files = expand_inputs(inputs)
    size = tuple(cfg.data.image_size)
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images, ok = [], []
        for f in chunk:
            row = {"path": str(f), "magnification": _magnification_of(f), "error": ""}
            try:
                images.append(to_tensor(load_resized(f, size)))
                ok.append(row)
            except ImageError as exc:
                row["error"] = exc.reason
            rows.append(row)
        if not images:
            continue
        emb, logits = model(torch.stack(images).to(dev))
        probs = torch.softmax(logits.float(), 1).cpu().numpy()
        check_finite_outputs(checkpoint, embeddings=emb.float().cpu().numpy(), probabilities=probs)
        dist, idx = search(emb.float().cpu().numpy(), ref["embeddings"], k, backend or cfg.eval.knn_backend)
        for row, p, d, nn in zip(ok, probs, dist, idx):
            row["predicted"] = class_map.names[int(p.argmax())]
            row.update({f"p_{c}": float(v) for c, v in zip(class_map.names, p)})
            for r, (j, dj) in enumerate(zip(nn, d), start=1):
                row[f"nn{r}_path"] = str(ref["paths"][j])
                row[f"nn{r}_label"] = str(ref["labels"][j] if class_map.task == "binary" else ref["tumor_types"][j])
                row[f"nn{r}_magnification"] = int(ref["magnifications"][j])
                row[f"nn{r}_distance"] = float(dj)
    if out_csv:
        columns = (["path", "magnification", "predicted"] + [f"p_{c}" for c in class_map.names]
                   + [f"nn{r}_{f}" for r in range(1, k + 1) for f in ("path", "label", "magnification", "distance")]
                   + ["error"])
        write_csv(out_csv, columns, ([f"{row[c]:.6f}" if isinstance(row.get(c), float) else row.get(c, "")
                                      for c in columns] for row in rows))
    return rows

