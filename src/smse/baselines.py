"""Independent baselines on frozen features, and patient-grouped folds to compare methods on real patients.

The baselines use scikit-learn only (no code of the method), so they measure what the features
alone give: a logistic regression on standardised features (``linear_probe``) and a cosine
k-nearest-neighbour vote (``knn_probe``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from smse.data.records import Record
from smse.data.splits import patient_labels

#: L2 strength of the linear probe: strong, for a few hundred images of about a thousand features.
PROBE_C = 0.1
#: the values of C that ``tuned_linear_probe`` chooses from
PROBE_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def patient_folds(
    records: Sequence[Record], k: int | None = 5, repeats: int = 1, seed: int = 0, task: str = "binary"
) -> list[list[set[str]]]:
    """Test patients of each fold, per repeat; every patient is tested once per repeat.

    Args:
        k: folds, stratified by the patients' classes (``StratifiedGroupKFold``); None for
            leave-one-patient-out (one repeat).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = patient_labels(records, task)
    patients = sorted(labels)
    if k is None:
        return [[{p} for p in patients]]
    y = [labels[p] for p in patients]
    out = []
    for r in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r)
        out.append([{patients[i] for i in test} for _, test in splitter.split(patients, y, groups=patients)])
    return out


def out_of_fold(
    probe, features: np.ndarray, y: np.ndarray, patients: Sequence[str] | np.ndarray, plan: list[list[set[str]]]
) -> list[np.ndarray]:
    """Out-of-fold probabilities of class 1 per repeat of ``plan``: each fold's probe is fit on every
    patient outside the fold (``probe``: ``linear_probe``, ``knn_probe``, ``tuned_linear_probe`` or one of their
    signature, ``probe(x_train, y_train, x_test, groups=training patients)``)."""
    patients = np.asarray(patients)
    out = []
    for fold_list in plan:
        prob = np.full(len(y), np.nan)
        for test in fold_list:
            held = np.isin(patients, list(test))
            prob[held] = probe(features[~held], y[~held], features[held], groups=patients[~held])[:, 1]
        out.append(prob)
    return out


def _fit_predict(clf, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds
        return clf.fit(x_train, y_train).predict_proba(x_test)


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    c: float = PROBE_C,
    groups: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities of a logistic regression on standardised features (columns: sorted classes);
    ``groups`` (the training patients) is the probes' common signature, unused here."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return _fit_predict(
        make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)), x_train, y_train, x_test
    )


def knn_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    k: int = 5,
    groups: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities of a cosine k-nearest-neighbour vote on standardised features (``groups`` unused)."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(k, len(x_train)), metric="cosine"))
    return _fit_predict(clf, x_train, y_train, x_test)


def choose_probe_c(
    x: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    grid: Sequence[float] = PROBE_C_GRID,
    folds: int = 4,
    seed: int = 0,
) -> float:
    """The C of ``grid`` with the best patient-grouped cross-validated score on (x, y): patient-level accuracy
    plus ROC-AUC (binary) or patient-level accuracy (more classes); the smaller C on a tie."""
    from sklearn.model_selection import StratifiedGroupKFold

    from smse.metrics import patient_accuracy, roc_auc

    y, groups = np.asarray(y), np.asarray(groups)
    ids = np.unique(groups)
    first = {g: y[groups == g][0] for g in ids}
    k = min(folds, len(ids), *np.bincount([first[g] for g in ids]).clip(min=1).tolist())
    if k < 2 or len(np.unique(y)) < 2:
        return float(grid[len(grid) // 2])
    splits = list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(ids, [first[g] for g in ids], ids))
    best, best_c = -np.inf, float(grid[0])
    for c in grid:
        scores = []
        for _, te in splits:
            held = np.isin(groups, ids[te])
            if len(np.unique(y[~held])) < len(np.unique(y)):
                continue
            prob = linear_probe(x[~held], y[~held], x[held], c)
            pred = np.unique(y[~held])[prob.argmax(1)]
            score = patient_accuracy(y[held], pred, groups[held])
            if prob.shape[1] == 2 and len(np.unique(y[held])) == 2:
                score += roc_auc(y[held] == np.unique(y[~held])[1], prob[:, 1])
            scores.append(score)
        if scores and np.mean(scores) > best + 1e-12:
            best, best_c = float(np.mean(scores)), float(c)
    return best_c


def tuned_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    grid: Sequence[float] = PROBE_C_GRID,
) -> np.ndarray:
    """``linear_probe`` with C chosen by patient-grouped cross-validation on the training patients only
    (``choose_probe_c``): the tuned probe a trained head has to beat."""
    return linear_probe(x_train, y_train, x_test, choose_probe_c(x_train, y_train, groups, grid))


__all__ = [
    "PROBE_C",
    "patient_folds",
    "out_of_fold",
    "linear_probe",
    "knn_probe",
    "choose_probe_c",
    "tuned_linear_probe",
]
