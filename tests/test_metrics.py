"""Every metric on hand-built cases, and against plain loops or scikit-learn."""

import math

import numpy as np
import pytest

from smse.metrics import (
    balanced_accuracy,
    by_magnification,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    image_accuracy,
    macro_f1,
    patient_accuracy,
    patient_diagnosis_accuracy,
    patient_scores,
    per_class_recall,
    roc_auc,
)
from smse.retrieval import (
    average_precision_at_r,
    cross_magnification_matrix,
    faiss_available,
    knn_predict,
    magnification_probe,
    retrieval_scores,
    search,
)

# patient A: 3 images, 2 right; patient B: 1 image, right; patient C: 2 images, 0 right
Y = [0, 0, 0, 1, 1, 1]
P = [0, 1, 0, 1, 0, 0]
PAT = ["A", "A", "A", "B", "C", "C"]


def test_image_and_patient_level_accuracy_by_hand():
    assert image_accuracy(Y, P) == pytest.approx(3 / 6)
    assert patient_scores(Y, P, PAT) == {"A": pytest.approx(2 / 3), "B": 1.0, "C": 0.0}
    assert patient_accuracy(Y, P, PAT) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert patient_diagnosis_accuracy(Y, P, PAT) == pytest.approx(2 / 3)  # A right, B right, C wrong


def test_confusion_recall_balanced_f1_by_hand():
    cm = confusion_matrix(Y, P, 2)
    assert cm.tolist() == [[2, 1], [2, 1]]
    assert confusion_matrix([0, 0], [0, 0], 3).tolist() == [[2, 0, 0], [0, 0, 0], [0, 0, 0]]  # absent classes kept
    assert per_class_recall(cm).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert balanced_accuracy(Y, P) == pytest.approx(0.5)
    f1_0 = 2 * 2 / (2 * 2 + 2 + 1)
    f1_1 = 2 * 1 / (2 * 1 + 1 + 2)
    assert macro_f1(Y, P) == pytest.approx((f1_0 + f1_1) / 2)


def loop_auc(y, s):
    """P(score of a positive > score of a negative), ties counting 1/2, by a double loop."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metrics_match_loops(dtype):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))
    recalls = [np.mean([b == c for a, b in zip(y, p) if a == c]) for c in range(3)]
    assert balanced_accuracy(y, p) == pytest.approx(np.mean(recalls))
    f1 = []
    for c in range(3):
        tp = sum(a == c and b == c for a, b in zip(y, p))
        fp = sum(a != c and b == c for a, b in zip(y, p))
        fn = sum(a == c and b != c for a, b in zip(y, p))
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert macro_f1(y, p) == pytest.approx(np.mean(f1))
    yb = rng.integers(0, 2, 300)
    s = (rng.random(300) + 0.4 * yb).astype(dtype)
    s[:40] = np.round(s[:40], 1)  # ties
    assert roc_auc(yb, s) == pytest.approx(loop_auc(yb.tolist(), s.tolist()), rel=1e-6)


def test_roc_auc_by_hand():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_calibration_error_matches_loop(dtype):
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.05, 0.95]], dtype=dtype)
    y = [0, 1, 1, 0, 1]
    bins = 5
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(5) if lo < float(probs[i].max()) <= hi]
        if members:
            acc = sum(int(probs[i].argmax() == y[i]) for i in members) / len(members)
            conf = sum(float(probs[i].max()) for i in members) / len(members)
            total += len(members) / 5 * abs(acc - conf)
    assert expected_calibration_error(y, probs, bins=bins) == pytest.approx(total, rel=1e-5)


def test_by_magnification_pools_and_splits():
    probs = np.eye(2)[P]
    out = by_magnification(Y, probs, PAT, [40, 40, 100, 100, 40, 100], 2)
    assert list(out) == ["40X", "100X", "all"]
    assert out["all"]["image_accuracy"] == pytest.approx(0.5)
    assert out["40X"]["images"] == 3 and out["40X"]["image_accuracy"] == pytest.approx(1 / 3)
    full = classification_metrics(Y, probs, PAT, 2)
    assert full["confusion_matrix"] == [[2, 1], [2, 1]] and "roc_auc" in full


def test_search_torch_and_faiss_agree():
    rng = np.random.default_rng(0)
    refs, queries = rng.normal(size=(500, 8)), rng.normal(size=(20, 8))
    d, i = search(queries, refs, 5, "torch")
    brute = ((queries[:, None, :] - refs[None]) ** 2).sum(-1)
    assert (i == np.argsort(brute, axis=1)[:, :5]).all()
    assert np.allclose(d, np.sort(brute, axis=1)[:, :5], atol=1e-4)
    if faiss_available():
        df, fi = search(queries, refs, 5, "faiss")
        assert (fi == i).all() and np.allclose(df, d, atol=1e-4)


def test_knn_votes_by_hand():
    refs = np.array([[0.0], [0.1], [0.2], [5.0], [5.1]])
    labels = [0, 0, 1, 1, 1]
    probs = knn_predict(np.array([[0.05], [5.05]]), refs, labels, 2, k=3)
    assert probs.tolist() == [[2 / 3, 1 / 3], [0.0, 1.0]]


def test_average_precision_at_r_by_hand():
    # relevant at ranks 1 and 3 of R = 2: (1/1 + 0) / 2 over the first R ranks
    assert average_precision_at_r(np.array([True, False, True, False]), 2) == pytest.approx(0.5)
    assert average_precision_at_r(np.array([True, True, False]), 2) == pytest.approx(1.0)


def test_retrieval_excludes_same_patient_and_matrix_shape():
    emb = np.array([[0.0, 0], [0.1, 0], [5, 5], [5.1, 5], [0.2, 0.1], [5.2, 5.1]])
    labels = np.array([0, 0, 1, 1, 0, 1])
    patients = np.array(["a", "a", "b", "b", "c", "d"])
    mags = np.array([40, 100, 40, 100, 100, 40])
    s = retrieval_scores(emb[:1], labels[:1], patients[:1], emb[1:], labels[1:], patients[1:])
    assert s["precision_at_1"] == 1.0 and s["queries"] == 1
    m = cross_magnification_matrix(emb, labels, patients, mags)
    assert m["magnifications"] == ["40X", "100X"]
    assert np.array(m["map_at_r"]).shape == (2, 2)


def test_magnification_probe_sees_magnification_when_it_is_there():
    rng = np.random.default_rng(0)
    mags = np.repeat([40, 100, 200, 400], 30)
    patients = np.tile(np.arange(10), 12).astype(str)
    leaky = rng.normal(size=(120, 4)) + (mags[:, None] / 100.0)
    blind = rng.normal(size=(120, 4))
    hi, lo = magnification_probe(leaky, mags, patients), magnification_probe(blind, mags, patients)
    assert hi["chance"] == pytest.approx(0.25)
    assert hi["accuracy"] > 0.6 and lo["accuracy"] < 0.45
    # unequal magnifications (84% at 100X): the majority rate is a poor chance; balanced accuracy reads right
    mags = np.array([100] * 100 + [40] * 6 + [200] * 7 + [400] * 6)
    patients = (np.arange(len(mags)) % 10).astype(str)
    skewed = magnification_probe(rng.normal(size=(len(mags), 4)), mags, patients.astype(str))
    assert skewed["chance"] == pytest.approx(100 / 119) and skewed["balanced_chance"] == 0.25
    assert skewed["smallest"] == 6 and skewed["images"] == 119
    assert skewed["balanced_accuracy"] < 0.45 < skewed["accuracy"]  # blind, however high the plain accuracy


@pytest.mark.parametrize("successes, n", [(0, 5), (3, 4), (7, 10), (10, 10), (45, 120)])
def test_wilson_interval_by_its_formula(successes, n):
    from smse.metrics import wilson_interval

    z = 1.959963984540054
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(max(0, centre - half)) and hi == pytest.approx(min(1, centre + half))
    assert lo <= p <= hi


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_patient_bootstrap_intervals_match_a_loop(dtype):
    from smse.metrics import accuracy_intervals

    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(7)], [3, 5, 1, 8, 2, 4, 6])
    y = rng.integers(0, 2, len(patients))
    pred = np.where(rng.random(len(patients)) < 0.7, y, 1 - y).astype(dtype).astype(int)
    got = accuracy_intervals(y, pred, patients, draws=200, seed=3)
    ids = np.unique(patients)
    pick = np.random.default_rng(3).integers(0, len(ids), size=(200, len(ids)))  # the same draws
    image, patient = [], []
    for draw in pick:
        rows = [j for i in draw for j in range(len(patients)) if patients[j] == ids[i]]
        image.append(np.mean([y[j] == pred[j] for j in rows]))
        patient.append(
            np.mean([np.mean([y[j] == pred[j] for j in range(len(patients)) if patients[j] == ids[i]]) for i in draw])
        )
    assert got["method"] == "patient bootstrap"
    assert got["image_accuracy"] == pytest.approx(np.percentile(image, [2.5, 97.5]).tolist())
    assert got["patient_accuracy"] == pytest.approx(np.percentile(patient, [2.5, 97.5]).tolist())
    one = accuracy_intervals([1, 1, 0], [1, 1, 1], ["a", "a", "a"])
    assert one["method"] == "Wilson" and one["image_accuracy"][0] < 2 / 3 < one["image_accuracy"][1]


def test_results_table_shows_intervals_counts_and_marks_few_patients():
    from smse.tables import results_table

    y = [0, 0, 1, 1, 1, 0, 1, 0]
    probs = np.eye(2)[[0, 1, 1, 1, 0, 0, 1, 0]]
    pats = ["a", "a", "b", "b", "c", "c", "d", "d"]
    mags = [40, 40, 40, 40, 100, 100, 100, 100]
    table = results_table({"model": by_magnification(y, probs, pats, mags, 2)})
    rows = {
        line.split("|")[2].strip() if line.split("|")[1].strip() != "n" else "n": line
        for line in table.splitlines()[2:]
    }
    assert "[" in rows["patient"] and rows["n"].split("|")[3].strip() == "4 / 2"
    assert rows["patient"].split("|")[3].strip().endswith("*")  # 40X: two patients, marked
    assert rows["n"].split("|")[-2].strip() == "8 / 4"
