"""Nearest neighbours in embedding space: torch top-k by default, faiss when installed; k-NN votes, retrieval scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from smse.data.records import mag_name
from smse.errors import ConfigError


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def search(
    queries: np.ndarray, refs: np.ndarray, k: int, backend: str = "torch", chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest references (squared L2) of each query: (distances, indices), nearest first.

    Args:
        backend: ``torch`` (exact, chunked top-k; the default, about as fast as faiss's flat
            index at the sizes measured in BENCHMARKS.md) or ``faiss`` (exact ``IndexFlatL2``).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    refs = np.ascontiguousarray(refs, dtype=np.float32)
    k = min(k, len(refs))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if backend == "faiss":
        if not faiss_available():
            raise ConfigError("retrieval backend faiss: install faiss-cpu (pip install 'smse[faiss]')")
        import faiss

        index = faiss.IndexFlatL2(refs.shape[1])
        index.add(refs)
        d, i = index.search(queries, k)
        return d, i.astype(np.int64)
    if backend != "torch":
        raise ConfigError(f"retrieval backend: unknown {backend!r} (torch or faiss)")
    r = torch.from_numpy(refs)
    r_sq = (r * r).sum(1)
    chunk = chunk or max(1, min(1024, int(64e6 // len(refs))))  # at most ~256 MB of distances at a time
    ds: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[start : start + chunk])
        d2 = (q * q).sum(1, keepdim=True) + r_sq[None, :] - 2.0 * q @ r.T
        top = torch.topk(d2.clamp_min_(0), k, dim=1, largest=False, sorted=True)
        ds.append(top.values)
        ids.append(top.indices)
    return torch.cat(ds).numpy(), torch.cat(ids).numpy().astype(np.int64)


def knn_predict(
    queries: np.ndarray,
    refs: np.ndarray,
    ref_labels: Sequence[int] | np.ndarray,
    n_classes: int,
    k: int = 5,
    backend: str = "torch",
) -> np.ndarray:
    """Class probabilities from the labels of the k nearest references (votes / k)."""
    _, idx = search(queries, refs, k, backend)
    labels = np.asarray(ref_labels)[idx]
    probs = np.zeros((len(queries), n_classes))
    for c in range(n_classes):
        probs[:, c] = (labels == c).mean(axis=1)
    return probs


def average_precision_at_r(relevant: np.ndarray, r: int) -> float:
    """AP@R of one ranked list: mean over the first R ranks of precision@i at relevant ranks."""
    if r == 0:
        return float("nan")
    rel = relevant[:r].astype(float)
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / r)


def ranked_scores(order: np.ndarray, relevant_of, keep_of, k: int = 1) -> dict[str, np.ndarray]:
    """Per query, from its gallery ranking ``order[q]`` (nearest first): precision@k, AP@R and the precision of a
    random ranking (the share of relevant items), over the gallery items ``keep_of(q, ranked)`` keeps, relevant
    where ``relevant_of(q, ranked)``; NaN for a query left with no relevant item."""
    out = {
        "precision": np.full(len(order), np.nan),
        "ap": np.full(len(order), np.nan),
        "chance": np.full(len(order), np.nan),
    }
    for q in range(len(order)):
        ranked = order[q][keep_of(q, order[q])]
        rel = relevant_of(q, ranked)
        r = int(rel.sum())
        if len(ranked) == 0 or r == 0:
            continue
        out["precision"][q] = float(rel[:k].mean())
        out["ap"][q] = average_precision_at_r(rel, r)
        out["chance"][q] = r / len(ranked)
    return out


def summarize_scores(per: dict[str, np.ndarray], k: int = 1) -> dict[str, float]:
    """The means of ``ranked_scores`` over the queries it could score, and how many it skipped."""
    valid = ~np.isnan(per["precision"])

    def mean(v: np.ndarray) -> float:
        return float(v[valid].mean()) if valid.any() else float("nan")

    return {
        f"precision_at_{k}": mean(per["precision"]),
        "map_at_r": mean(per["ap"]),
        "chance_precision": mean(per["chance"]),
        "queries": int(valid.sum()),
        "skipped": int((~valid).sum()),
    }


def retrieval_scores(
    q_emb: np.ndarray,
    q_labels: np.ndarray,
    q_patients: np.ndarray,
    g_emb: np.ndarray,
    g_labels: np.ndarray,
    g_patients: np.ndarray,
    exclude_same_patient: bool = True,
    backend: str = "torch",
) -> dict[str, float]:
    """Precision@1 and mAP@R of queries against a gallery (relevant = same class).

    Gallery items of the query's own patient are excluded by default, so a score measures
    finding similar tissue, not recognising the same slide.
    """
    if len(q_emb) == 0 or len(g_emb) == 0:
        return {"precision_at_1": float("nan"), "map_at_r": float("nan"), "queries": 0}
    _, order = search(q_emb, g_emb, len(g_emb), backend)
    per = ranked_scores(
        order,
        lambda q, ranked: g_labels[ranked] == q_labels[q],
        (lambda q, ranked: g_patients[ranked] != q_patients[q])
        if exclude_same_patient
        else (lambda q, ranked: np.ones(len(ranked), bool)),
    )
    s = summarize_scores(per)
    return {"precision_at_1": s["precision_at_1"], "map_at_r": s["map_at_r"], "queries": s["queries"]}


def cross_magnification_matrix(
    emb: np.ndarray, labels: np.ndarray, patients: np.ndarray, mags: np.ndarray, backend: str = "torch"
) -> dict:
    """Rows: query magnification; columns: gallery magnification; cells: precision@1 and mAP@R."""
    levels = sorted(set(mags.tolist()))
    p1 = np.full((len(levels), len(levels)), np.nan)
    mapr = np.full((len(levels), len(levels)), np.nan)
    for i, qm in enumerate(levels):
        for j, gm in enumerate(levels):
            q, g = mags == qm, mags == gm
            s = retrieval_scores(emb[q], labels[q], patients[q], emb[g], labels[g], patients[g], True, backend)
            p1[i, j], mapr[i, j] = s["precision_at_1"], s["map_at_r"]
    return {"magnifications": [mag_name(m) for m in levels], "precision_at_1": p1.tolist(), "map_at_r": mapr.tolist()}


def magnification_probe(
    emb: np.ndarray, mags: np.ndarray, patients: np.ndarray, folds: int = 3, seed: int = 0
) -> dict[str, float]:
    """How well a linear classifier predicts magnification from the embedding (patient-grouped CV).

    Lower accuracy (towards ``chance``, the majority share) means a more magnification-independent embedding.
    ``balanced_accuracy`` (the mean recall over magnifications; chance ``1 / levels``) is the figure to read
    where the magnifications are unequal (a sample that is 84% 100X has a majority chance of 84%);
    ``smallest`` is the image count of the rarest magnification.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    levels = sorted(set(mags.tolist()))
    chance = max((mags == m).mean() for m in levels) if len(mags) else float("nan")
    smallest = int(min((mags == m).sum() for m in levels)) if len(mags) else 0
    n_groups = len(set(patients.tolist()))
    base = {
        "chance": float(chance),
        "balanced_chance": 1.0 / max(len(levels), 1),
        "images": int(len(mags)),
        "smallest": smallest,
    }
    if len(levels) < 2 or n_groups < 2:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "folds": 0, **base}
    folds = min(folds, n_groups)
    predicted = np.empty_like(mags)
    for train, test in GroupKFold(n_splits=folds).split(emb, mags, patients):
        if len(set(mags[train].tolist())) < 2:
            predicted[test] = mags[train][0]
            continue
        scaler = StandardScaler().fit(emb[train])
        clf = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(emb[train]), mags[train])
        predicted[test] = clf.predict(scaler.transform(emb[test]))
    recall = [float((predicted[mags == m] == m).mean()) for m in levels]
    return {
        "accuracy": float((predicted == mags).mean()),
        "balanced_accuracy": float(np.mean(recall)),
        "folds": folds,
        **base,
    }


__all__ = [
    "faiss_available",
    "search",
    "knn_predict",
    "average_precision_at_r",
    "ranked_scores",
    "summarize_scores",
    "retrieval_scores",
    "cross_magnification_matrix",
    "magnification_probe",
]
