"""Cross-validation over k patient-disjoint splits (seeded repeats or official fold files), mean +- std."""

from __future__ import annotations

import copy
from pathlib import Path

from smse.config import Config
from smse.data.loading import scan, split_method
from smse.engine import train
from smse.errors import ConfigError
from smse.evaluate import evaluate_run
from smse.io import write_json, write_text
from smse.report import write_report
from smse.tables import mean_std_table


def cross_validate(cfg: Config, folds: int = 5, progress: bool = True) -> dict:
    """Train and evaluate one run per split under ``cfg.out/fold<k>``; writes ``cv.json`` and ``cv.md``.

    With ``data.split.method=fold-file`` the fold file path may contain ``{fold}``
    (``.../dsfold{fold}.txt``); otherwise fold k of a ``Folds.csv`` is used. Seeded splits use
    ``data.split.seed + k``.
    """
    check_folds(cfg, folds)
    base = Path(cfg.out)
    heads, knns = [], []
    for k in range(1, folds + 1):
        c = copy.deepcopy(cfg)
        c.out = str(base / f"fold{k}")
        s = c.data.split
        if s.method == "fold-file":
            s.fold_file = s.fold_file.replace("{fold}", str(k))
            s.fold = k
        else:
            s.seed = cfg.data.split.seed + k - 1
        train(c, progress=progress)
        result = evaluate_run(c.out, progress=progress)
        write_report(c.out)
        heads.append(result["head"])
        knns.append(result["knn"])
    table, data = mean_std_table({"SMSE (classifier head)": heads, f"SMSE (k-NN, k={cfg.eval.knn_k})": knns})
    summary = {"folds": folds, "split": cfg.data.split.method, "table": data}
    write_json(base / "cv.json", summary)
    write_text(base / "cv.md", table + "\n")
    summary["markdown"] = table
    return summary


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
        raise ConfigError(f"data.split.method: {cfg.data.root} fixes one split in its split column, so all {folds} "
                          "folds would score the same split; set data.split.method=seeded, or use --folds 1")
    if method == "fold-file" and "{fold}" not in s.fold_file and Path(s.fold_file).suffix.lower() != ".csv":
        raise ConfigError(f"data.split.fold_file: {s.fold_file} holds one split, so all {folds} folds would score it; "
                          "write the path with {fold} (e.g. /data/dsfold{fold}.txt), or use --folds 1")
