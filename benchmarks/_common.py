"""Shared helpers of the benchmark scripts: data sets, timing, machine description."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "breakhis-sample"
OUT = ROOT / "benchmarks" / "out"


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}"
    )


def synthetic_set(patients: int = 32, images_per_mag: int = 12, seed: int = 0, size=(192, 128)) -> Path:
    """The demo's synthetic set under benchmarks/out (generated once)."""
    from smse.synth import generate

    root = OUT / f"synth-p{patients}-k{images_per_mag}-s{seed}-{size[0]}x{size[1]}"
    if not (root / "smse-synth.json").exists():
        generate(root, patients=patients, seed=seed, size=size, images_per_mag=images_per_mag)
    return root


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
