"""Image-, patient- and magnification-level metrics as the literature reports them, and calibration.

The standard metrics (confusion matrix, balanced accuracy, macro-F1, ROC-AUC) are scikit-learn's;
the patient-level ones and the calibration error, which it lacks, are written here.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from smse.data.records import mag_name


def image_accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Correct images / all images."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def patient_scores(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, patients: Sequence[str] | np.ndarray
) -> dict[str, float]:
    """Patient score = correct images of the patient / images of the patient."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t, p, pid in zip(y_true, y_pred, patients):
        hits[pid][0] += int(t == p)
        hits[pid][1] += 1
    return {pid: c / n for pid, (c, n) in sorted(hits.items())}


def patient_accuracy(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, patients: Sequence[str] | np.ndarray
) -> float:
    """Patient recognition rate: the mean of the patient scores."""
    scores = patient_scores(y_true, y_pred, patients)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def patient_diagnosis_accuracy(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, patients: Sequence[str] | np.ndarray
) -> float:
    """One vote per patient: the patient's majority prediction against the patient's majority label."""
    votes: dict[str, list] = defaultdict(lambda: [defaultdict(int), defaultdict(int)])
    for t, p, pid in zip(y_true, y_pred, patients):
        votes[pid][0][t] += 1
        votes[pid][1][p] += 1
    right = [max(tl, key=lambda k: (tl[k], -k)) == max(pl, key=lambda k: (pl[k], -k)) for tl, pl in votes.values()]
    return float(np.mean(right)) if right else float("nan")


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int
) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(y_true, y_pred, labels=list(range(n_classes))).astype(np.int64)


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (NaN for a class absent from y_true)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(cm) / cm.sum(axis=1)


def balanced_accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    from sklearn.metrics import balanced_accuracy_score

    if len(y_true) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" is expected here
        return float(balanced_accuracy_score(y_true, y_pred))


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in ``y_true`` or ``y_pred``."""
    from sklearn.metrics import f1_score

    if len(y_true) == 0:
        return float("nan")
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def roc_auc(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Binary ROC-AUC (NaN where only one class is present)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def expected_calibration_error(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
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


#: bootstrap draws of the intervals, and their confidence
BOOTSTRAP_DRAWS = 1000
CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of a proportion (successes out of n); (nan, nan) for n = 0."""
    from scipy.stats import norm

    if n == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (
        0.0 if successes == 0 else float(max(0.0, centre - half)),
        1.0 if successes == n else float(min(1.0, centre + half)),
    )


def accuracy_intervals(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    patients: Sequence[str] | np.ndarray,
    draws: int = BOOTSTRAP_DRAWS,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict:
    """95% intervals of image- and patient-level accuracy, resampling *patients* (their images stay together).

    With one patient there is nothing to resample: both intervals are then Wilson's on the images.

    Returns:
        ``image_accuracy`` and ``patient_accuracy`` as [low, high], and ``method`` (``patient bootstrap``
        or ``Wilson``).
    """
    y_true, y_pred, patients = np.asarray(y_true), np.asarray(y_pred), np.asarray(patients)
    ids, inverse = np.unique(patients, return_inverse=True)
    correct = np.bincount(inverse, weights=(y_true == y_pred).astype(float), minlength=len(ids))
    count = np.bincount(inverse, minlength=len(ids)).astype(float)
    if len(ids) < 2:
        w = wilson_interval(int(correct.sum()), int(count.sum()), confidence)
        return {"image_accuracy": list(w), "patient_accuracy": list(w), "method": "Wilson"}
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))
    image = correct[pick].sum(1) / count[pick].sum(1)
    patient = (correct / count)[pick].mean(1)
    q = [50 * (1 - confidence), 50 * (1 + confidence)]
    return {
        "image_accuracy": np.percentile(image, q).tolist(),
        "patient_accuracy": np.percentile(patient, q).tolist(),
        "method": "patient bootstrap",
    }


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, patients: Sequence[str] | np.ndarray, n_classes: int
) -> dict:
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
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "per_class_recall": [None if np.isnan(v) else float(v) for v in per_class_recall(cm)],
        "calibration_error": expected_calibration_error(y_true, probs),
        "confusion_matrix": cm.tolist(),
    }
    if len(y_true):
        out["intervals"] = accuracy_intervals(y_true, y_pred, patients)
    if n_classes == 2:
        out["roc_auc"] = roc_auc(y_true, probs[:, 1] if len(probs) else [])
    return out


def by_magnification(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    patients: Sequence[str] | np.ndarray,
    mags: Sequence[int] | np.ndarray,
    n_classes: int,
) -> dict[str, dict]:
    """``classification_metrics`` for each magnification and for all of them pooled (key ``all``)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    patients, mags = np.asarray(patients), np.asarray(mags)
    out = {}
    for m in sorted(set(mags.tolist())):
        sel = mags == m
        out[mag_name(m)] = classification_metrics(y_true[sel], probs[sel], patients[sel].tolist(), n_classes)
    out["all"] = classification_metrics(y_true, probs, patients.tolist(), n_classes)
    return out


__all__ = [
    "image_accuracy",
    "patient_scores",
    "patient_accuracy",
    "patient_diagnosis_accuracy",
    "confusion_matrix",
    "per_class_recall",
    "balanced_accuracy",
    "macro_f1",
    "roc_auc",
    "expected_calibration_error",
    "wilson_interval",
    "accuracy_intervals",
    "classification_metrics",
    "by_magnification",
]
