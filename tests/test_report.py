import os
import shutil
import subprocess
from pathlib import Path

import pytest

from smse.engine import train
from smse.evaluate import evaluate_run
from smse.report import write_report
from tests.conftest import tiny_config

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium on this machine (Debian package `chromium`; .ci/run installs it)")


def report_of(synth_data, out, *overrides) -> Path:
    run = train(tiny_config(synth_data, out, *overrides), progress=False)
    evaluate_run(run, progress=False)
    return write_report(run)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [(), ("loss.metric=none", "data.magnifications=[100]", "sampler.batch_size=8")],
    ids=["full", "no-metric-one-magnification"],
)
def test_report_renders_in_chromium(synth_data, tmp_path, overrides):
    report = report_of(synth_data, tmp_path / "run", *overrides)
    assert report.exists() and (report.parent / "accuracy-by-magnification.png").exists()
    text = report.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained, no network
    browser = chromium()
    dom = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile1'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'id="selfcheck">OK:' in dom, dom[-500:]
    assert "0 broken" in dom and "0 script errors" in dom and "11 sections" in dom
    for section in (
        "results",
        "curves",
        "confusion",
        "magnification",
        "embedding",
        "retrieval",
        "calibration",
        "similarity",
        "gallery",
        "patients",
        "config",
    ):
        assert f'<section id="{section}">' in dom
    # the similarity section: the embedding beside the frozen features, and how to read a distance
    assert "SMSE embedding" in dom and "Reading a distance" in dom and "out of distribution" in dom
    # the calibration: a reliability diagram and the fitted temperature with its validation images
    assert 'alt="reliability diagram"' in dom and "was fitted on" in dom and "expected calibration error" in dom
    # counts and intervals in every accuracy cell
    assert "images / patients" in dom and "95% interval" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--window-size=1300,4000",
            f"--screenshot={shot}",
            report.as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 50_000
    keep = os.environ.get("SMSE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(
            shot, Path(keep) / f"report-{'-'.join(overrides) or 'full'}.png".replace("=", "_").replace("/", "_")
        )


@pytest.mark.slow
def test_report_for_a_manifest_without_magnifications(synth_data, tmp_path):
    """Any organ: a CSV manifest whose images have no magnification still gives a full report."""
    from smse.config import DataConfig
    from smse.data.loading import load_data

    records = load_data(DataConfig(root=str(synth_data)), split=False).records
    csv = tmp_path / "liver.csv"
    csv.write_text(
        "path,label,patient\n"
        + "".join(f"{r.path},{'tumour' if r.label == 'malignant' else 'normal'},{r.patient}\n" for r in records)
    )
    report = report_of(csv, tmp_path / "run")
    text = report.read_text()
    assert "<th>unknown</th>" in text and "<th>0X</th>" not in text and text.count("<section") == 11


@pytest.mark.slow
def test_report_for_the_eight_type_task(synth_data, tmp_path):
    report = report_of(synth_data, tmp_path / "run", "data.task=type")
    text = report.read_text()
    assert (report.parent / "confusion-second.png").exists()  # the 8 types collapsed to benign / malignant
    assert text.count("<section") == 11


@pytest.mark.slow
def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """A notebook user's backend is theirs: importing and drawing must not switch it (no pyplot state)."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg'); from pathlib import Path; import numpy as np; "
        "from smse.report import plots; from smse.wsi import slide_predict; "
        f"plots.confusion(np.eye(2, dtype=int), ['a', 'b'], ['a', 'b'], 't', Path({str(tmp_path / 'c.png')!r})); "
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "svg" and (tmp_path / "c.png").stat().st_size > 1000
