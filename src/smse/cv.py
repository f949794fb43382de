"""Cross-validation: k patient-disjoint runs with reports (``cross_validate``), and out-of-fold predictions
of the trained heads for comparisons with baselines on the same folds (``heads_out_of_fold``)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smse.checkpoint import load_checkpoint
from smse.config import Config
from smse.data.loading import LoadedData, scan, split_method
from smse.data.records import ClassMap, Record
from smse.data.splits import carve_validation, read_fold_file
from smse.engine import train
from smse.errors import ConfigError, DataError
from smse.evaluate import classifier_name
from smse.io import write_json, write_text
from smse.pipeline import run_pipeline
from smse.prepare import embed, prepare
from smse.runfiles import RunFiles
from smse.tables import mean_std_table


def cross_validate(cfg: Config, folds: int = 5, progress: bool = True) -> dict:
    """Train and evaluate one run per split under ``cfg.out/fold<k>``; writes ``cv.json`` and ``cv.md``.

    With ``data.split.method=fold-file`` the fold file path may contain ``{fold}``
    (``.../dsfold{fold}.txt``); otherwise fold k of a ``Folds.csv`` is used. Seeded splits use
    ``data.split.seed + k``.
    """
    check_folds(cfg, folds)
    check_fold_inputs(cfg, folds)
    base = Path(cfg.out)
    heads, knns, probes = [], [], []
    for k in range(1, folds + 1):
        _, result = run_pipeline(fold_config(cfg, k), progress=progress)
        if result is None:  # another process of a distributed run: the main one evaluates and sums up
            continue
        heads.append(result["head"])
        knns.append(result["knn"])
        if "probe" in result:
            probes.append(result["probe"]["results"])
    if not heads:
        return {}
    rows = {f"SMSE ({classifier_name(cfg)})": heads, f"SMSE (k-NN, k={cfg.eval.knn_k})": knns}
    if len(probes) == folds:
        rows["baseline: logistic regression on the frozen features (C tuned per fold)"] = probes
    table, data = mean_std_table(rows)
    summary: dict[str, Any] = {"folds": folds, "split": cfg.data.split.method, "table": data}
    write_json(base / "cv.json", summary)
    write_text(base / "cv.md", table + "\n")
    summary["markdown"] = table
    return summary


def fold_config(cfg: Config, k: int) -> Config:
    """The config of fold ``k`` (1-based): out ``cfg.out/fold<k>``; fold file ``{fold}`` -> k, or seed + k - 1."""
    c = copy.deepcopy(cfg)
    c.out = str(Path(cfg.out) / f"fold{k}")
    s = c.data.split
    if s.method == "fold-file":
        if s.fold_file is None:  # validate() refuses this; a Config built in Python may not have been validated
            raise ConfigError("data.split.fold_file: required when data.split.method is fold-file")
        s.fold_file = s.fold_file.replace("{fold}", str(k))
        s.fold = k
    else:
        s.seed = cfg.data.split.seed + k - 1
    return c


def check_folds(cfg: Config, folds: int) -> None:
    """Refuse a fold count below 1, and several folds of a split that does not change with the fold.

    Raises:
        ConfigError: naming ``--folds`` or the split setting at fault.
    """
    if folds < 1:
        raise ConfigError(f"--folds: must be at least 1, got {folds}")
    if folds == 1:
        return
    s = cfg.data.split
    method = split_method(cfg.data, scan(cfg.data)[0]) if s.method == "auto" else s.method
    if method == "manifest":
        raise ConfigError(
            f"data.split.method: {cfg.data.root} fixes one split in its split column, so all {folds} "
            "folds would score the same split; set data.split.method=seeded, or use --folds 1"
        )
    if method == "fold-file":
        if s.fold_file is None:
            raise ConfigError("data.split.fold_file: required when data.split.method is fold-file")
        if "{fold}" not in s.fold_file and Path(s.fold_file).suffix.lower() != ".csv":
            raise ConfigError(
                f"data.split.fold_file: {s.fold_file} holds one split, so all {folds} folds would score it; "
                "write the path with {fold} (e.g. /data/dsfold{fold}.txt), or use --folds 1"
            )


def check_fold_inputs(cfg: Config, folds: int) -> None:
    """Read the fold file of every fold and match it to the images found, as training will, before any fold trains:
    a missing or malformed fold file of the last fold stops ``cross_validate`` before the first fold, not after.

    Raises:
        DataError: naming the fold file that is missing, malformed or lists none of the images.
    """
    if cfg.data.split.method != "fold-file":
        return  # seeded splits have no input but the data, which the first fold reads
    records = scan(cfg.data)[0]
    names = {Path(r.path).name for r in records}
    for k in range(1, folds + 1):
        s = fold_config(cfg, k).data.split
        assert s.fold_file is not None  # fold_config refuses a fold-file split without one
        listed = read_fold_file(s.fold_file, s.fold)
        if not names & listed.keys():
            raise DataError(
                f"{s.fold_file}: fold {k} lists none of the {len(records)} images found under {cfg.data.root}"
            )


def fold_split(records: Sequence[Record], test_patients: set[str], cfg: Config) -> list[Record]:
    """Records with one fold's split: its test patients, then validation carved from training as usual."""
    marked = [r.with_split("test" if r.patient in test_patients else "train") for r in records]
    return carve_validation(marked, cfg.data.split.val_fraction, cfg.data.split.seed, cfg.data.task)


@dataclass
class FoldEmbeddings:
    """One fold's embeddings under that fold's model: its test images and its references (training and
    validation images), as positions in the records."""

    test: np.ndarray
    test_embeddings: np.ndarray
    references: np.ndarray
    reference_embeddings: np.ndarray


def heads_out_of_fold(
    cfg: Config,
    records: Sequence[Record],
    plan: list[list[set[str]]],
    workdir: str | Path,
    embeddings: list[list[FoldEmbeddings]] | None = None,
) -> list[np.ndarray]:
    """Out-of-fold class probabilities [N, C] per repeat of ``plan`` (from ``baselines.patient_folds``).

    Each fold trains the config's model with the trainer, on that fold's training patients, into
    ``workdir``, then classifies the fold's test images (from the cached features in frozen mode).

    Args:
        embeddings: a list to which each repeat's list of ``FoldEmbeddings`` is appended, where given.
    """
    out = []
    class_names = ClassMap.from_records(records, cfg.data.task).names
    for r, fold_list in enumerate(plan):
        probs = np.full((len(records), len(class_names)), np.nan)
        folds = []
        for f, test in enumerate(fold_list):
            split = fold_split(records, test, cfg)
            c = copy.deepcopy(cfg)
            c.out = str(Path(workdir) / f"repeat{r + 1}-fold{f + 1}")
            run = train(c, progress=False, data=LoadedData(split, {}))
            model, c2, class_map, meta = load_checkpoint(RunFiles(run).checkpoint("best"))
            prep = prepare(
                c2,
                progress=False,
                data=LoadedData(split, {}),
                trained=(model, class_map, meta.get("backbone_weights", "")),
            )
            test_idx = prep.indices("test")
            emb, p = embed(prep, test_idx)
            probs[test_idx] = p[:, [class_map.names.index(n) for n in class_names]]
            if embeddings is not None:
                refs = np.sort(np.concatenate([prep.indices("train"), prep.indices("val")]))
                folds.append(FoldEmbeddings(test_idx, emb, refs, embed(prep, refs)[0]))
        out.append(probs)
        if embeddings is not None:
            embeddings.append(folds)
    return out


__all__ = [
    "cross_validate",
    "check_folds",
    "check_fold_inputs",
    "fold_config",
    "FoldEmbeddings",
    "heads_out_of_fold",
]
