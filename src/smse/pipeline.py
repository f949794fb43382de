"""The one pipeline of a run: train -> evaluate -> report, with the multi-process rule in one place."""

from __future__ import annotations

from pathlib import Path

from smse.config import Config
from smse.runtime import Dist


def run_pipeline(cfg: Config, evaluate: bool = True, report: bool = True, progress: bool = True) -> tuple[Path, dict | None]:
    """Train as ``cfg`` says (resuming an unfinished run), then evaluate the best checkpoint on the test split
    and write the report.

    Every process of a distributed run trains; only the main process evaluates and reports (the others get
    None), so the CLI, ``smse.train``, ``smse cv`` and the demo behave alike under ``torchrun``.

    Returns:
        The run folder and the evaluation's metrics (None when not evaluated here).
    """
    from smse.engine import train

    run = train(cfg, progress=progress)
    if not (evaluate and Dist.from_env().main):
        return run, None
    from smse.evaluate import evaluate_run

    result = evaluate_run(run, progress=progress)
    if report:
        from smse.report import write_report

        write_report(run)
    return run, result


__all__ = ["run_pipeline"]
