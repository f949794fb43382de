"""Temperature scaling against plain loops, and a run whose probabilities it calibrates."""

import math

import numpy as np
import pytest

from smse.calibration import calibration_report, fit_temperature, nll, reliability, rescale


def loop_nll(logits, targets, t):
    total = 0.0
    for row, y in zip(logits, targets):
        z = [float(v) / t for v in row]
        m = max(z)
        total -= z[y] - m - math.log(sum(math.exp(v - m) for v in z))
    return total / len(targets)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nll_and_the_fitted_temperature_match_a_loop(dtype):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    logits = (rng.normal(size=(200, 3)) + 2.5 * np.eye(3)[targets]) * 4.0  # right mostly, far too confident
    logits[:40] = rng.normal(size=(40, 3)) * 4.0  # and sometimes confidently wrong
    logits = logits.astype(dtype)
    assert nll(logits, targets, 1.7) == pytest.approx(loop_nll(logits, targets, 1.7), rel=1e-6)
    t = fit_temperature(logits, targets)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    best = grid[np.argmin([loop_nll(logits, targets, g) for g in grid])]
    assert t == pytest.approx(best, rel=0.01) and t > 1.5  # overconfident logits are cooled
    assert loop_nll(logits, targets, t) < loop_nll(logits, targets, 1.0)


def test_rescale_and_reliability_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    # softmax(log p / T): T = 1 is the identity; T -> large flattens
    np.testing.assert_allclose(rescale(probs, 1.0), probs, atol=1e-9)
    flat = rescale(probs, 2.0)
    np.testing.assert_allclose(flat[0], np.sqrt([0.9, 0.1]) / np.sqrt([0.9, 0.1]).sum(), atol=1e-9)
    r = reliability([0, 1, 1], probs, bins=5)
    # bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]: confidences 0.9 (right), 0.6 (wrong), 0.8 (right)
    assert r["count"] == [0, 0, 1, 1, 1] and r["accuracy"][4] == 1.0 and r["confidence"][4] == pytest.approx(0.9)
    assert r["accuracy"][2] == 0.0 and r["accuracy"][3] == 1.0 and r["confidence"][0] is None
    report = calibration_report([0, 1, 1], flat, 2.0)  # probabilities made with T = 2: T = 1 gives ``probs`` back
    assert report["ece_uncalibrated"] == pytest.approx(calibration_report([0, 1, 1], probs, 1.0)["ece"])


@pytest.mark.slow
def test_a_run_with_validation_patients_is_calibrated_and_says_so(synth_data, tmp_path):
    import json

    import torch

    from smse.checkpoint import load_checkpoint
    from smse.engine import train
    from smse.evaluate import evaluate_run
    from tests.conftest import tiny_config

    run = train(tiny_config(synth_data, tmp_path / "run", "train.epochs=4"), progress=False)
    info = json.loads((run / "run.json").read_text())["calibration"]
    model = load_checkpoint(run / "best.safetensors")[0]
    assert info["val_images"] > 0 and float(model.heads.temperature) == pytest.approx(info["temperature"])
    assert info["val_ece_after"] <= info["val_ece_before"] + 0.05
    metrics = evaluate_run(run, progress=False)
    assert metrics["calibration"]["temperature"] == pytest.approx(info["temperature"])
    assert metrics["calibration"]["validation"] == info
    none = train(
        tiny_config(synth_data, tmp_path / "none", "train.epochs=2", "data.split.val_fraction=0"), progress=False
    )
    assert json.loads((none / "run.json").read_text())["calibration"] is None
    assert float(load_checkpoint(none / "best.safetensors")[0].heads.temperature) == 1.0
    assert torch.isfinite(model.heads.temperature)
