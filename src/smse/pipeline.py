"""The one pipeline of a run: train -> evaluate -> report, with the multi-process rule in one place."""

from __future__ import annotations

from pathlib import Path

from smse.config import Config
from smse.runtime import Dist


def run_pipeline(
    cfg: Config, evaluate: bool = True, report: bool = True, progress: bool = True
) -> tuple[Path, dict | None]:
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
    return run, evaluate_and_report(run, report=report, progress=progress)


def evaluate_and_report(run: str | Path, which: str = "best", report: bool = True, progress: bool = True) -> dict:
    """The ``which`` checkpoint of ``run`` evaluated on its test split (``eval/``), then the report written."""
    from smse.evaluate import evaluate_run

    result = evaluate_run(run, which, progress=progress)
    if report:
        from smse.report import write_report

        write_report(run)
    _track_evaluation(run, result)
    return result


def _track_evaluation(run: str | Path, result: dict) -> None:
    """The test metrics (and, for TensorBoard, the test embeddings) to the trackers the run's config names."""
    from smse.runfiles import RunFiles
    from smse.tracking import projector_rows, tracked

    files = RunFiles(run)
    cfg = files.read_config()
    if cfg is None or not (cfg.log.tensorboard or cfg.log.mlflow):
        return
    with tracked(cfg, run) as tracker:
        assert tracker is not None  # the config asks for one
        if cfg.log.tensorboard:
            emb, labels, thumbs = projector_rows(files.read_embeddings(files.test_embeddings), seed=cfg.seed)
            tracker.evaluation(result, emb, labels, thumbs)
        else:
            tracker.evaluation(result)


__all__ = ["evaluate_and_report", "run_pipeline"]
