"""Cross-validation over k patient-disjoint splits (seeded repeats or official fold files), mean +- std."""

from __future__ import annotations

import copy
from pathlib import Path

from smse.config import Config
from smse.engine import train
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
