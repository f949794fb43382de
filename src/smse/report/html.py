"""Assemble the run report: one HTML file with every image embedded, plus the PNGs beside it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from smse.data.records import canonical_path, mag_name
from smse.errors import CheckpointError
from smse.io import writable_folder, write_text
from smse.report import plots
from smse.report.pages import png_uri, render
from smse.retrieval import search
from smse.runfiles import RunFiles
from smse.spots import baseline_note, localisation_grid
from smse.tables import pct, result_rows, results_grid, table_note

logger = logging.getLogger(__name__)


def _uri(path: Path | None) -> str | None:
    """A figure's PNG as a ``data:`` URI (None: nothing to show)."""
    return None if path is None else png_uri(Path(path).read_bytes())


def _project(emb: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """2-D map of embeddings: UMAP when installed, t-SNE otherwise."""
    if len(emb) < 5:
        return np.zeros((len(emb), 2)), "none"
    logger.info("embedding map of %d test images (UMAP or t-SNE; can take a minute for thousands)", len(emb))
    try:
        import umap

        return umap.UMAP(random_state=seed, n_jobs=1, n_neighbors=min(15, len(emb) - 1)).fit_transform(emb), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(emb) - 1) / 3)))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(emb), "t-SNE"


def _finite_rows(arrays: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """The rows of an embeddings file whose embedding is finite (NaN would crash t-SNE and UMAP); logs what it drops."""
    keep = np.isfinite(arrays["embeddings"]).all(axis=1)
    if keep.all():
        return arrays
    logger.warning(
        "left %d of %d %s images with non-finite embeddings out of the report's plots",
        int((~keep).sum()),
        len(keep),
        what,
    )
    return {k: v if k == "class_names" else v[keep] for k, v in arrays.items()}


def _gallery_queries(test: dict, ref: dict, per_cell: int = 1, k: int = 5) -> list[dict]:
    """One query per (magnification, class) of the test set with its k nearest training images."""
    chosen = []
    for mag in sorted(set(test["magnifications"].tolist())):
        for label in sorted(set(test["labels"].tolist())):
            idx = np.flatnonzero((test["magnifications"] == mag) & (test["labels"] == label))[:per_cell]
            chosen.extend(idx.tolist())
    if not chosen or len(ref["embeddings"]) == 0:
        return []
    dist, nn = search(test["embeddings"][chosen], ref["embeddings"], k)
    out = []
    for qi, row_d, row_n in zip(chosen, dist, nn):
        out.append(
            {
                "path": str(test["paths"][qi]),
                "label": str(test["labels"][qi]),
                "magnification": int(test["magnifications"][qi]),
                "neighbours": [
                    {
                        "path": str(ref["paths"][j]),
                        "label": str(ref["labels"][j]),
                        "magnification": int(ref["magnifications"][j]),
                        "distance": float(d),
                    }
                    for j, d in zip(row_n, row_d)
                ],
            }
        )
    return out[:8]


def _roc(preds: list[dict], classes: list[str]) -> dict:
    """The model's ROC curve on the test images (binary task; the second class is the positive one)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.array([p["label"] == classes[1] for p in preds], dtype=int)
    score = np.array([float(p[f"p_{classes[1]}"]) for p in preds])
    if len(set(y.tolist())) < 2:
        return {}
    fpr, tpr, _ = roc_curve(y, score)
    return {"model": (fpr, tpr, float(roc_auc_score(y, score)))}


def _bar_rows(m: dict) -> dict[str, dict]:
    """The results table's rows under names short enough for a legend."""
    short = ["model", f"k-NN (k={m['knn_k']})", "logistic regression (baseline)"]
    return dict(zip(short, result_rows(m).values()))


#: the magnification probe is shown only where every magnification has at least this many test images
MIN_PROBE_IMAGES = 10


def _probe_card(probe: dict) -> str:
    if probe["accuracy"] != probe["accuracy"]:
        return "n/a (one magnification)"
    if probe.get("smallest", MIN_PROBE_IMAGES) < MIN_PROBE_IMAGES:
        return f"n/a ({probe['smallest']} test images at the rarest magnification)"
    return (
        f"{100 * probe['balanced_accuracy']:.0f}% (chance {100 * probe['balanced_chance']:.0f}%; "
        f"{probe['images']} images)"
    )


def _similarity(m: dict) -> dict | None:
    """The rows of the similarity table (the embedding beside the frozen features) and of the guide to distances."""
    sim = m.get("similarity")
    if not sim:
        return None
    names = {"embedding": "SMSE embedding"} | {
        k: (
            "frozen backbone features"
            if k == "frozen_features"
            else f"frozen features, PCA to {k[len('frozen_pca') :]} dims"
        )
        for k in sim
        if k != "embedding"
    }
    rows = []
    for key, name in names.items():
        s = sim[key]
        t, w, sp, spread = (
            s["type_retrieval"]["all"],
            s["type_retrieval"]["within_class"],
            s["same_patient"],
            s["spread"],
        )
        q = spread["distance_quantiles"]
        rows.append(
            [
                name,
                f"{pct(t['precision_at_5'])} ({pct(t['chance_precision'])})",
                pct(t["map_at_r"]),
                f"{pct(w['precision_at_5'])} ({pct(w['chance_precision'])})",
                t["queries"],
                f"{pct(sp['hit_at_5'])} ({pct(sp['chance_hit_at_5'])})",
                sp["queries"],
                f"{pct(spread['first_axis_share'])}%",
                f"{spread['effective_rank']:.1f}",
                f"{q[0]:.2f} / {q[2]:.2f} / {q[4]:.2f}",
            ]
        )
    guide = sim["embedding"]["distance_guide"]
    guide_rows = []
    for key, name in (
        ("same_type", "same tumour type"),
        ("same_class", "same class, another type"),
        ("other_class", "another class"),
        ("nearest", "each reference to its 5th nearest"),
    ):
        g = guide[key]
        guide_rows.append(
            [name, " / ".join(f"{v:.2f}" for v in g["quantiles"][1:4]) if g["quantiles"] else "-", g["pairs"]]
        )
    threshold = "-" if guide["ood_threshold"] is None else f"{guide['ood_threshold']:.2f}"
    return {"rows": rows, "guide": guide_rows, "threshold": threshold, "references": guide["references"]}


def _write_label_free_report(
    run: Path, files: RunFiles, m: dict, history: list[dict], out: Path, projection_seed: int
) -> Path:
    """The report of a label-free run: localisation, the embedding map by slide and magnification, curves."""
    test = files.read_embeddings(files.test_embeddings)
    if test is None:
        raise CheckpointError(f"{run}: no {files.test_embeddings.name} in eval/; run `smse evaluate {run}` again")
    test = _finite_rows(test, "test")
    coords, method = _project(test["embeddings"], projection_seed)
    groups = test["slides"].tolist() if "slides" in test else test["patients"].tolist()
    figs = {
        "curves": plots.training_curves(history, out / "training-curves.png"),
        "map": plots.embedding_map(
            coords, groups, [mag_name(int(v)) for v in test["magnifications"]], method, out / "embedding-map.png"
        )
        if method != "none"
        else None,
    }
    spread = m["spread"]
    page = render(
        "label_free.html.j2",
        title=f"smse report: {run.name}",
        heading=f"smse report: {run}",
        subtitle=f"label-free (same-spot positives); {m['images']} test tiles of {m['slides']} slides; checkpoint "
        f"{m['checkpoint']} (epoch {m['epoch']})",
        localisation=localisation_grid(m.get("localisation"), pairs=False),
        zooms=m.get("zooms", [1]),
        baseline_note=baseline_note(m.get("zooms", [1])),  # our words and whole numbers only: shown as is
        figs={k: _uri(v) for k, v in figs.items()},
        spread=[f"{pct(spread['first_axis_share'])}%", f"{spread['effective_rank']:.1f}"],
        probe=_probe_card(m["magnification_probe"]),
        config_text=files.config.read_text() if files.config.exists() else "",
    )
    write_text(files.report, page)
    return files.report


def write_report(run: str | Path, projection_seed: int = 0) -> Path:
    """Write ``run/report/report.html`` and its PNGs from what train and evaluate left in ``run``."""
    run = Path(run)
    files = RunFiles(run)
    m = files.read_metrics()
    if m is None:
        raise CheckpointError(f"{run}: no eval/metrics.json; run `smse evaluate {run}` first")
    out = writable_folder(files.report_dir, "report folder")  # a read-only run, a file at report/: named
    history = files.read_history()
    if m.get("label_free"):
        return _write_label_free_report(run, files, m, history, out, projection_seed)
    classes = m["classes"]
    # confusion matrices: the task's own, plus true tumour type x predicted class (binary task)
    # or the 8-type predictions collapsed to benign/malignant (type task)
    split = files.read_split() or []
    rows = {canonical_path(r.path): {"tumor_type": r.tumor_type, "label": r.label} for r in split}
    preds = files.read_predictions()
    second = None
    if rows and m["task"] == "binary":
        order = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
        type_names = sorted(
            {rows[p["path"]]["tumor_type"] for p in preds},
            key=lambda t: (order.index(t) if t in order else len(order), t),
        )
        if type_names != classes:
            cm = np.zeros((len(type_names), len(classes)), dtype=int)
            for p in preds:
                cm[type_names.index(rows[p["path"]]["tumor_type"]), classes.index(p["predicted"])] += 1
            second = (cm, type_names, classes, "true tumour type x predicted class")
    elif rows:
        label_of = {r["tumor_type"]: r["label"] for r in rows.values()}
        labels = sorted(set(label_of.values()))
        if len(labels) < len(classes):
            cm = np.zeros((len(labels), len(labels)), dtype=int)
            for p in preds:
                cm[labels.index(rows[p["path"]]["label"]), labels.index(label_of[p["predicted"]])] += 1
            second = (cm, labels, labels, "types collapsed to their class")
    figs = {
        "curves": plots.training_curves(history, out / "training-curves.png"),
        "cm": plots.confusion(
            np.array(m["head"]["all"]["confusion_matrix"]),
            classes,
            classes,
            f"{m['task']} task, all magnifications",
            out / "confusion.png",
        ),
        "cm_types": plots.confusion(*second, out / "confusion-second.png") if second else None,
        "bars": plots.magnification_bars(_bar_rows(m), out / "accuracy-by-magnification.png"),
        "retrieval": plots.retrieval_heatmap(m["retrieval"], out / "cross-magnification-retrieval.png"),
        "roc": plots.roc_curves(_roc(preds, classes), classes[-1], out / "roc.png") if len(classes) == 2 else None,
        "reliability": plots.reliability_diagram(m.get("calibration"), out / "reliability.png"),
    }
    test_arrays = files.read_embeddings(files.test_embeddings)
    if test_arrays is None:
        raise CheckpointError(f"{run}: no {files.test_embeddings.name} in eval/; run `smse evaluate {run}` again")
    test = _finite_rows(test_arrays, "test")
    coords, method = _project(test["embeddings"], projection_seed)
    label_key = "labels" if m["task"] == "binary" else "tumor_types"
    figs["map"] = (
        plots.embedding_map(
            coords,
            test[label_key].tolist(),
            [mag_name(int(v)) for v in test["magnifications"]],
            method,
            out / "embedding-map.png",
        )
        if method != "none"
        else None
    )
    ref = files.read_embeddings(files.reference)
    ref = _finite_rows(ref, "reference") if ref is not None else None
    figs["gallery"] = plots.gallery(_gallery_queries(test, ref), out / "nearest-references.png") if ref else None

    head_all = m["head"]["all"]
    probe = m["magnification_probe"]
    diagnosed = round(head_all["patient_diagnosis_accuracy"] * head_all["patients"])
    kpis = [
        ("patient-level accuracy (mean patient score)", f"{100 * head_all['patient_accuracy']:.1f}%"),
        (
            f"patients diagnosed right by their images' majority ({diagnosed} of {head_all['patients']})",
            f"{100 * head_all['patient_diagnosis_accuracy']:.1f}%",
        ),
        ("image-level accuracy", f"{100 * head_all['image_accuracy']:.1f}%"),
        ("balanced accuracy", f"{100 * head_all['balanced_accuracy']:.1f}%"),
        (
            "magnification probe: balanced accuracy of recovering the magnification (lower: more independent)",
            _probe_card(probe),
        ),
    ]
    if "roc_auc" in head_all:
        kpis.insert(3, ("ROC-AUC", f"{head_all['roc_auc']:.3f}"))
    patients = [
        [
            p["patient"],
            p["label"],
            p["predicted"],
            p["images"],
            ", ".join(f"{x}X" for x in p["magnifications"]),
            f"{100 * p['score']:.1f}%",
        ]
        for p in m["patients"]
    ]
    results_head, results_rows = results_grid(result_rows(m))
    page = render(
        "report.html.j2",
        title=f"smse report: {run.name}",
        heading=f"smse report: {run}",
        subtitle=(f"{m['task']} task, classes {', '.join(classes)}; checkpoint {m['checkpoint']} (epoch {m['epoch']})"),
        kpis=[(k, v) for k, v in kpis],
        results_head=results_head,
        results_rows=results_rows,
        table_note=table_note([p["images"] for p in m["patients"]]),
        data_note=files.read_json(files.data, {}).get("summary", ""),
        figs={k: _uri(v) for k, v in figs.items()},
        localisation=localisation_grid(m.get("localisation"), pairs=False),
        zooms=m.get("zooms", [1]),
        baseline_note=baseline_note(m.get("zooms", [1])),
        calibration=m.get("calibration"),
        similarity=_similarity(m),
        patients=patients,
        config_text=files.config.read_text() if files.config.exists() else "",
        versions=json.dumps(files.read_json(files.versions, {}), indent=2),
    )
    path = files.report
    write_text(path, page)
    return path


__all__ = [
    "write_report",
]
