"""What "similar" means on the synthetic set: the embedding's tumour-type retrieval, spread and accuracy per variant.

The demo's set (32 patients, 8 tumour types, 4 magnifications), three seeded patient-disjoint splits;
every variant is the ``demo`` config with the overrides in ``VARIANTS``, trained and evaluated as
``smse train`` and ``smse evaluate`` run them. Printed per variant (mean over the splits): the model's
patient-level accuracy and ROC-AUC, the tuned logistic regression on the same frozen features
(``evaluate``'s independent baseline), tumour-type precision@5 of the test images among the references
(other patients only; overall and within the query's class, with the frozen features' own beside),
the share of the references' variance on their first axis, the magnification probe (balanced accuracy of
recovering the magnification from the embedding; lower is more magnification-independent) and
cross-magnification class retrieval.

Run: python benchmarks/similarity.py [--splits 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, machine, synthetic_set  # noqa: E402

from smse.config import load_config  # noqa: E402
from smse.engine import train  # noqa: E402
from smse.evaluate import evaluate_run  # noqa: E402

VARIANTS = {
    "before (pair, classifier head)": ["model.classifier=head", "loss.structure_weight=0"],
    "k-NN, no neighbourhood term": ["loss.structure_weight=0"],
    "classifier head + term (weight 3, not centred)": [
        "model.classifier=head",
        "loss.structure_weight=3",
        "loss.structure_scope=all",
    ],
    "k-NN + term (weight 3, not centred)": ["loss.structure_weight=3", "loss.structure_scope=all"],
    "k-NN + term within each magnification (weight 3)": [
        "loss.structure_weight=3",
        "loss.structure_scope=magnification",
    ],
    "k-NN + term, teacher centred (weight 3)": ["loss.structure_weight=3"],
    "default: k-NN + term, teacher centred (weight 1)": [],
}


def cross_magnification_map(retrieval: dict) -> float:
    """The mean mAP@R of the off-diagonal cells of the 4x4 retrieval matrix (query and gallery at different
    magnifications, other patients, relevant = same class)."""
    m = np.array(retrieval["map_at_r"], dtype=float)
    return float(np.nanmean(m[~np.eye(len(m), dtype=bool)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=int, default=3)
    args = parser.parse_args()
    root = synthetic_set()
    print(f"# similarity on the synthetic set; {date.today()}; {machine()}; {args.splits} patient-disjoint splits")
    print(
        "\n| variant | patient acc | ROC-AUC | probe patient acc | type P@5 (frozen features; chance) "
        "| type P@5 within class (frozen features; chance) | variance on axis 1 | effective rank "
        "| magnification probe (chance 25%) | cross-magnification mAP@R | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, overrides in VARIANTS.items():
        rows = []
        started = time.perf_counter()
        for seed in range(args.splits):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(
                    "demo",
                    [
                        f"data.root={root}",
                        f"out={tmp}/run",
                        f"data.split.seed={seed}",
                        f"data.cache_dir={OUT / 'cache'}",
                        *overrides,
                    ],
                )
                train(cfg, progress=False)
                m = evaluate_run(f"{tmp}/run", progress=False)
            ours, frozen = m["similarity"]["embedding"], m["similarity"]["frozen_features"]
            rows.append(
                [
                    m["head"]["all"]["patient_accuracy"],
                    m["head"]["all"]["roc_auc"],
                    m["probe"]["results"]["all"]["patient_accuracy"],
                    ours["type_retrieval"]["all"]["precision_at_5"],
                    frozen["type_retrieval"]["all"]["precision_at_5"],
                    ours["type_retrieval"]["all"]["chance_precision"],
                    ours["type_retrieval"]["within_class"]["precision_at_5"],
                    frozen["type_retrieval"]["within_class"]["precision_at_5"],
                    ours["type_retrieval"]["within_class"]["chance_precision"],
                    ours["spread"]["first_axis_share"],
                    ours["spread"]["effective_rank"],
                    m["magnification_probe"]["balanced_accuracy"],
                    cross_magnification_map(m["retrieval"]),
                ]
            )
        r = np.mean(rows, axis=0)
        sd = np.std(rows, axis=0)
        print(
            f"| {name} | {100 * r[0]:.1f} ± {100 * sd[0]:.1f} | {r[1]:.3f} | {100 * r[2]:.1f} "
            f"| {100 * r[3]:.1f} ({100 * r[4]:.1f}; {100 * r[5]:.1f}) "
            f"| {100 * r[6]:.1f} ({100 * r[7]:.1f}; {100 * r[8]:.1f}) "
            f"| {100 * r[9]:.1f}% | {r[10]:.1f} | {100 * r[11]:.1f} | {100 * r[12]:.1f} "
            f"| {time.perf_counter() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
