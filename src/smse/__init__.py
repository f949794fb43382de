"""Magnification-independent histopathology classification with similarity-based multi-scale embeddings.

Notebook use::

    import smse
    cfg = smse.load_config("breakhis", ["data.root=/data/BreaKHis_v1"])
    run = smse.train(cfg)
    model = smse.load_model(run)
    probs = model.predict_proba(["image.png"])
    hits = smse.ReferenceIndex.from_run(run).search(model.embed(["image.png"]), k=5)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "smse.config",
    "load_config": "smse.config",
    "Hits": "smse.api",
    "Index": "smse.index",
    "Model": "smse.api",
    "ReferenceIndex": "smse.api",
    "Run": "smse.api",
    "build_reference": "smse.api",
    "load_model": "smse.api",
    "train": "smse.api",
    "RunFiles": "smse.runfiles",
    "train_slides": "smse.mil.train",
    "SlideConfig": "smse.mil.train",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import the public API on first use, so that ``import smse`` (and the CLI) start fast."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'smse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
