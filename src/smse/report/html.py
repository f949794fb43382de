"""Assemble the run report: one HTML file with every image embedded, plus the PNGs beside it."""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
from pathlib import Path

import numpy as np

from smse.data.records import canonical_path, mag_name
from smse.errors import CheckpointError
from smse.io import write_text
from smse.report import plots
from smse.retrieval import search
from smse.runfiles import RunFiles
from smse.tables import pct, result_rows, results_table, table_note

logger = logging.getLogger(__name__)

SELF_CHECK = """
<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e)); });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var sections = document.querySelectorAll('section').length;
  var el = document.getElementById('selfcheck');
  el.textContent = (broken.length || window.__errors.length ? 'FAILED' : 'OK') + ': ' + imgs.length +
    ' images, ' + broken.length + ' broken, ' + sections + ' sections, ' + window.__errors.length + ' script errors';
});
</script>
"""

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f6f8;color:#222}
header{background:#3b2a55;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85}main{padding:8px 28px 40px;max-width:1250px}
section{background:#fff;border-radius:8px;padding:14px 20px;margin:16px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{font-size:17px;margin:0 0 10px;color:#3b2a55}img{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f0edf5}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:13px}
.kpi{display:inline-block;margin:0 26px 8px 0}.kpi b{display:block;font-size:24px;color:#3b2a55}
pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:12px;max-height:400px}
#selfcheck{font-size:11px;color:#999}
"""


def png_img(png: bytes, alt: str) -> str:
    """An ``<img>`` tag holding the PNG bytes themselves (the page needs no other file)."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return f'<p class="note">({alt}: nothing to show for this run)</p>'
    return png_img(Path(path).read_bytes(), alt)


def _md_table(markdown: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in markdown.strip().splitlines() if not set(r) <= set("|-")]
    head, body = rows[0], rows[1:]
    out = "<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
    for r in body:
        out += "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
    return out + "</table>"


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
    logger.warning("left %d of %d %s images with non-finite embeddings out of the report's plots",
                   int((~keep).sum()), len(keep), what)
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
        out.append({"path": str(test["paths"][qi]), "label": str(test["labels"][qi]),
                    "magnification": int(test["magnifications"][qi]),
                    "neighbours": [{"path": str(ref["paths"][j]), "label": str(ref["labels"][j]),
                                    "magnification": int(ref["magnifications"][j]), "distance": float(d)}
                                   for j, d in zip(row_n, row_d)]})
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


def _calibration_note(cal: dict | None) -> str:
    if not cal:
        return '<p class="note">(not measured for this run: evaluate it again)</p>'
    val = cal.get("validation")
    fitted = (f"The temperature T = {cal['temperature']:.2f} was fitted on {val['val_images']} validation images "
              f"(expected calibration error there {100 * val['val_ece_before']:.1f}% before, "
              f"{100 * val['val_ece_after']:.1f}% after)." if val else
              "This run had no validation patients (data.split.val_fraction=0), so no temperature was fitted (T = 1).")
    return (f'<p class="note">{fitted} On the {cal["images"]} test images the expected calibration error is '
            f'{100 * cal["ece"]:.1f}% (uncalibrated {100 * cal["ece_uncalibrated"]:.1f}%): of the images given a '
            "probability of about p, a share of about p should be right. Temperature scaling changes no class, only "
            "the confidence; with few test images the points are noisy (their counts are shown).</p>")


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
    return (f"{100 * probe['balanced_accuracy']:.0f}% (chance {100 * probe['balanced_chance']:.0f}%; "
            f"{probe['images']} images)")


def _threshold(guide: dict) -> str:
    return "-" if guide["ood_threshold"] is None else f"{guide['ood_threshold']:.2f}"


def _similarity_html(m: dict) -> str:
    """The similarity measures of the embedding beside the frozen features', and the guide to distances."""
    sim = m.get("similarity")
    if not sim:
        return '<p class="note">(not measured for this run: evaluate it again)</p>'
    names = {"embedding": "SMSE embedding"} | {k: ("frozen backbone features" if k == "frozen_features"
                                                  else f"frozen features, PCA to {k[len('frozen_pca'):]} dims")
                                               for k in sim if k != "embedding"}
    head = ("<tr><th>embedding</th><th>type P@5 (chance)</th><th>type mAP@R</th><th>type P@5 within class (chance)</th>"
            "<th>queries</th><th>same patient, other magnification: hit@5 (chance)</th><th>queries</th>"
            "<th>variance on axis 1</th><th>effective rank</th><th>distance quantiles 5/50/95%</th></tr>")
    rows = ""
    for key, name in names.items():
        s = sim[key]
        t, w, sp, spread = s["type_retrieval"]["all"], s["type_retrieval"]["within_class"], s["same_patient"], s["spread"]
        q = spread["distance_quantiles"]
        rows += (f"<tr><td>{html.escape(name)}</td><td>{pct(t['precision_at_5'])} ({pct(t['chance_precision'])})</td>"
                 f"<td>{pct(t['map_at_r'])}</td><td>{pct(w['precision_at_5'])} ({pct(w['chance_precision'])})</td>"
                 f"<td>{t['queries']}</td><td>{pct(sp['hit_at_5'])} ({pct(sp['chance_hit_at_5'])})</td>"
                 f"<td>{sp['queries']}</td><td>{pct(spread['first_axis_share'])}%</td>"
                 f"<td>{spread['effective_rank']:.1f}</td><td>{q[0]:.2f} / {q[2]:.2f} / {q[4]:.2f}</td></tr>")
    guide = sim["embedding"]["distance_guide"]
    grows = ""
    for key, name in (("same_type", "same tumour type"), ("same_class", "same class, another type"),
                      ("other_class", "another class"), ("nearest", "each reference to its 5th nearest")):
        g = guide[key]
        cells = " / ".join(f"{v:.2f}" for v in g["quantiles"][1:4]) if g["quantiles"] else "-"
        grows += f"<tr><td>{name}</td><td>{cells}</td><td>{g['pairs']}</td></tr>"
    return (f"<table>{head}{rows}</table>"
            '<p class="note">Queries: test images; references: training and validation images of other patients (a query\'s own '
            'patient is never counted). Type P@5: the share of the 5 nearest references of the query\'s tumour type; '
            'within class: ranked among the references of the query\'s class only, so a class-collapsed embedding '
            'scores chance there. Same patient: among the test images at other magnifications, is one of the 5 nearest '
            'of the query\'s patient. Variance on axis 1 near 100% and an effective rank near 1 mean a collapsed '
            'embedding (every class one point).</p>'
            "<h3>Reading a distance</h3><table><tr><th>pairs of references (different patients)</th>"
            f"<th>distance quartiles 25/50/75%</th><th>pairs</th></tr>{grows}</table>"
            f'<p class="note">A query whose 5th nearest reference is farther than {_threshold(guide)} (the 95th '
            "percentile of the references' distances to their own 5th nearest) lies outside the references: "
            "its class and neighbours are flagged as out of distribution on the page and in <code>smse predict</code>."
            f" Computed on {guide['references']} references.</p>")


def write_report(run: str | Path, projection_seed: int = 0) -> Path:
    """Write ``run/report/report.html`` and its PNGs from what train and evaluate left in ``run``."""
    run = Path(run)
    files = RunFiles(run)
    m = files.read_metrics()
    if m is None:
        raise CheckpointError(f"{run}: no eval/metrics.json; run `smse evaluate {run}` first")
    out = files.report_dir
    out.mkdir(parents=True, exist_ok=True)
    history = files.read_history()
    classes = m["classes"]
    # confusion matrices: the task's own, plus true tumour type x predicted class (binary task)
    # or the 8-type predictions collapsed to benign/malignant (type task)
    rows = {}
    if files.split.exists():
        with open(files.split, newline="") as handle:
            rows = {canonical_path(row["path"]): row for row in csv.DictReader(handle)}
    with open(files.predictions, newline="") as handle:
        preds = [{**p, "path": canonical_path(p["path"])} for p in csv.DictReader(handle)]
    second = None
    if rows and m["task"] == "binary":
        order = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
        type_names = sorted({rows[p["path"]]["tumor_type"] for p in preds},
                            key=lambda t: (order.index(t) if t in order else len(order), t))
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
        "cm": plots.confusion(np.array(m["head"]["all"]["confusion_matrix"]), classes, classes,
                              f"{m['task']} task, all magnifications", out / "confusion.png"),
        "cm_types": plots.confusion(*second, out / "confusion-second.png") if second else None,
        "bars": plots.magnification_bars(_bar_rows(m), out / "accuracy-by-magnification.png"),
        "retrieval": plots.retrieval_heatmap(m["retrieval"], out / "cross-magnification-retrieval.png"),
        "roc": plots.roc_curves(_roc(preds, classes), classes[-1], out / "roc.png") if len(classes) == 2 else None,
        "reliability": plots.reliability_diagram(m.get("calibration"), out / "reliability.png"),
    }
    test = _finite_rows(files.read_embeddings(files.test_embeddings), "test")
    coords, method = _project(test["embeddings"], projection_seed)
    label_key = "labels" if m["task"] == "binary" else "tumor_types"
    figs["map"] = plots.embedding_map(coords, test[label_key].tolist(), [mag_name(int(v)) for v in test["magnifications"]],
                                      method, out / "embedding-map.png") if method != "none" else None
    ref = files.read_embeddings(files.reference)
    ref = _finite_rows(ref, "reference") if ref is not None else None
    figs["gallery"] = plots.gallery(_gallery_queries(test, ref), out / "nearest-references.png") if ref else None

    head_all = m["head"]["all"]
    probe = m["magnification_probe"]
    diagnosed = round(head_all["patient_diagnosis_accuracy"] * head_all["patients"])
    kpis = [("patient-level accuracy (mean patient score)", f"{100 * head_all['patient_accuracy']:.1f}%"),
            (f"patients diagnosed right by their images' majority ({diagnosed} of {head_all['patients']})",
             f"{100 * head_all['patient_diagnosis_accuracy']:.1f}%"),
            ("image-level accuracy", f"{100 * head_all['image_accuracy']:.1f}%"),
            ("balanced accuracy", f"{100 * head_all['balanced_accuracy']:.1f}%"),
            ("magnification probe: balanced accuracy of recovering the magnification (lower: more independent)",
             _probe_card(probe))]
    if "roc_auc" in head_all:
        kpis.insert(3, ("ROC-AUC", f"{head_all['roc_auc']:.3f}"))
    patients_rows = "".join(
        f"<tr><td>{html.escape(p['patient'])}</td><td>{html.escape(p['label'])}</td><td>{html.escape(p['predicted'])}</td>"
        f"<td>{p['images']}</td><td>{', '.join(f'{x}X' for x in p['magnifications'])}</td><td>{100 * p['score']:.1f}%</td></tr>"
        for p in m["patients"])
    config_text = files.config.read_text() if files.config.exists() else ""
    versions = files.read_json(files.versions, {})
    data_note = files.read_json(files.data, {}).get("summary", "")
    sections = [
        ("results", "Results on the test patients",
         "".join(f'<div class="kpi"><b>{v}</b>{html.escape(k)}</div>' for k, v in kpis)
         + _md_table(results_table(result_rows(m)))
         + f'<p class="note">{html.escape(table_note([p["images"] for p in m["patients"]]))} '
           f'Data: {html.escape(data_note)}</p>'),
        ("curves", "Training curves", _img(figs["curves"], "training curves")),
        ("confusion", "Confusion matrices", _img(figs["cm"], "confusion matrix") + " " + _img(figs["cm_types"], "confusion by tumour type")),
        ("magnification", "Accuracy per magnification", _img(figs["bars"], "accuracy per magnification")
         + (" " + _img(figs["roc"], "ROC curve") if figs["roc"] else "")),
        ("embedding", "Embedding map", _img(figs["map"], "embedding map")
         + '<p class="note">Left: classes should form separate groups. Right: magnifications should mix within each '
           'group; separate islands per magnification mean the embedding still encodes the microscope, not the tissue.</p>'),
        ("retrieval", "Cross-magnification retrieval", _img(figs["retrieval"], "retrieval heat map")
         + '<p class="note">Queries from test patients at one magnification against test images of other patients at '
           'another; relevant = same class.</p>'),
        ("calibration", "Are the probabilities right?", _img(figs["reliability"], "reliability diagram")
         + _calibration_note(m.get("calibration"))),
        ("similarity", "What similar means: tumour type, patient, spread", _similarity_html(m)),
        ("gallery", "Nearest reference cases", _img(figs["gallery"], "nearest references")
         + '<p class="note">Each row: a test image, then its nearest training images (any magnification); '
           'green frame = same class, red = other class.</p>'),
        ("patients", "Per-patient results", "<table><tr><th>patient</th><th>label</th><th>majority prediction</th>"
         f"<th>images</th><th>magnifications</th><th>patient score</th></tr>{patients_rows}</table>"),
        ("config", "Configuration and versions", f"<pre>{html.escape(config_text)}</pre><pre>"
         f"{html.escape(json.dumps(versions, indent=2))}</pre>"),
    ]
    body = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>' for sid, title, content in sections)
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>smse report: {html.escape(run.name)}</title>"
            f"<style>{STYLE}</style></head><body><header><h1>smse report: {html.escape(str(run))}</h1>"
            f"<p>{html.escape(m['task'])} task, classes {', '.join(map(html.escape, classes))}; checkpoint "
            f"{html.escape(m['checkpoint'])} (epoch {m['epoch']})</p></header><main>{body}"
            f'<p id="selfcheck">pending</p></main>{SELF_CHECK}</body></html>')
    path = files.report
    write_text(path, page)
    return path
