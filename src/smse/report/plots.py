"""Matplotlib figures of a run; each returns the PNG path it wrote."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from smse.data.records import mag_name
from smse.tables import MIN_PATIENTS

#: one colour scheme per meaning, never shared between meanings in neighbouring plots: classes and types take
#: the page's palette, magnifications the page's magnification colours, methods (model, k-NN, baseline) shades of
#: the report's purple and grey
PALETTE = ["#2a9d8f", "#d1495b", "#3d5a80", "#edae49", "#7b4b94", "#00798c", "#8d6346", "#66a182"]
MAG_COLOURS = {"40X": "#e69f00", "100X": "#56b4e9", "200X": "#009e73", "400X": "#cc79a7"}
METHOD_COLOURS = ["#3b2a55", "#9a8ab5", "#8d8d8d"]


def _subplots(*args, figsize=None, **kwargs):
    """A figure and its axes without pyplot: no process-wide backend switch, no global figure state."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def training_curves(history: Sequence[dict], path: Path) -> Path | None:
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    losses = sorted({k for h in history for k in h if k.startswith("loss_")})
    vals = [k for k in ("val_image_accuracy", "val_patient_accuracy") if k in history[0]]
    fig, axes = _subplots(1, 2 if vals else 1, figsize=(11 if vals else 6, 3.6), squeeze=False)
    for k in losses:
        axes[0, 0].plot(epochs, [h.get(k, np.nan) for h in history], marker="o", ms=3, label=k.removeprefix("loss_"))
    axes[0, 0].set(xlabel="epoch", ylabel="loss", title="training loss parts")
    axes[0, 0].legend()
    if vals:
        for k in vals:
            axes[0, 1].plot(epochs, [100 * h[k] for h in history], marker="o", ms=3, label=k.removeprefix("val_"))
        axes[0, 1].set(xlabel="epoch", ylabel="%", title="validation accuracy (validation patients)")
        axes[0, 1].legend()
    return _save(fig, path)


def confusion(cm: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, path: Path) -> Path:
    cm = np.asarray(cm)
    fig, ax = _subplots(figsize=(max(4.2, 1.2 + 0.9 * len(cols)), max(3.0, 1.0 + 0.55 * len(rows))))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def magnification_bars(results: dict[str, dict], path: Path) -> Path:
    """Grouped bars: per magnification, image- and patient-level accuracy of each method."""
    methods = list(results)
    cols = list(next(iter(results.values())).keys())
    fig, ax = _subplots(figsize=(min(12.0, max(6.0, 0.9 * len(cols) * len(methods))), 4.6))
    width = 0.8 / (2 * len(methods))
    x = np.arange(len(cols))
    k = 0
    for method in methods:
        for key, hatch in (("image_accuracy", ""), ("patient_accuracy", "//")):
            cells = [results[method][c] for c in cols]
            vals = [100 * m[key] for m in cells]
            # 95% intervals as error bars; a cell of few patients is drawn pale and grey: its figure says little
            ci = np.array([(m.get("intervals") or {}).get(key, [np.nan, np.nan]) for m in cells], dtype=float) * 100
            err = np.abs(np.vstack([np.array(vals) - ci[:, 0], ci[:, 1] - np.array(vals)]))
            few = [m.get("patients", MIN_PATIENTS) < MIN_PATIENTS for m in cells]
            colours = ["#dddddd" if f else METHOD_COLOURS[methods.index(method) % len(METHOD_COLOURS)] for f in few]
            bars = ax.bar(
                x + (k - len(methods) + 0.5) * width,
                vals,
                width,
                label=f"{method}, {key.split('_')[0]}",
                color=colours,
                hatch=hatch,
                alpha=0.85,
                edgecolor="white",
                yerr=np.nan_to_num(err),
                error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#444"},
            )
            ax.bar_label(bars, labels=[f"{v:.0f}" + ("*" if f else "") for v, f in zip(vals, few)], fontsize=9)
            k += 1
    ax.set_xticks(
        x,
        [
            f"{c}\n{results[methods[0]][c].get('images', '?')} img / {results[methods[0]][c].get('patients', '?')} pat"
            for c in cols
        ],
    )
    ax.set(
        ylabel="accuracy (%)",
        ylim=(0, 125),
        title=f"accuracy per magnification and pooled (bars: 95% intervals; grey*: under {MIN_PATIENTS} patients)",
    )
    ax.legend(fontsize=8, loc="upper center", ncol=min(3, 2 * len(methods)), frameon=False)
    return _save(fig, path)


def embedding_map(coords: np.ndarray, labels: Sequence[str], mags: Sequence[str], method: str, path: Path) -> Path:
    fig, axes = _subplots(1, 2, figsize=(11, 4.6))
    for ax, values, title in ((axes[0], labels, "coloured by class"), (axes[1], mags, "coloured by magnification")):
        levels = sorted(set(values), key=lambda v: (len(v), v))
        for i, level in enumerate(levels):
            sel = np.array([v == level for v in values])
            colour = MAG_COLOURS.get(level, "#999999") if ax is axes[1] else PALETTE[i % len(PALETTE)]
            ax.scatter(coords[sel, 0], coords[sel, 1], s=10, alpha=0.75, color=colour, label=level)
        ax.set(title=f"{method} of test embeddings, {title}", xticks=[], yticks=[])
        ax.legend(fontsize=8, markerscale=2)
    return _save(fig, path)


def retrieval_heatmap(matrix: dict, path: Path) -> Path | None:
    mags = matrix["magnifications"]
    if not mags:
        return None
    fig, axes = _subplots(1, 2, figsize=(9, 3.8))
    for ax, key, title in ((axes[0], "map_at_r", "mAP@R"), (axes[1], "precision_at_1", "precision@1")):
        m = np.array(matrix[key], dtype=float)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")  # a missing cell is grey, not 0
        ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=1)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(
                    j,
                    i,
                    "-" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if not np.isnan(m[i, j]) and m[i, j] < 0.6 else "black",
                )
        ax.set_xticks(range(len(mags)), mags)
        ax.set_yticks(range(len(mags)), mags)
        ax.set(xlabel="gallery magnification", ylabel="query magnification", title=f"cross-magnification {title}")
    return _save(fig, path)


def gallery(queries: list[dict], path: Path, thumb: tuple[int, int] = (150, 100)) -> Path | None:
    """Rows: a query image, then its nearest references; green frame = same class, red = other class."""
    if not queries:
        return None
    k = max(len(q["neighbours"]) for q in queries)
    fig, axes = _subplots(len(queries), k + 1, figsize=(1.9 * (k + 1), 1.55 * len(queries)), squeeze=False)
    for r, q in enumerate(queries):
        cells = [(q["path"], f"query: {q['label']}\n{mag_name(q['magnification'])}", "black")] + [
            (
                n["path"],
                f"{n['label']} {mag_name(n['magnification'])}\nd={n['distance']:.2f}",
                "#2ca02c" if n["label"] == q["label"] else "#d62728",
            )
            for n in q["neighbours"]
        ]
        for c in range(k + 1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            image_path, text, colour = cells[c]
            try:
                with Image.open(image_path) as im:
                    ax.imshow(im.convert("RGB").resize(thumb))
            except OSError:
                ax.text(0.5, 0.5, "unreadable", ha="center")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(text, fontsize=7)
    return _save(fig, path)


def roc_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]], positive: str, path: Path, unit: str = "test images"
) -> Path | None:
    """ROC curves (false positive rate, true positive rate, AUC) of each method, ``positive`` the positive class."""
    if not curves:
        return None
    fig, ax = _subplots(figsize=(4.8, 4.4))
    for k, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        ax.plot(fpr, tpr, color=METHOD_COLOURS[k % len(METHOD_COLOURS)], label=f"{name} (AUC {auc:.3f})", lw=1.6)
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--", label="chance")
    ax.set(
        xlabel="false positive rate (1 - specificity)",
        ylabel=f"true positive rate ({positive} recall)",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"ROC, {positive} as positive, {unit}",
    )
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def reliability_diagram(calibration: dict | None, path: Path) -> Path | None:
    """Accuracy against confidence per bin, the model as calibrated and uncalibrated (T = 1)."""
    if not calibration or not calibration.get("images"):
        return None
    fig, ax = _subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--", label="perfectly calibrated")
    t = calibration["temperature"]
    for key, name, colour in (
        ("reliability_uncalibrated", f"uncalibrated (ECE {100 * calibration['ece_uncalibrated']:.1f}%)", "#8d8d8d"),
        ("reliability", f"T = {t:.2f} (ECE {100 * calibration['ece']:.1f}%)", METHOD_COLOURS[0]),
    ):
        r = calibration[key]
        pts = [(c, a, n) for c, a, n in zip(r["confidence"], r["accuracy"], r["count"]) if n]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour, label=name, lw=1.4)
            for c, a, n in pts:
                ax.annotate(str(n), (c, a), textcoords="offset points", xytext=(3, 3), fontsize=7, color=colour)
    ax.set(
        xlabel="confidence (probability of the predicted class)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"reliability, {calibration['images']} test images (n per point)",
    )
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


__all__ = [
    "training_curves",
    "confusion",
    "magnification_bars",
    "embedding_map",
    "retrieval_heatmap",
    "gallery",
    "roc_curves",
    "reliability_diagram",
]
