"""The served page's numbers stand with their counts and 95% intervals, and its probabilities say how far to trust
them: ``GET /api/about`` (test accuracy, calibration), ``calibration`` in every prediction, and the page in Chromium."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import smse
from smse.serve import Service, create_app
from smse.serve.service import evaluation_of, finite
from tests.conftest import tiny_config
from tests.test_serve import serving, split_paths

INTERVAL = re.compile(r"\d+(\.\d)?% \[\d+(\.\d)?%, \d+(\.\d)?%\]")  # "45.8% [27.1%, 62.5%]"


@pytest.fixture(scope="module")
def evaluated(synth_data, tmp_path_factory):
    """A tiny run with validation patients (so a fitted temperature), trained and evaluated."""
    return smse.train(tiny_config(synth_data, tmp_path_factory.mktemp("numbers") / "run"), evaluate=True)


@pytest.fixture(scope="module")
def bare(synth_data, tmp_path_factory):
    """A tiny run without validation patients (T = 1), not evaluated."""
    cfg = tiny_config(synth_data, tmp_path_factory.mktemp("numbers") / "bare", "data.split.val_fraction=0")
    return smse.train(cfg, evaluate=False)


def client_of(run) -> TestClient:
    return TestClient(create_app(service=Service.from_run(run.path)), base_url="http://127.0.0.1")


def predict(client, path: Path) -> dict:
    answer = client.post("/api/predict", files=[("images", (path.name, path.read_bytes(), "image/png"))])
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_about_gives_the_test_accuracy_with_n_and_intervals_and_the_calibration(evaluated):
    """Catches: the page's accuracy without its n or interval, numbers that disagree with eval/metrics.json, a
    calibration that does not say what T was fitted on."""
    client = client_of(evaluated)
    about = client.get("/api/about").json()
    metrics = json.loads((evaluated.path / "eval" / "metrics.json").read_text())
    summary = json.loads((evaluated.path / "run.json").read_text())["calibration"]
    ev = about["evaluation"]
    head, knn = metrics["head"]["all"], metrics["knn"]["all"]
    assert about["evaluation_note"] is None and about["run"] == str(evaluated.path)
    assert (ev["images"], ev["patients"]) == (head["images"], head["patients"]) == (48, 4)
    assert ev["confidence"] == 0.95 and ev["checkpoint"] == "best" and ev["knn"]["k"] == metrics["knn_k"]
    for got, want in ((ev["head"], head), (ev["knn"], knn)):
        assert got["interval_method"] == want["intervals"]["method"] == "patient bootstrap"
        for level in ("image_accuracy", "patient_accuracy"):
            low, high = got[level]["interval"]
            assert got[level]["value"] == want[level] and [low, high] == want["intervals"][level]
            assert low <= got[level]["value"] <= high
    cal = about["calibration"]
    val_rows = [r for r in (evaluated.path / "split.csv").read_text().splitlines()[1:] if r.rstrip().endswith(",val")]
    assert cal["calibrated"] and cal["reason"] == "fitted"
    assert cal["temperature"] == pytest.approx(summary["temperature"], rel=1e-6) and cal["temperature"] != 1
    assert cal["validation"]["images"] == summary["val_images"] == len(val_rows) > 0
    assert cal["validation"]["patients"] == len({r.split(",")[3] for r in val_rows})
    assert cal["validation"]["ece_before"] == summary["val_ece_before"]
    assert cal["text"].startswith(
        f"Probabilities calibrated by temperature scaling: T = {cal['temperature']:.2f}, fitted on "
        f"{len(val_rows)} validation images of {cal['validation']['patients']} patients"
    )
    test_cal = ev["calibration"]
    assert test_cal["images"] == 48 and test_cal["ece"] == metrics["calibration"]["ece"]
    for key in ("reliability", "reliability_uncalibrated"):
        assert sum(test_cal[key]["count"]) == 48 and len(test_cal[key]["edges"]) == len(test_cal[key]["count"]) + 1
    # every prediction carries the same calibration, and the out-of-distribution flags reach the client
    answer = predict(client, split_paths(evaluated, "test")[0])
    assert answer["calibration"] == cal
    assert isinstance(answer["images"][0]["out_of_distribution"], bool)
    assert answer["case"]["out_of_distribution"] in (0, 1)


def test_a_run_without_evaluation_or_validation_patients_says_so(bare):
    """Catches: T = 1 shown as a calibration, or a run without eval/metrics.json answered with NaN or an error."""
    client = client_of(bare)
    body = client.get("/api/about")
    assert body.status_code == 200 and "NaN" not in body.text
    about = body.json()
    assert about["evaluation"] is None and about["evaluation_note"].startswith("This run has not been evaluated yet")
    cal = about["calibration"]
    assert not cal["calibrated"] and cal["temperature"] == 1 and cal["reason"] == "no_validation_patients"
    assert cal["text"] == "Probabilities not calibrated: the run had no validation patients (T = 1)."
    assert predict(client, split_paths(bare, "test")[0])["calibration"] == cal


def test_unmeasured_values_are_null_and_other_checkpoints_are_named(evaluated, tmp_path):
    """Catches: a NaN interval (no images) breaking the JSON answer, and the test results of another epoch shown as
    the served model's without a word."""
    assert finite({"a": [math.nan, 1.0, math.inf], "b": "x"}) == {"a": [None, 1.0, None], "b": "x"}
    service = Service.from_run(evaluated.path)
    metrics = json.loads((evaluated.path / "eval" / "metrics.json").read_text())
    metrics["head"]["all"]["intervals"]["image_accuracy"] = [math.nan, math.nan]
    metrics["epoch"] += 1
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))  # writes NaN, as json.dumps does
    evaluation, note = evaluation_of(service.model, tmp_path)
    assert evaluation is not None and evaluation["head"]["image_accuracy"]["interval"] == [None, None]
    assert note is not None and note.startswith(
        f"These test results are of the best checkpoint of epoch {metrics['epoch']}"
    )
    json.dumps(evaluation, allow_nan=False)
    assert evaluation_of(service.model, tmp_path / "nowhere")[1].startswith("This run has not been evaluated yet")


def page_text(run, tmp_path: Path, name: str) -> dict:
    """Serve ``run``, load the page in Chromium, analyse one test image; what the page shows."""
    from tests.cdp import Chromium
    from tests.test_report import chromium

    browser = chromium()
    service = Service.from_run(run.path)
    with (
        serving(create_app(service=service)) as url,
        Chromium(browser, url + "/", tmp_path / f"profile-{name}") as page,
    ):
        page.wait_for("document.body?.dataset.state === 'ready' && !document.querySelector('#about-body.placeholder')")
        page.set_files("#file-input", [split_paths(run, "test")[0]])
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "done", page.evaluate("document.getElementById('status').textContent")
        seen = page.evaluate("""({
            body: document.body.innerText,
            vote: document.querySelector('#case-body .vote').textContent,
            caseCalibration: document.querySelector('#case-body .calib')?.textContent || '',
            imageVote: document.querySelector('.result .query-text .vote')?.textContent || '',
            imageCalibration: document.querySelector('.result .query-text .calib')?.textContent || '',
            about: document.getElementById('about').innerText,
            accuracy: [...document.querySelectorAll('#about table.accuracy td')].map(e => e.textContent),
            heads: [...document.querySelectorAll('#about table.accuracy thead th')].map(e => e.textContent),
            diagram: document.querySelectorAll('#about figure svg#reliability circle').length,
            caption: document.querySelector('#about figure figcaption')?.textContent || ''})""")
        shot = page.screenshot(tmp_path / f"page-numbers-{name}.png")
        errors = page.errors()
    assert errors == []
    keep = os.environ.get("SMSE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    return seen


@pytest.mark.slow
def test_the_page_shows_counts_intervals_and_the_reliability_diagram(evaluated, tmp_path):
    """Catches: a vote without its total, an accuracy without n or interval, probabilities without their
    calibration, no reliability diagram, or "null" / "NaN" where a value is missing."""
    seen = page_text(evaluated, tmp_path, "evaluated")
    for word in ("null", "NaN", "undefined", "[object"):
        assert word not in seen["body"], word
    assert re.search(r"\(5 neighbours\): \w+ \d of 5", seen["vote"]), seen["vote"]
    assert "(the 5 nearest references of the image)" in seen["vote"]
    assert re.fullmatch(r"Its 5 nearest references: \w+ \d of 5(, \w+ \d of 5)?", seen["imageVote"]), seen
    assert seen["caseCalibration"].startswith("Probabilities calibrated by temperature scaling: T = ")
    assert re.match(r"Calibrated: T = \d\.\d\d, fitted on \d+ validation images\.", seen["imageCalibration"]), seen
    assert seen["heads"][1:] == ["patient level (n = 4 patients)", "image level (n = 48 images)"]
    assert len(seen["accuracy"]) == 4 and all(INTERVAL.fullmatch(cell) for cell in seen["accuracy"]), seen
    assert (
        "95% interval (patient bootstrap" in seen["about"] and "Test set: n = 48 images of 4 patients" in seen["about"]
    )
    assert "expected calibration error" in seen["about"] and "before," in seen["about"]
    assert seen["diagram"] >= 2  # calibrated and uncalibrated, one point per non-empty bin at least
    assert seen["caption"].startswith("Reliability diagram on the n = 48 test images: accuracy against confidence")


@pytest.mark.slow
def test_the_page_of_an_unevaluated_run_without_validation_says_so_plainly(bare, tmp_path):
    """Catches: a run without eval/metrics.json shown as empty cells or "null", T = 1 passed off as calibrated."""
    seen = page_text(bare, tmp_path, "bare")
    for word in ("null", "NaN", "undefined", "[object"):
        assert word not in seen["body"], word
    assert seen["caseCalibration"].startswith(
        "Probabilities not calibrated: the run had no validation patients (T = 1)."
    )
    assert seen["imageCalibration"].startswith("Not calibrated: the run had no validation patients (T = 1).")
    assert "This run has not been evaluated yet (no eval/metrics.json)" in seen["about"]
    assert seen["accuracy"] == [] and seen["diagram"] == 0 and seen["caption"] == ""
    assert re.search(r"\(5 neighbours\): \w+ \d of 5", seen["vote"]), seen["vote"]
