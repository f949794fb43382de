"""The slide run's report: every method's out-of-fold slide metrics with counts and intervals, ROC curves."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from smse.mil.train import BOOTSTRAP_DRAWS
from smse.report.pages import png_uri, render
from smse.report.plots import roc_curves, training_curves
from smse.runfiles import SlideRunFiles


def _interval(value: float, iv: list[float], percent: bool = True) -> str:
    if value != value:  # NaN: one class only among the slides
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    fmt = ".1f" if percent else ".3f"
    return f"{scale * value:{fmt}}{unit} [{scale * iv[0]:{fmt}}, {scale * iv[1]:{fmt}}]"


def _roc(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(targets, scores)
    return fpr, tpr, float(roc_auc_score(targets, scores))


def write_report(files: SlideRunFiles, metrics: dict, config: dict) -> Path:
    """``report/report.html`` of a slide run, from its metrics, predictions and history."""
    import csv

    methods = metrics["methods"]
    binary = len(metrics["classes"]) == 2
    head = ["method", "kind", "slides (patients)"] + (["ROC-AUC [95%]"] if binary else [])
    head += ["accuracy [95%]", "correct", "balanced accuracy [95%]"]
    rows = []
    for name, r in methods.items():
        iv = r["intervals"]
        row = [name, r["kind"], f"{r['slides']} ({r['patients']})"]
        if binary:
            row.append(_interval(r["roc_auc"], iv["roc_auc"], percent=False))
        row += [
            _interval(r["accuracy"], iv["accuracy"]),
            f"{r['correct']} of {r['slides']}",
            _interval(r["balanced_accuracy"], iv["balanced_accuracy"]),
        ]
        rows.append(row)
    figs: dict[str, str | None] = {"roc": None, "curves": None}
    with tempfile.TemporaryDirectory() as tmp:
        history = json.loads(files.history.read_text()) if files.history.is_file() else []
        curve = training_curves([{"epoch": h["epoch"], "loss_slide": h["loss"]} for h in history], Path(tmp) / "c.png")
        figs["curves"] = png_uri(curve.read_bytes()) if curve else None
        if binary and files.predictions.is_file():
            with open(files.predictions, newline="") as handle:
                table = list(csv.DictReader(handle))
            positive = metrics["positive"]
            y = np.array([r["label"] == positive for r in table])
            shown = [metrics["model"], *(m for m in ("mean-probability", "max-probability") if m in methods)]
            curves = {m: _roc(y, np.array([float(r[f"p_{positive}_{m}"]) for r in table])) for m in shown}
            path = roc_curves(curves, positive, Path(tmp) / "r.png", unit="slides, out of fold")
            figs["roc"] = png_uri(path.read_bytes()) if path else None
    best = methods[metrics["model"]]
    kpis = [
        ("slides (patients)", f"{metrics['slides']} ({metrics['patients']})"),
        ("tiles", str(metrics["tiles"])),
        (f"{metrics['model']}: slides right", f"{best['correct']} of {best['slides']}"),
    ]
    if binary:
        kpis.append((f"{metrics['model']}: ROC-AUC", f"{best['roc_auc']:.3f}"))
    html = render(
        "slides_report.html.j2",
        title="smse slide-level report",
        heading="smse slide-level report",
        subtitle=f"{metrics['model']} pooling over {config['tile_model']['run']}'s embeddings; labels "
        f"{', '.join(f'{k} {v}' for k, v in metrics['class_counts'].items())}",
        kpis=kpis,
        head=head,
        rows=rows,
        positive=metrics["positive"],
        protocol=f"{metrics['folds']}-fold cross-validation by patient",
        draws=BOOTSTRAP_DRAWS,
        figs=figs,
        config_text=json.dumps(config, indent=2),
    )
    return files.write_report(html)


__all__ = ["write_report"]
