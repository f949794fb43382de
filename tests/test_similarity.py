"""The similarity measures against plain loops on tiny embeddings (float32 and float64), and by hand."""

import math

import numpy as np
import pytest

from smse.similarity import (
    OOD_K,
    OOD_QUANTILE,
    distance_guide,
    embedding_spread,
    pairwise_distances,
    same_patient_retrieval,
    type_retrieval,
)


def loop_ranking(q, gallery):
    """Gallery indices by increasing squared distance to q (ties by index), by a loop."""
    d = [sum((float(a) - float(b)) ** 2 for a, b in zip(q, g)) for g in gallery]
    return sorted(range(len(gallery)), key=lambda i: (d[i], i))


def loop_ap_at_r(rel):
    r = sum(rel)
    hits, total = 0, 0.0
    for i, x in enumerate(rel[:r]):
        if x:
            hits += 1
            total += hits / (i + 1)
    return total / r


def tiny(dtype, n=24, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 3)).astype(dtype)
    types = rng.choice(["A", "F", "DC", "LC"], n)
    labels = np.where(np.isin(types, ["A", "F"]), "benign", "malignant")
    patients = rng.choice(["p1", "p2", "p3", "p4", "p5"], n)
    mags = rng.choice([40, 100, 400], n)
    return emb, types, labels, patients, mags


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_type_retrieval_matches_a_loop(dtype):
    emb, types, labels, patients, _ = tiny(dtype)
    q, g = slice(0, 8), slice(8, None)
    got = type_retrieval(emb[q], types[q], labels[q], patients[q], emb[g], types[g], labels[g], patients[g], k=3)
    for part, within in (("all", False), ("within_class", True)):
        pk, aps, chance = [], [], []
        for i in range(8):
            order = loop_ranking(emb[i], emb[8:])
            kept = [j for j in order if patients[8 + j] != patients[i] and (not within or labels[8 + j] == labels[i])]
            rel = [bool(types[8 + j] == types[i]) for j in kept]
            if sum(rel) == 0:
                continue
            pk.append(sum(rel[:3]) / len(rel[:3]))
            aps.append(loop_ap_at_r(rel))
            chance.append(sum(rel) / len(rel))
        assert got[part]["queries"] == len(pk)
        assert got[part]["chance_precision"] == pytest.approx(np.mean(chance))
        assert got[part]["precision_at_3"] == pytest.approx(np.mean(pk), rel=1e-6)
        assert got[part]["map_at_r"] == pytest.approx(np.mean(aps), rel=1e-6)


def test_type_retrieval_by_hand():
    # query type A of patient q; gallery: the same patient's A (excluded), then F, A, DC by distance
    emb = np.array([[0.0], [0.1], [0.2], [0.3], [0.4]])
    types = ["A", "A", "F", "A", "DC"]
    labels = ["benign", "benign", "benign", "benign", "malignant"]
    patients = ["q", "q", "x", "y", "z"]
    got = type_retrieval(
        emb[:1], types[:1], labels[:1], patients[:1], emb[1:], types[1:], labels[1:], patients[1:], k=2
    )
    assert got["all"]["precision_at_2"] == pytest.approx(0.5)  # F, A
    assert got["all"]["map_at_r"] == pytest.approx(0.0)  # R = 1 and rank 1 is F
    assert got["within_class"]["precision_at_2"] == pytest.approx(0.5)  # DC is not in the benign gallery


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_patient_retrieval_matches_a_loop(dtype):
    emb, _, _, patients, mags = tiny(dtype, n=30, seed=1)
    got = same_patient_retrieval(emb, patients, mags, k=4)
    hits, p1, aps, chance = [], [], [], []
    for i in range(len(emb)):
        order = [j for j in loop_ranking(emb[i], emb) if mags[j] != mags[i]]
        rel = [bool(patients[j] == patients[i]) for j in order]
        if not any(rel):
            continue
        hits.append(float(any(rel[:4])))
        p1.append(float(rel[0]))
        aps.append(loop_ap_at_r(rel))
        n, r = len(rel), sum(rel)
        chance.append(1 - math.comb(n - r, 4) / math.comb(n, 4))
    assert got["queries"] == len(hits)
    assert got["hit_at_4"] == pytest.approx(np.mean(hits))
    assert got["precision_at_1"] == pytest.approx(np.mean(p1))
    assert got["map_at_r"] == pytest.approx(np.mean(aps), rel=1e-6)
    assert got["chance_hit_at_4"] == pytest.approx(np.mean(chance), rel=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spread_matches_a_loop_and_sees_a_collapse(dtype):
    emb, *_ = tiny(dtype, n=20)
    got = embedding_spread(emb)
    centred = emb.astype(np.float64) - emb.astype(np.float64).mean(0)
    eig = sorted(np.linalg.eigvalsh(centred.T @ centred), reverse=True)
    assert got["first_axis_share"] == pytest.approx(eig[0] / sum(eig), rel=1e-5)
    p = [max(v, 0) / sum(eig) for v in eig]
    assert got["effective_rank"] == pytest.approx(math.exp(-sum(v * math.log(v) for v in p if v > 0)), rel=1e-5)
    d = [math.dist(emb[i].tolist(), emb[j].tolist()) ** 2 for i in range(20) for j in range(i + 1, 20)]
    assert got["distance_quantiles"][2] == pytest.approx(float(np.median(d)), rel=1e-5)
    # two antipodal points per class, as a collapsed two-class embedding: one axis, effective rank ~1
    collapsed = np.repeat([[1.0, 0.0], [-1.0, 0.0]], 10, axis=0) + 1e-3 * np.random.default_rng(0).normal(size=(20, 2))
    c = embedding_spread(collapsed.astype(dtype))
    assert c["first_axis_share"] > 0.99 and c["effective_rank"] < 1.1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distance_guide_matches_a_loop(dtype):
    emb, types, labels, patients, _ = tiny(dtype, n=26, seed=2)
    got = distance_guide(emb, labels, types, patients)
    same_type, same_class, other = [], [], []
    nearest = []
    for i in range(26):
        near = []
        for j in range(26):
            if patients[i] == patients[j]:
                continue
            d = math.dist(emb[i].tolist(), emb[j].tolist()) ** 2
            near.append(d)
            if j > i:
                (same_type if types[i] == types[j] else same_class if labels[i] == labels[j] else other).append(d)
        nearest.append(sorted(near)[OOD_K - 1])  # the OOD_K-th nearest reference of another patient
    for key, values in (("same_type", same_type), ("same_class", same_class), ("other_class", other)):
        assert got[key]["pairs"] == len(values)
        assert got[key]["quantiles"] == pytest.approx(np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95]), rel=1e-5)
    assert got["ood_threshold"] == pytest.approx(np.quantile(nearest, OOD_QUANTILE), rel=1e-5)


def test_pairwise_distances_are_exact_on_the_diagonal():
    e = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32) * 1e3
    d = pairwise_distances(e)
    assert (np.diag(d) < 1e-3 * 1e3).all() and (d >= 0).all()
