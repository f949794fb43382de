"""Long steps show their progress: a line every few percent when the output is a pipe."""

import logging
import subprocess
import sys

import pytest

from smse.progress import EVERY, progress
from tests.conftest import subprocess_env

TINY_OVERRIDES = [
    "data.image_size=[32, 48]",
    "model.backbone=paper-cnn",
    "model.pretrained=false",
    "model.embedding_dim=16",
    "model.views=2",
    "sampler.batch_size=16",
    "train.device=cpu",
    "data.split.val_fraction=0.25",
]


def test_progress_logs_every_few_percent_off_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", open("/dev/null", "w"))  # not a terminal
    with caplog.at_level(logging.INFO, logger="smse.progress"):
        assert list(progress(range(100), desc="work", unit="things")) == list(range(100))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == round(1 / EVERY)
    assert lines[0].startswith("work: 5/100 things (5%)") and lines[-1].startswith("work: 100/100 things (100%)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="smse.progress"):  # weighted items: batches of images
        list(progress(["b1", "b2", "b3"], desc="embedding", unit="images", weights=[64, 64, 22]))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "embedding: 64/150 images",
        "embedding: 128/150 images",
        "embedding: 150/150 images",
    ]
    assert list(progress([1, 2], enabled=False)) == [1, 2]


@pytest.mark.slow
def test_a_training_on_a_fresh_cache_shows_progress_through_a_pipe(synth_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smse.cli",
            "train",
            "--no-evaluate",
            f"data.root={synth_data}",
            f"out={tmp_path / 'run'}",
            *TINY_OVERRIDES,
            "train.epochs=1",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(SMSE_CACHE_DIR=str(tmp_path / "cache")),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reading = [line for line in proc.stderr.splitlines() if line.startswith("reading images (full decode and hash")]
    features = [line for line in proc.stderr.splitlines() if line.startswith("backbone features: ")]
    assert len(reading) >= 10 and "(100%)" in reading[-1], proc.stderr[-2000:]
    assert len(features) == 4 and "(100%)" in features[-1] and "left" in features[-1], proc.stderr[-2000:]  # 4 batches
