"""How hard is the synthetic set? A frozen ImageNet backbone + linear classifier, patient-disjoint splits.

Reports binary accuracy (image and patient level) pooled, and the train-on-one / test-on-another
magnification matrix, which shows the magnification shift the method exists to close.

Run: python benchmarks/synth_difficulty.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, synthetic_set  # noqa: E402

from smse.config import load_config  # noqa: E402
from smse.data.loading import load_data  # noqa: E402
from smse.data.splits import seeded_split  # noqa: E402
from smse.metrics import image_accuracy, patient_accuracy  # noqa: E402
from smse.prepare import prepare  # noqa: E402


def linear_probe(x_train, y_train, x_test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    return clf.fit(x_train, y_train).predict(x_test)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    root = synthetic_set()
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "out=/tmp/unused",
            "model.views=2",
            "data.image_size=[128, 192]",
            "data.split.val_fraction=0",
        ],
    )
    data = load_data(cfg.data, split=False)
    prep = prepare(cfg, data=data, progress=False)
    feats = prep.features[:, 0].numpy()
    y = np.array([r.label == "malignant" for r in prep.records], dtype=int)
    mags = np.array([r.magnification for r in prep.records])
    levels = [40, 100, 200, 400]
    pooled_img, pooled_pat = [], []
    matrix = np.zeros((len(levels), len(levels), args.seeds))
    for s in range(args.seeds):
        split = np.array([r.split for r in seeded_split(prep.records, 0.3, 0.0, seed=s)])
        patients = np.array([r.patient for r in prep.records])
        tr, te = split == "train", split == "test"
        pred = linear_probe(feats[tr], y[tr], feats[te])
        pooled_img.append(image_accuracy(y[te], pred))
        pooled_pat.append(patient_accuracy(y[te], pred, patients[te]))
        for i, mi in enumerate(levels):
            for j, mj in enumerate(levels):
                a, b = tr & (mags == mi), te & (mags == mj)
                matrix[i, j, s] = patient_accuracy(y[b], linear_probe(feats[a], y[a], feats[b]), patients[b])
    print(f"# synthetic-set difficulty; {date.today()}; {machine()}; {args.seeds} patient-disjoint 70/30 splits")
    print(
        f"frozen ImageNet EfficientNet-Lite0 + logistic regression, binary, all magnifications pooled: "
        f"image {100 * np.mean(pooled_img):.1f} ± {100 * np.std(pooled_img, ddof=1):.1f}%, "
        f"patient {100 * np.mean(pooled_pat):.1f} ± {100 * np.std(pooled_pat, ddof=1):.1f}%"
    )
    print("\npatient-level accuracy, rows: training magnification, columns: test magnification")
    print("| train \\ test | " + " | ".join(f"{m}X" for m in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for i, m in enumerate(levels):
        print(f"| {m}X | " + " | ".join(f"{100 * matrix[i, j].mean():.1f}" for j in range(len(levels))) + " |")
    diag = np.mean([matrix[i, i].mean() for i in range(4)])
    off = np.mean([matrix[i, j].mean() for i in range(4) for j in range(4) if i != j])
    print(
        f"\nwithin one magnification {100 * diag:.1f}%, across magnifications {100 * off:.1f}% "
        f"(shift {100 * (diag - off):.1f} points)"
    )


if __name__ == "__main__":
    main()
