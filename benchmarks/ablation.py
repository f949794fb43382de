"""Does the method pay off? Classification loss x metric loss x sampling, 3 seeds, patient-disjoint splits.

Also the magnification-shift matrix: train on one magnification, test on each (cross-entropy
baseline), against SMSE trained on all magnifications.

Run: python benchmarks/ablation.py [--seeds 3]

On the synthetic set only: real patients are ranked by ``benchmarks/real_sample.py`` (patient-grouped
cross-validation with intervals), as the 38 patients of the real sample are too few for 3 random splits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, machine, synthetic_set  # noqa: E402

from smse.config import load_config  # noqa: E402
from smse.engine import train  # noqa: E402
from smse.evaluate import evaluate_run  # noqa: E402

CLASSIFICATION = {
    "ce": [],
    "balanced-ce": [],
    "focal": ["loss.alpha=1.0", "loss.gamma=2.0"],
    "ohem": [],
    "rfl": ["loss.alpha=2.0", "loss.gamma=1.2"],
}
METRICS = ["none", "pair", "triplet"]
SAMPLING = ["single", "pooled", "cross-magnification"]
BASE = [
    "model.backbone=efficientnet_lite0",
    "data.image_size=[128, 192]",
    "model.embedding_dim=64",
    "model.views=2",
    "train.epochs=20",
    "train.step_size=8",
    "train.lr_gamma=0.3",
    "sampler.batch_size=64",
    "loss.margin=0.5",
    "loss.mining=semihard",
    "data.split.val_fraction=0.2",
]


def run_one(root: Path, overrides: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None, BASE + [f"data.root={root}", f"out={tmp}/run", f"seed={seed}", f"data.split.seed={seed}", *overrides]
        )
        train(cfg, progress=False)
        m = evaluate_run(cfg.out, progress=False)
    head = m["head"]
    names = m["classes"]
    minority = int(np.argmin(np.array(head["all"]["confusion_matrix"]).sum(axis=1)))  # fewest test images
    mat = np.array(m["retrieval"]["map_at_r"], dtype=float)
    off = mat[~np.eye(len(mat), dtype=bool)] if len(mat) > 1 else mat.ravel()
    row = {
        "patient_all": head["all"]["patient_accuracy"],
        "balanced_all": head["all"]["balanced_accuracy"],
        "minority_recall": head["all"]["per_class_recall"][minority],
        "minority": names[minority],
        "cross_mag_map": float(np.nanmean(off)),
        "probe": m["magnification_probe"]["accuracy"],
    }
    for mag, v in head.items():
        if mag != "all":
            row[f"patient_{mag}"] = v["patient_accuracy"]
    return row


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "minority"]
    return {
        k: (
            float(np.nanmean([r[k] for r in rows])),
            float(np.nanstd([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0,
        )
        for k in keys
    }


def fmt(ms: tuple[float, float]) -> str:
    return "-" if np.isnan(ms[0]) else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def ablation(root: Path, seeds: int, sampling: list[str], extra_overrides: list[str]) -> list[dict]:
    results = []
    mags = ["40X", "100X", "200X", "400X"]
    for cls, extra in CLASSIFICATION.items():
        for metric in METRICS:
            for mode in sampling:
                if metric == "none" and mode == "cross-magnification":
                    continue  # without tuples this is the pooled run
                overrides = [
                    f"loss.classification={cls}",
                    f"loss.metric={metric}",
                    f"sampler.mode={mode}",
                    *extra,
                    *extra_overrides,
                ]
                if mode == "single":
                    overrides.append("sampler.magnification=100")
                rows = [run_one(root, overrides, s) for s in range(seeds)]
                results.append({"classification": cls, "metric": metric, "sampling": mode, **summarize(rows)})
                r = results[-1]
                print(
                    f"| {cls} | {metric} | {mode} | {fmt(r['patient_all'])} | "
                    + " | ".join(fmt(r.get(f"patient_{m}", (np.nan, np.nan))) for m in mags)
                    + f" | {fmt(r['balanced_all'])} | {fmt(r['minority_recall'])} | {fmt(r['cross_mag_map'])}"
                    + f" | {fmt(r['probe'])} |",
                    flush=True,
                )
    return results


def header(title: str) -> None:
    print(f"\n## {title}\n")
    print(
        "| classification | metric | sampling | patient acc (all) | 40X | 100X | 200X | 400X | balanced acc | "
        "minority recall | cross-mag mAP@R | magnification probe |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")


def shift_matrix(root: Path, seeds: int) -> dict:
    """Rows: training magnification (CE baseline) and 'all' (SMSE); columns: test magnification."""
    mags = [40, 100, 200, 400]
    out = {}
    for train_mag in mags:
        rows = [
            run_one(
                root,
                [
                    "loss.classification=ce",
                    "loss.metric=none",
                    "sampler.mode=single",
                    f"sampler.magnification={train_mag}",
                ],
                s,
            )
            for s in range(seeds)
        ]
        out[f"CE, trained on {train_mag}X"] = summarize(rows)
    rows = [
        run_one(root, ["loss.classification=ce", "loss.metric=none", "sampler.mode=pooled"], s) for s in range(seeds)
    ]
    out["CE, trained on all"] = summarize(rows)
    rows = [
        run_one(root, ["loss.classification=rfl", "loss.metric=pair", "sampler.mode=cross-magnification"], s)
        for s in range(seeds)
    ]
    out["SMSE (RFL + pair, cross-mag), trained on all"] = summarize(rows)
    print("\n## Magnification shift: patient-level accuracy by test magnification\n")
    print("| trained on | 40X | 100X | 200X | 400X | all |")
    print("|---|---|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | " + " | ".join(fmt(r[f"patient_{m}X"]) for m in mags) + f" | {fmt(r['patient_all'])} |")
    diag = np.mean([out[f"CE, trained on {m}X"][f"patient_{m}X"][0] for m in mags])
    offd = np.mean([out[f"CE, trained on {m}X"][f"patient_{t}X"][0] for m in mags for t in mags if t != m])
    smse = out["SMSE (RFL + pair, cross-mag), trained on all"]["patient_all"][0]
    print(
        f"\nCE single-magnification: {100 * diag:.1f}% on its own magnification, {100 * offd:.1f}% on the others "
        f"(gap {100 * (diag - offd):.1f} points); SMSE on all magnifications: {100 * smse:.1f}%."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# ablation; {date.today()}; {machine()}; {args.seeds} seeds (patient split and initialisation); "
        "mean ± std; patient-level accuracy is the mean patient score"
    )
    report = {}
    root = synthetic_set()
    header("Synthetic set (32 patients, 1,536 images, 4 magnifications, binary); single = trained on 100X only")
    report["synthetic"] = ablation(root, args.seeds, SAMPLING, [])
    report["shift"] = shift_matrix(root, args.seeds)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ablation.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
