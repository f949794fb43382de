"""Image-, patient- and magnification-level metrics as the literature reports them, and calibration."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from smse.data.records import mag_name


def image_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Correct images / all images."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def patient_scores(y_true: Sequence[int], y_pred: Sequence[int], patients: Sequence[str]) -> dict[str, float]:
    """Patient score = correct images of the patient / images of the patient."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t, p, pid in zip(y_true, y_pred, patients):
        hits[pid][0] += int(t == p)
        hits[pid][1] += 1
    return {pid: c / n for pid, (c, n) in sorted(hits.items())}


def patient_accuracy(y_true: Sequence[int], y_pred: Sequence[int], patients: Sequence[str]) -> float:
    """Patient recognition rate: the mean of the patient scores."""
    scores = patient_scores(y_true, y_pred, patients)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def patient_diagnosis_accuracy(y_true: Sequence[int], y_pred: Sequence[int], patients: Sequence[str]) -> float:
    """One vote per patient: the patient's majority prediction against the patient's majority label."""
    votes: dict[str, list] = defaultdict(lambda: [defaultdict(int), defaultdict(int)])
    for t, p, pid in zip(y_true, y_pred, patients):
        votes[pid][0][t] += 1
        votes[pid][1][p] += 1
    right = [max(tl, key=lambda k: (tl[k], -k)) == max(pl, key=lambda k: (pl[k], -k)) for tl, pl in votes.values()]
    return float(np.mean(right)) if right else float("nan")


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[t, p] += 1
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (NaN for a class absent from y_true)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(cm) / cm.sum(axis=1)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present."""
    rec = per_class_recall(cm)
    return float(np.nanmean(rec)) if np.isfinite(rec).any() else float("nan")


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over classes that occur in y_true or y_pred."""
    tp = np.diag(cm).astype(float)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * tp / (2 * tp + fp + fn)
    return float(f1[present].mean()) if present.any() else float("nan")


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """Binary ROC-AUC as the Mann-Whitney probability that a positive outranks a negative (ties count 1/2)."""
    y, s = np.asarray(y_true), np.asarray(scores, dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == 1].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def expected_calibration_error(y_true: Sequence[int], probs: np.ndarray, bins: int = 15) -> float:
    """ECE: bin by confidence (max probability), weight |accuracy - confidence| by bin size."""
    probs = np.asarray(probs, dtype=float)
    if len(probs) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(ece)


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, patients: Sequence[str],
                           n_classes: int) -> dict:
    """Every classification metric on one set of images."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    y_pred = probs.argmax(axis=1) if len(probs) else np.empty(0, dtype=int)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    out = {
        "images": int(len(y_true)),
        "patients": len(set(patients)),
        "image_accuracy": image_accuracy(y_true, y_pred),
        "patient_accuracy": patient_accuracy(y_true, y_pred, patients),
        "patient_diagnosis_accuracy": patient_diagnosis_accuracy(y_true, y_pred, patients),
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "per_class_recall": [None if np.isnan(v) else float(v) for v in per_class_recall(cm)],
        "calibration_error": expected_calibration_error(y_true, probs),
        "confusion_matrix": cm.tolist(),
    }
    if n_classes == 2:
        out["roc_auc"] = roc_auc(y_true, probs[:, 1] if len(probs) else [])
    return out


def by_magnification(y_true: Sequence[int], probs: np.ndarray, patients: Sequence[str], mags: Sequence[int],
                     n_classes: int) -> dict[str, dict]:
    """``classification_metrics`` for each magnification and for all of them pooled (key ``all``)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    patients, mags = np.asarray(patients), np.asarray(mags)
    out = {}
    for m in sorted(set(mags.tolist())):
        sel = mags == m
        out[mag_name(m)] = classification_metrics(y_true[sel], probs[sel], patients[sel].tolist(), n_classes)
    out["all"] = classification_metrics(y_true, probs, patients.tolist(), n_classes)
    return out
