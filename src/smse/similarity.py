"""What "similar" means in an embedding: tumour-type and same-patient retrieval, spread, and a guide to distances.

Class retrieval (``smse.retrieval``) only asks whether the neighbours share the query's class; an
embedding that collapses every class to one point scores perfectly there and tells a user nothing
about the tissue. These measures ask more of it:

- ``type_retrieval``: are the nearest references of the query's *tumour type* (precision@k, mAP@R),
  among all references and within the query's own class, the query's patient excluded;
- ``same_patient_retrieval``: among the images at *other magnifications*, is the query's own patient
  found first (hit@k, mAP@R): the magnification-independence of one patient's tissue;
- ``embedding_spread``: the share of variance on the first principal axis, the effective rank and
  the distribution of pairwise distances (a collapsed embedding has one axis and two distances);
- ``distance_guide``: the distances between references of the same type, the same class and other
  classes, and the out-of-distribution threshold that flags a query whose ``OOD_K``-th nearest reference
  is farther than references usually are from their own ``OOD_K``-th nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from smse.retrieval import average_precision_at_r, ranked_scores, search, summarize_scores

#: quantiles reported for distance distributions
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: a query is out of distribution when its ``OOD_K``-th nearest reference is farther than this quantile of the
#: references' own ``OOD_K``-th nearest-neighbour distances (each among the references of other patients);
#: the k-th rather than the first neighbour, as in Sun et al. 2022 (deep nearest neighbours for OOD): on a unit
#: sphere a blank or foreign image can land next to one reference, rarely next to five
OOD_QUANTILE = 0.95
OOD_K = 5
#: distance guides are computed on at most this many references (a seeded sample): O(n^2) distances
GUIDE_SAMPLE = 2000


def type_retrieval_per_query(
    q_emb: np.ndarray,
    q_types: Sequence[str] | np.ndarray,
    q_labels: Sequence[str] | np.ndarray,
    q_patients: Sequence[str] | np.ndarray,
    g_emb: np.ndarray,
    g_types: Sequence[str] | np.ndarray,
    g_labels: Sequence[str] | np.ndarray,
    g_patients: Sequence[str] | np.ndarray,
    k: int = 5,
    backend: str = "torch",
) -> dict[str, dict[str, np.ndarray]]:
    """``type_retrieval``'s values for each query (``precision``, ``ap``, ``chance`` arrays; NaN where skipped),
    for intervals by resampling patients."""
    q_types, q_labels, q_patients = (np.asarray(a, dtype=str) for a in (q_types, q_labels, q_patients))
    g_types, g_labels, g_patients = (np.asarray(a, dtype=str) for a in (g_types, g_labels, g_patients))
    if len(q_emb) == 0 or len(g_emb) == 0:
        empty = {key: np.full(len(q_emb), np.nan) for key in ("precision", "ap", "chance")}
        return {"all": empty, "within_class": {key: v.copy() for key, v in empty.items()}}
    _, order = search(q_emb, g_emb, len(g_emb), backend)

    def relevant(q, ranked):
        return g_types[ranked] == q_types[q]

    return {
        "all": ranked_scores(order, relevant, lambda q, r: g_patients[r] != q_patients[q], k),
        "within_class": ranked_scores(
            order, relevant, lambda q, r: (g_patients[r] != q_patients[q]) & (g_labels[r] == q_labels[q]), k
        ),
    }


def type_retrieval(
    q_emb: np.ndarray,
    q_types: Sequence[str] | np.ndarray,
    q_labels: Sequence[str] | np.ndarray,
    q_patients: Sequence[str] | np.ndarray,
    g_emb: np.ndarray,
    g_types: Sequence[str] | np.ndarray,
    g_labels: Sequence[str] | np.ndarray,
    g_patients: Sequence[str] | np.ndarray,
    k: int = 5,
    backend: str = "torch",
) -> dict[str, dict[str, float]]:
    """Tumour-type retrieval of queries against a gallery (squared L2), the query's patient excluded.

    Returns:
        ``all``: relevant = same tumour type, ranked among every gallery item; ``within_class``: the
        same, ranked among the gallery items of the query's class only (does the embedding keep the
        types apart inside a class?). Each: ``precision_at_{k}``, ``map_at_r``, ``chance_precision`` (the
        expected precision of a random ranking), ``queries``, ``skipped`` (queries whose type has no gallery
        item of another patient).
    """
    per = type_retrieval_per_query(
        q_emb, q_types, q_labels, q_patients, g_emb, g_types, g_labels, g_patients, k, backend
    )
    return {part: summarize_scores(values, k) for part, values in per.items()}


def same_patient_retrieval(
    emb: np.ndarray,
    patients: Sequence[str] | np.ndarray,
    mags: Sequence[int] | np.ndarray,
    k: int = 5,
    backend: str = "torch",
) -> dict[str, float]:
    """Each image against the images at *other* magnifications (every patient): is its own patient found?

    Returns:
        ``hit_at_{k}`` (share of queries with an image of their patient among the k nearest),
        ``precision_at_1``, ``map_at_r`` (relevant = same patient), ``queries`` (images whose patient
        has an image at another magnification) and ``chance_hit_at_{k}`` (the hit rate of a random
        ranking, averaged over the queries).
    """
    patients, mags = np.asarray(patients, dtype=str), np.asarray(mags)
    nan = float("nan")
    if len(emb) < 2:
        return {f"hit_at_{k}": nan, "precision_at_1": nan, "map_at_r": nan, "queries": 0, f"chance_hit_at_{k}": nan}
    _, order = search(emb, emb, len(emb), backend)
    hits, p1, aps, chance = [], [], [], []
    for q in range(len(emb)):
        ranked = order[q][mags[order[q]] != mags[q]]
        rel = patients[ranked] == patients[q]
        r, n = int(rel.sum()), len(ranked)
        if r == 0:
            continue
        hits.append(float(rel[:k].any()))
        p1.append(float(rel[0]))
        aps.append(average_precision_at_r(rel, r))
        kk = min(k, n)  # P(no relevant among kk drawn without replacement)
        miss = np.prod([(n - r - i) / (n - i) for i in range(kk)]) if n - r >= kk else 0.0
        chance.append(1.0 - miss)

    def mean(v: list[float]) -> float:
        return float(np.mean(v)) if v else nan

    return {
        f"hit_at_{k}": mean(hits),
        "precision_at_1": mean(p1),
        "map_at_r": mean(aps),
        "queries": len(hits),
        f"chance_hit_at_{k}": mean(chance),
    }


def pairwise_distances(emb: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [N, N] (float64; never negative): the distances ``search`` ranks by and
    that ``smse predict``, the page and ``ReferenceIndex`` report."""
    e = np.asarray(emb, dtype=np.float64)
    sq = (e * e).sum(1)
    return np.clip(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, 0.0, None)


def embedding_spread(emb: np.ndarray) -> dict:
    """How an embedding fills its space.

    Returns:
        ``first_axis_share``: the share of the total variance on the first principal axis (near 1:
        everything lies on one line, e.g. one point per class of two); ``effective_rank``: the
        exponential of the entropy of the principal axes' shares of the variance (the entropy effective
        rank of Roy & Vetterli 2007, on the covariance's spectrum; 1 for a line, d for an isotropic cloud);
        ``distance_quantiles``: the 5/25/50/75/95% quantiles of the pairwise squared Euclidean distances (the unit
        every distance the tool shows is in; of at most ``GUIDE_SAMPLE`` images); ``images``.
    """
    e = np.asarray(emb, dtype=np.float64)
    if len(e) < 2:
        return {
            "first_axis_share": float("nan"),
            "effective_rank": float("nan"),
            "distance_quantiles": [float("nan")] * len(QUANTILES),
            "images": len(e),
        }
    s = np.linalg.svd(e - e.mean(0), compute_uv=False)
    var = s**2
    share = float(var[0] / var.sum()) if var.sum() > 0 else float("nan")
    p = var[var > 0] / var.sum() if var.sum() > 0 else np.ones(1)
    sample = e[_sample(len(e), GUIDE_SAMPLE, 0)]  # O(n^2) distances: a seeded sample of large sets
    d = pairwise_distances(sample)[np.triu_indices(len(sample), 1)]
    return {
        "first_axis_share": share,
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "distance_quantiles": _quantiles(d),
        "images": len(e),
    }


def _sample(n: int, size: int, seed: int) -> npt.NDArray[np.intp]:
    return np.arange(n) if n <= size else np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def distance_guide(
    emb: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    types: Sequence[str] | np.ndarray,
    patients: Sequence[str] | np.ndarray,
    seed: int = 0,
    sample: int = GUIDE_SAMPLE,
) -> dict:
    """A guide to reading distances between a query and the references, from the references themselves.

    Distances are squared Euclidean, as ``search`` reports them. Pairs are of references of *different*
    patients (a patient's own images are not the question); references without a patient id (empty)
    count as one patient each.

    Returns:
        ``same_type``, ``same_class`` (same class, another tumour type) and ``other_class``: each the
        ``quantiles`` (5/25/50/75/95%) of the pair distances and the number of ``pairs`` (empty
        quantiles where there is no pair); ``nearest``: the quantiles of each reference's distance to
        its ``OOD_K``-th nearest reference of another patient (``ood_k``); ``ood_threshold``: the
        ``OOD_QUANTILE`` quantile of those, beyond which a query's ``OOD_K``-th nearest reference makes it
        out of distribution (None with fewer than two patients);
        ``references``: how many were used.
    """
    labels, types, patients = (np.asarray(a, dtype=str) for a in (labels, types, patients))
    keep = _sample(len(emb), sample, seed)
    e, labels, types, patients = np.asarray(emb)[keep], labels[keep], types[keep], patients[keep]
    d = pairwise_distances(e)
    other_patient = (patients[:, None] != patients[None, :]) | (patients[:, None] == "")
    np.fill_diagonal(other_patient, False)
    upper = np.triu(np.ones_like(other_patient), 1) & other_patient
    same_class = labels[:, None] == labels[None, :]
    same_type = (types[:, None] == types[None, :]) & same_class

    def part(values):
        return {"quantiles": _quantiles(values) if len(values) else [], "pairs": int(len(values))}

    k = min(OOD_K, len(e) - 1)
    kth = np.partition(np.where(other_patient, d, np.inf), k - 1, axis=1)[:, k - 1] if k >= 1 else np.zeros(0)
    nearest = kth[np.isfinite(kth)]
    return {
        "same_type": part(d[upper & same_type]),
        "same_class": part(d[upper & same_class & ~same_type]),
        "other_class": part(d[upper & ~same_class]),
        "references": int(len(e)),
        "nearest": part(nearest),
        "ood_k": OOD_K,
        "ood_threshold": float(np.quantile(nearest, OOD_QUANTILE)) if len(nearest) else None,
    }


def _quantiles(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.quantile(values, QUANTILES)]


__all__ = [
    "OOD_QUANTILE",
    "OOD_K",
    "type_retrieval_per_query",
    "type_retrieval",
    "same_patient_retrieval",
    "pairwise_distances",
    "embedding_spread",
    "distance_guide",
]
