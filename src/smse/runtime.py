"""Seeding, devices, distributed set-up and version records: the process-wide concerns in one place."""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices). The only place global RNG state is set.

    ``deterministic`` also makes torch use deterministic kernels: without it, the backward pass of
    the metric losses' index gathers (a scatter-add over thousands of tuples) sums in an order that
    changes from one process to the next, so two runs of one config drift apart after the first step.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads, then restore the previous number.

    Training heads on cached features is thousands of tiny operations: on a CPU one thread does
    them faster than several (no synchronisation), and far faster when other processes keep the
    other cores busy, where multi-threaded tiny kernels can slow down a hundredfold.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            from smse.errors import ConfigError

            raise ConfigError("train.device: cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (world 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in (
        "smse",
        "torch",
        "torchvision",
        "timm",
        "numpy",
        "scikit-learn",
        "safetensors",
        "faiss-cpu",
        "umap-learn",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["cuda"] = torch.version.cuda or "none"
    return out


__all__ = [
    "seed_everything",
    "torch_threads",
    "resolve_device",
    "Dist",
    "versions",
]
