"""Probabilities that mean what they say: temperature scaling fitted on validation patients, and its diagnostics.

Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017) divides the
logits by one scalar T, chosen to minimise the negative log-likelihood of held-out images; it changes
no prediction (the argmax is the same), only how confident the probabilities are. ``reliability``
gives the reliability diagram's bins (confidence against accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from smse.metrics import expected_calibration_error

#: the search range of T
T_MIN, T_MAX = 0.05, 20.0


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, targets: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature)."""
    logp = _log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(logp)), np.asarray(targets)].mean())


def fit_temperature(logits: np.ndarray, targets: Sequence[int]) -> float:
    """The T in [T_MIN, T_MAX] minimising ``nll`` (bounded search over log T); 1 for no images."""
    from scipy.optimize import minimize_scalar

    if len(logits) == 0:
        return 1.0
    result = minimize_scalar(
        lambda log_t: nll(logits, targets, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(result.x))


def rescale(probs: np.ndarray, factor: float) -> np.ndarray:
    """softmax(log(probs) / factor): probabilities of logits divided by ``factor`` more."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))
    return np.exp(_log_softmax(logp / factor))


def reliability(targets: Sequence[int], probs: np.ndarray, bins: int = 10) -> dict:
    """Reliability diagram bins by confidence (the max probability): ``edges``, and per bin the mean
    ``confidence``, the ``accuracy`` and the ``count`` (None where a bin is empty)."""
    probs = np.asarray(probs, dtype=float)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    right = probs.argmax(axis=1) == np.asarray(targets) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        m = idx == b
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else None)
        out["accuracy"].append(float(right[m].mean()) if m.any() else None)
    return out


def calibration_report(targets: Sequence[int], probs: np.ndarray, temperature: float) -> dict:
    """The calibrated ``probs`` (made with ``temperature``) against the same model uncalibrated (T = 1)."""
    raw = rescale(probs, 1.0 / temperature)
    return {
        "temperature": float(temperature),
        "images": int(len(probs)),
        "ece": expected_calibration_error(targets, probs),
        "ece_uncalibrated": expected_calibration_error(targets, raw),
        "reliability": reliability(targets, probs),
        "reliability_uncalibrated": reliability(targets, raw),
    }


__all__ = ["calibration_report", "fit_temperature", "nll", "reliability", "rescale"]
