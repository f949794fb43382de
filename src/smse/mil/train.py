"""Slide-level learning from slide labels: cross-validated bag models over a tile run's frozen embeddings.

``train_slides`` embeds a tile manifest (``smse tiles``) with a tile run's model once, groups the tiles
into one bag per slide, and then, on the same patient-disjoint folds, fits and scores every method:
the chosen pooling model and the other pools (attention, multimag, mean, max) and the two rules that need
no training, the mean and the max of the tile classifier's probabilities (``smse predict-slide`` today).
Every slide is scored by a model that never saw it (out-of-fold); the saved model is then fitted on
every slide. Epochs are fixed (no validation slides are set aside: with tens of slides there are too few
to choose an epoch by).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smse.config import SEED_MAX, ClassificationLossName, apply_overrides, build_checked, ranged
from smse.errors import ConfigError, DataError
from smse.losses.classification import make_classification_loss
from smse.metrics import CONFIDENCE, accuracy_intervals, balanced_accuracy, roc_auc
from smse.mil.bags import Bag, bags_from_embeddings, collate, describe, match_labels
from smse.mil.models import POOLS, Pool, SlideModel
from smse.progress import progress
from smse.runfiles import SLIDE_MODEL_FORMAT, SlideRunFiles, file_fingerprint, load_embeddings
from smse.runtime import torch_threads

log = logging.getLogger(__name__)

#: the rules scored beside the trained pools: they read the tile classifier's probability of the positive class
RULES = ("mean-probability", "max-probability")
BOOTSTRAP_DRAWS = 2000


@dataclass
class SlideConfig:
    """Settings of a slide-level model (``smse train-slides ... field=value``)."""

    pool: Pool = "attention"
    hidden: int = ranged(128, 1, 4096)
    attention_hidden: int = ranged(64, 1, 4096)
    dropout: float = ranged(0.25, 0, 1, high_open=True)
    epochs: int = ranged(40, 1, 100000)
    lr: float = ranged(5e-4, 0, 1, low_open=True)
    weight_decay: float = ranged(1e-4, 0, 1)
    batch_slides: int = ranged(8, 1, 100000)
    folds: int = ranged(5, 2, 1000)
    seed: int = ranged(0, 0, SEED_MAX)
    loss: ClassificationLossName = "rfl"
    alpha: float = ranged(2.0, 0, 1000, low_open=True)
    gamma: float = ranged(1.2, 0, 100)
    positive: str | None = None


def slide_config(overrides: Sequence[str] = (), base: dict | None = None) -> SlideConfig:
    """A ``SlideConfig`` from ``field=value`` overrides; a wrong field, type, choice or range names the field."""
    overrides = [o[len("mil.") :] if o.startswith("mil.") else o for o in overrides]
    return build_checked(SlideConfig, apply_overrides(dict(base or {}), overrides), "mil.")


def fit(
    bags: Sequence[Bag],
    targets: np.ndarray,
    classes: int,
    cfg: SlideConfig,
    pool: str | None = None,
    seed: int = 0,
    history: list[dict] | None = None,
) -> SlideModel:
    """A slide model fitted on ``bags`` for ``cfg.epochs`` epochs of mini-batches of ``cfg.batch_slides`` bags.

    Bags of a mini-batch are padded to the largest and the padding masked out of attention and pooling.
    Class imbalance: the classification loss of the tile model (``cfg.loss``, reinforced focal by default)
    with its class weights from the slides' class counts.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SlideModel(
        bags[0].features.shape[2],
        classes,
        pool or cfg.pool,  # type: ignore[arg-type]
        cfg.hidden,
        cfg.attention_hidden,
        cfg.dropout,
    )
    counts = np.bincount(targets, minlength=classes)
    loss_fn = make_classification_loss(cfg.loss, np.maximum(counts, 1).tolist(), cfg.alpha, cfg.gamma)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    y_all = torch.as_tensor(targets, dtype=torch.long)
    with torch_threads(1):  # tiny kernels: one CPU thread is faster than several
        for epoch in range(cfg.epochs):
            model.train()
            order = rng.permutation(len(bags))
            total = 0.0
            for start in range(0, len(order), cfg.batch_slides):
                pick = order[start : start + cfg.batch_slides]
                x, mask = collate([bags[i] for i in pick])
                logits, _ = model(x, mask)
                loss = loss_fn(logits, y_all[pick])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(pick)
            if history is not None:
                history.append({"epoch": epoch + 1, "loss": total / len(bags)})
    return model.eval()


@torch.no_grad()
def predict_bags(model: SlideModel, bags: Sequence[Bag], batch: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities [N, C] and each bag's tile attention [S, M] (zeros where a tile is absent)."""
    model.eval()
    probs, atts = [], []
    with torch_threads(1):  # tiny kernels: one CPU thread is faster than several
        for start in range(0, len(bags), batch):
            part = bags[start : start + batch]
            x, mask = collate(part)
            logits, att = model(x, mask)
            probs.append(torch.softmax(logits, 1).numpy())
            atts += [a[: len(b.centres)].numpy() for a, b in zip(att, part)]
    return np.concatenate(probs), atts


def rule_scores(bags: Sequence[Bag], rule: str) -> np.ndarray:
    """The slide score of a rule on the tile classifier's probabilities (mean or max over the slide's tiles)."""
    reduce = np.nanmean if rule == "mean-probability" else np.nanmax
    return np.array([float(reduce(b.positive[b.mask])) for b in bags])


def patient_folds(bags: Sequence[Bag], targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per bag: patients stratified by class, never split between folds.

    Raises:
        DataError: a single class, or fewer patients in a class than 2 (nothing to cross-validate).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    patients = np.array([b.patient for b in bags])
    per_class = {int(c): len(set(patients[targets == c])) for c in np.unique(targets)}
    if len(per_class) < 2:
        raise DataError(f"--labels: every slide has the same label ({bags[0].label}); slide learning needs two classes")
    k = min(folds, min(per_class.values()))
    if k < 2:
        raise DataError(
            "--labels: a class has slides of one patient only; cross-validation needs at least 2 patients per class"
        )
    if k < folds:
        log.warning("mil.folds=%d: the smallest class has %d patients; cross-validating with %d folds", folds, k, k)
    out = np.zeros(len(bags), np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(bags)), targets, patients)):
        out[test] = fold
    return out


def slide_metrics(
    targets: np.ndarray, probs: np.ndarray, patients: Sequence[str], positive: int, seed: int = 0
) -> dict[str, Any]:
    """Accuracy, balanced accuracy and (two classes) ROC-AUC of slides, with 95% patient-bootstrap intervals."""
    targets, groups = np.asarray(targets), np.asarray(patients)
    pred = probs.argmax(1)
    out: dict[str, Any] = {
        "slides": int(len(targets)),
        "patients": len(set(groups.tolist())),
        "correct": int((pred == targets).sum()),
        "accuracy": float((pred == targets).mean()),
        "balanced_accuracy": balanced_accuracy(targets, pred),
    }
    intervals = {"accuracy": accuracy_intervals(targets, pred, groups, seed=seed)["image_accuracy"]}
    binary = probs.shape[1] == 2
    if binary:
        out["roc_auc"] = roc_auc(targets == positive, probs[:, positive])
    ids, inverse = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    bal, auc = [], []
    for _ in range(BOOTSTRAP_DRAWS):
        rows = np.concatenate([np.flatnonzero(inverse == i) for i in rng.integers(0, len(ids), len(ids))])
        t = targets[rows]
        if len(np.unique(t)) < 2:
            continue
        bal.append(balanced_accuracy(t, pred[rows]))
        if binary:
            auc.append(roc_auc(t == positive, probs[rows, positive]))
    q = [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)]
    intervals["balanced_accuracy"] = np.percentile(bal, q).tolist() if bal else [float("nan")] * 2
    if binary:
        intervals["roc_auc"] = np.percentile(auc, q).tolist() if auc else [float("nan")] * 2
    out["intervals"] = intervals
    return out


def _rule_probs(scores: np.ndarray, positive: int) -> np.ndarray:
    """A rule's score as two-class probabilities (the positive class's column is the score)."""
    probs = np.zeros((len(scores), 2))
    probs[:, positive] = scores
    probs[:, 1 - positive] = 1 - scores
    return probs


def _check_out(out: Path) -> None:
    """``--out`` is new, empty, or a slide run folder: never a tile run (its split, report and metrics would go).

    Raises:
        OutputError: naming the folder and what it holds.
    """
    from smse.errors import OutputError
    from smse.runfiles import RunFiles

    if not out.is_dir():
        return
    tile_run = RunFiles(out)
    if tile_run.checkpoint("best").exists() or tile_run.state.exists() or tile_run.config.exists():
        raise OutputError(f"--out {out}: a tile run folder (smse train); give a folder of its own for the slide run")
    if any(out.iterdir()) and not SlideRunFiles(out).config.exists():
        raise OutputError(f"--out {out}: holds files of something else than a slide run; give a new or empty folder")


def _check_before_embedding(manifest: Path, labels: dict, where: str) -> None:
    """The labels against the manifest's slides, before minutes of embedding: missing or unknown slides, one class.

    Raises:
        DataError: naming the slides, or the one label.
    """
    from smse.data.manifest import read_manifest

    records, _ = read_manifest(manifest)
    slides = list(dict.fromkeys(r.slide for r in records if r.slide))
    if not slides:
        raise DataError(
            f"{manifest}: tiles without slide,x,y columns; slide-level learning needs the tiles of smse tiles"
        )
    matched = match_labels(slides, labels, where)
    classes = {v.label for v in matched.values()}
    by_case: dict[str, set[str]] = {}
    for c in classes:
        by_case.setdefault(c.casefold(), set()).add(c)
    clash = [sorted(v) for v in by_case.values() if len(v) > 1]
    if clash:
        raise DataError(f"{where}: labels that differ only in case: {' / '.join(clash[0])}; write them one way")
    for c in sorted(classes):
        patients = {v.patient for v in matched.values() if v.label == c}
        if len(patients) < 2:
            raise DataError(
                f"{where}: every {c} slide is of one patient ({patients.pop()}); cross-validation needs at least 2 "
                "patients per class"
            )
    if len(classes) < 2:
        raise DataError(f"{where}: every slide has the same label ({classes.pop()}); slide learning needs two classes")


def _embed(run: Path, manifest: Path, files: SlideRunFiles, fingerprint: str, progress_bar: bool) -> tuple[dict, str]:
    """The tiles' embeddings under the run's model (reused from the slide run folder when made by that very model
    from the same manifest), and the manifest's fingerprint."""
    from smse.evaluate import embed_folder

    old = files.read_config() if files.config.is_file() else None
    manifest_fingerprint = file_fingerprint(manifest)
    same = (
        old is not None
        and old.get("tile_model", {}).get("fingerprint") == fingerprint
        and old.get("data", {}).get("manifest_fingerprint") == manifest_fingerprint
    )
    if same and files.embeddings.is_file():
        log.info("tile embeddings: reusing %s (same tile model, same manifest)", files.embeddings)
    else:
        log.info("tile embeddings: embedding every tile of %s with %s", manifest, run)
        embed_folder(run, manifest, files.embeddings, progress=progress_bar)
        # recorded at once: a run stopped later (during the folds) reuses these embeddings
        files.write_config(
            {
                "tile_model": {"run": str(run), "fingerprint": fingerprint},
                "data": {"manifest": str(manifest), "manifest_fingerprint": manifest_fingerprint},
                "state": "tiles embedded; slide models not trained yet",
            }
        )
    return load_embeddings(files.embeddings), manifest_fingerprint


def train_slides(
    run: str | os.PathLike,
    manifest: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    which: str = "best",
    show_progress: bool = True,
) -> dict:
    """Cross-validate slide-level models on a tile manifest with slide labels; fit and save the chosen one.

    Args:
        run: the tile run whose model embeds the tiles (its folder or checkpoint).
        manifest: tiles with ``slide,x,y`` (``smse tiles`` output).
        labels: CSV ``slide,label[,patient][,tumor_type]``, one row per slide.
        out: the slide run folder.
        overrides: ``field=value`` settings of ``SlideConfig``.

    Returns:
        ``eval/metrics.json``'s content.
    """
    from smse.checkpoint import find_checkpoint
    from smse.io import writable_folder
    from smse.wsi.export import read_labels

    cfg = slide_config(overrides)
    checkpoint = find_checkpoint(Path(run), which)
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"{manifest}: tile manifest not found")
    slide_labels = read_labels(labels)
    _check_before_embedding(manifest, slide_labels, str(labels))
    _check_out(Path(out))
    files = SlideRunFiles(writable_folder(out, "--out"))
    fingerprint = file_fingerprint(checkpoint)
    t0 = time.perf_counter()
    arrays, manifest_fingerprint = _embed(Path(run), manifest, files, fingerprint, show_progress)
    embed_seconds = time.perf_counter() - t0
    class_names = sorted({v.label for v in slide_labels.values()})
    positive_name = cfg.positive or ("malignant" if "malignant" in class_names else class_names[-1])
    if positive_name not in class_names:
        raise ConfigError(f"mil.positive: {positive_name!r} is not a label of {labels} ({', '.join(class_names)})")
    bags = bags_from_embeddings(arrays, slide_labels, positive_name, str(manifest), str(labels))
    log.info("slides: %s", describe(bags))
    targets = np.array([class_names.index(b.label) for b in bags])
    positive = class_names.index(positive_name)
    folds = patient_folds(bags, targets, cfg.folds, cfg.seed)
    has_rules = len(class_names) == 2 and all(np.isfinite(b.positive[b.mask]).all() for b in bags)
    pools = [cfg.pool] + [p for p in POOLS if p != cfg.pool]
    methods = pools + (list(RULES) if has_rules else [])
    oof = {m: np.zeros((len(bags), len(class_names))) for m in methods}
    attention: list[np.ndarray | None] = [None] * len(bags)
    n_folds = int(folds.max()) + 1
    steps = progress(
        [(f, p) for f in range(n_folds) for p in pools],
        desc="slide models (fold x pool)",
        unit="fits",
        enabled=show_progress,
    )
    for fold, pool in steps:
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        model = fit([bags[i] for i in train], targets[train], len(class_names), cfg, pool, cfg.seed + fold)
        probs, atts = predict_bags(model, [bags[i] for i in test])
        oof[pool][test] = probs
        if pool == cfg.pool:
            for i, a in zip(test, atts):
                attention[i] = a
    if has_rules:
        for rule in RULES:
            oof[rule] = _rule_probs(rule_scores(bags, rule), positive)
    patients = [b.patient for b in bags]
    results = {m: slide_metrics(targets, oof[m], patients, positive, cfg.seed) for m in methods}
    for m in methods:
        results[m]["kind"] = "trained pool" if m in POOLS else "rule on tile probabilities (no training)"
    history: list[dict] = []
    t1 = time.perf_counter()
    final = fit(bags, targets, len(class_names), cfg, cfg.pool, cfg.seed, history)
    fit_seconds = time.perf_counter() - t1
    t2 = time.perf_counter()
    predict_bags(final, bags)
    per_slide_ms = 1000 * (time.perf_counter() - t2) / len(bags)
    config = {
        "slide_model": asdict(cfg),
        "classes": class_names,
        "positive": positive_name,
        "tile_model": {"run": str(run), "checkpoint": str(checkpoint), "fingerprint": fingerprint},
        "data": {
            "manifest": str(manifest),
            "manifest_fingerprint": manifest_fingerprint,
            "labels": str(labels),
            "magnifications": list(bags[0].magnifications),
            "dimension": int(bags[0].features.shape[2]),
        },
    }
    files.write_config(config)
    files.write_split([b.slide, b.patient, b.label, int(f)] for b, f in zip(bags, folds))
    files.write_history(history)
    files.write_model(
        {
            "format": SLIDE_MODEL_FORMAT,
            "state_dict": final.state_dict(),
            "config": asdict(cfg),
            "classes": class_names,
            "positive": positive_name,
            "fingerprint": fingerprint,
            "dimension": int(bags[0].features.shape[2]),
            "magnifications": list(bags[0].magnifications),
        }
    )
    header = ["slide", "patient", "label", "fold", *(f"p_{positive_name}_{m}" for m in methods)]
    files.write_predictions(
        header,
        (
            [b.slide, b.patient, b.label, int(folds[i]), *(f"{oof[m][i, positive]:.6f}" for m in methods)]
            for i, b in enumerate(bags)
        ),
    )
    files.write_attention(
        [b.slide, f"{x:g}", f"{y:g}", b.magnifications[j], f"{a[s, j]:.6g}", int(folds[i])]
        for i, (b, a) in enumerate(zip(bags, attention))
        if a is not None
        for s, (x, y) in enumerate(b.centres)
        for j in range(len(b.magnifications))
        if b.mask[s, j]
    )
    metrics = {
        "model": cfg.pool,
        "classes": class_names,
        "positive": positive_name,
        "folds": n_folds,
        "slides": len(bags),
        "patients": len(set(patients)),
        "tiles": int(sum(b.tiles for b in bags)),
        "class_counts": {c: int((targets == i).sum()) for i, c in enumerate(class_names)},
        "methods": results,
        "timing": {
            "embedding_seconds": embed_seconds,
            "final_fit_seconds": fit_seconds,
            "slide_model_ms_per_slide": per_slide_ms,
        },
        "protocol": f"{n_folds}-fold cross-validation, patients stratified by class and never split; every slide "
        "scored by a model that never saw it; intervals: 95% patient bootstrap",
    }
    files.write_metrics(metrics)
    from smse.mil.report import write_report

    write_report(files, metrics, config)
    return metrics


def results_lines(metrics: dict) -> list[str]:
    """The printed table: one line per method, with counts and intervals."""
    lines = []
    for name, r in metrics["methods"].items():
        iv = r["intervals"]
        auc = f"ROC-AUC {r['roc_auc']:.3f} [{iv['roc_auc'][0]:.3f}, {iv['roc_auc'][1]:.3f}]  " if "roc_auc" in r else ""
        lines.append(
            f"{name:<17} {auc}accuracy {100 * r['accuracy']:.1f}% ({r['correct']}/{r['slides']}) "
            f"[{100 * iv['accuracy'][0]:.1f}, {100 * iv['accuracy'][1]:.1f}]  balanced "
            f"{100 * r['balanced_accuracy']:.1f}% [{100 * iv['balanced_accuracy'][0]:.1f}, "
            f"{100 * iv['balanced_accuracy'][1]:.1f}]"
        )
    return lines


__all__ = [
    "RULES",
    "SlideConfig",
    "slide_config",
    "fit",
    "predict_bags",
    "rule_scores",
    "patient_folds",
    "slide_metrics",
    "train_slides",
    "results_lines",
]
