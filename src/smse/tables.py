"""Results tables in the literature's form: rows are methods, columns 40X/100X/200X/400X/all, image and patient."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

LEVELS = (("image_accuracy", "image"), ("patient_accuracy", "patient"))


def _columns(results: Mapping[str, Mapping[str, dict]]) -> list[str]:
    cols: list[str] = []
    for per_mag in results.values():
        for key in per_mag:
            if key not in cols:
                cols.append(key)
    mags = sorted(
        (c for c in cols if c != "all"), key=lambda c: (not c[:-1].isdigit(), int(c[:-1]) if c[:-1].isdigit() else 0)
    )
    return mags + (["all"] if "all" in cols else [])


def pct(v: float | None) -> str:
    """A share as a percentage with one decimal; ``-`` for a missing or NaN value."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


#: a cell resting on fewer test patients than this is marked: its figure says little
MIN_PATIENTS = 3


def _cell(m: dict | None, key: str) -> str:
    """``value [low, high]`` (95% interval), marked ``*`` under ``MIN_PATIENTS`` patients."""
    if not m or m.get(key) is None:
        return "-"
    value = pct(m.get(key))
    ci = (m.get("intervals") or {}).get(key)
    if ci and not any(math.isnan(v) for v in ci):
        value += f" [{pct(ci[0])}, {pct(ci[1])}]"
    return value + (" *" if m.get("patients", MIN_PATIENTS) < MIN_PATIENTS else "")


def results_grid(results: Mapping[str, Mapping[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """The results table as a header and rows of cells (for Markdown and HTML alike).

    Each accuracy cell holds the value and its 95% interval (resampling patients; Wilson's for a single
    patient); a last row ``n`` gives the images and patients of each column; ``*`` marks a cell of fewer
    than ``MIN_PATIENTS`` patients.
    """
    cols = _columns(results)
    rows = [
        [method, name, *(_cell(per_mag.get(c), key) for c in cols)]
        for method, per_mag in results.items()
        for key, name in LEVELS
    ]
    first = next(iter(results.values()), {})
    rows.append(
        [
            "n",
            "images / patients",
            *(f"{first[c]['images']} / {first[c]['patients']}" if c in first else "-" for c in cols),
        ]
    )
    return ["method", "level", *cols], rows


def results_table(results: Mapping[str, Mapping[str, dict]]) -> str:
    """Markdown table of one evaluation: ``results[method][magnification][metric]`` (see ``results_grid``)."""
    head, rows = results_grid(results)
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


TABLE_NOTE = (
    f"Cells: accuracy in % [95% interval, resampling patients; Wilson's for one patient]; "
    f"* fewer than {MIN_PATIENTS} patients. Patient level is the literature's patient score: the mean over "
    "patients of each patient's share of correctly classified images."
)


def table_note(images_per_patient: Sequence[int]) -> str:
    """``TABLE_NOTE``, and why image and patient levels coincide when every test patient has as many images."""
    counts = set(images_per_patient)
    if len(counts) == 1:
        return (
            TABLE_NOTE + f" Every test patient has {counts.pop()} images, so the image and patient levels "
            "coincide: the mean over images equals the mean over patients."
        )
    return TABLE_NOTE


def mean_std_table(runs: Mapping[str, Sequence[Mapping[str, dict]]]) -> tuple[str, dict]:
    """Markdown table of mean +- std over repeated splits, and the same numbers as plain data."""
    import numpy as np

    cols = _columns({m: r[0] for m, r in runs.items() if r})
    data: dict = {}
    head = "| method | level | " + " | ".join(cols) + " |"
    lines = [head, "|---|---|" + "---|" * len(cols)]
    for method, reps in runs.items():
        data[method] = {}
        for key, name in LEVELS:
            cells = []
            for c in cols:
                vals = np.array([r[c][key] for r in reps if c in r and not math.isnan(r[c][key])], dtype=float)
                mean, std = (
                    (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
                    if len(vals)
                    else (float("nan"), float("nan"))
                )
                data[method].setdefault(c, {})[name] = {"mean": mean, "std": std, "n": int(len(vals))}
                cells.append("-" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}")
            lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), data


def result_rows(m: dict) -> dict[str, dict]:
    """The rows of the results table: the model's classifier, the k-NN row and, where measured, the probe."""
    rows = {f"SMSE ({m.get('classifier', 'classifier head')})": m["head"], f"SMSE (k-NN, k={m['knn_k']})": m["knn"]}
    if "probe" in m:
        rows[f"baseline: logistic regression on the frozen features (C={m['probe']['C']:g})"] = m["probe"]["results"]
    return rows


__all__ = [
    "pct",
    "MIN_PATIENTS",
    "results_grid",
    "results_table",
    "table_note",
    "mean_std_table",
    "result_rows",
]
