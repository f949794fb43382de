"""Real BreakHis patients: the shipped default against independent baselines, patient-grouped cross-validation.

On ``../shared/data/breakhis-sample`` (315 images, 38 patients), with the frozen features of the
shipped ``breakhis`` config computed once (the trainer's own feature cache), every method sees the
same folds:

- ``logreg``: scikit-learn logistic regression on the standardised plain-view features (the
  independent baseline, ``smse.baselines.linear_probe``; C fixed once, never tuned on test folds);
- ``knn``: k-nearest neighbours (k = 5, cosine) on the same features;
- ``ce`` / ``rfl``: the trainer's heads with cross-entropy / the reinforced focal loss and no metric loss;
- ``smse-...``: the trainer's heads with a pair or triplet loss, cross-magnification or pooled (paper) sampling;
- ``default``: the shipped ``breakhis`` config exactly as ``smse train -c breakhis`` runs it.

Protocols: leave-one-patient-out and repeated patient-grouped stratified k-fold. Metrics per
method over the out-of-fold predictions: patient-level accuracy (the literature's mean of patient
scores), image-level accuracy, balanced accuracy and ROC-AUC, with a bootstrap 95% interval over
patients, and each method's paired difference to the logistic regression.

Run: python benchmarks/real_sample.py [--protocol lopo kfold] [--methods ...] [--set a.b=v ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, SAMPLE, machine  # noqa: E402

from smse.baselines import PROBE_C, knn_probe, linear_probe, patient_folds  # noqa: E402
from smse.config import load_config  # noqa: E402
from smse.cv import fold_split, heads_out_of_fold  # noqa: E402
from smse.data.loading import LoadedData, load_data  # noqa: E402
from smse.metrics import patient_accuracy  # noqa: E402
from smse.prepare import prepare  # noqa: E402

TRAINED = {
    "default": [],
    "ce": ["loss.classification=ce", "loss.metric=none"],
    "rfl": ["loss.classification=rfl", "loss.metric=none"],
    "smse-triplet-cross": ["loss.metric=triplet", "sampler.mode=cross-magnification"],
    "smse-triplet-pooled": ["loss.metric=triplet", "sampler.mode=pooled"],
    "smse-pair-cross": ["loss.metric=pair", "sampler.mode=cross-magnification"],
    "smse-pair-pooled": ["loss.metric=pair", "sampler.mode=pooled"],
}
BASELINES = {"logreg": linear_probe, "knn": knn_probe}


def baseline_out_of_fold(probe, feats: np.ndarray, y: np.ndarray, records, plan, cfg) -> list[np.ndarray]:
    out = []
    for fold_list in plan:
        prob = np.full(len(records), np.nan)
        for test in fold_list:
            split = fold_split(records, test, cfg)
            test_idx = np.array([i for i, r in enumerate(split) if r.split == "test"])
            train_idx = np.array([i for i, r in enumerate(split) if r.split != "test"])  # validation patients too
            prob[test_idx] = probe(feats[train_idx], y[train_idx], feats[test_idx])[:, 1]
        out.append(prob)
    return out


def metrics(y: np.ndarray, prob: np.ndarray, patients: np.ndarray) -> dict:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    pred = (prob >= 0.5).astype(int)
    return {"patient": patient_accuracy(y, pred, patients), "image": float((pred == y).mean()),
            "balanced": float(balanced_accuracy_score(y, pred)),
            "auc": float(roc_auc_score(y, prob)) if len(set(y.tolist())) == 2 else float("nan")}


def bootstrap(y, probs_by_repeat: list[np.ndarray], patients: np.ndarray, reference: list[np.ndarray] | None,
              n: int = 2000, seed: int = 0) -> dict:
    """Mean over repeats of each metric, its bootstrap 95% interval over patients, and the paired difference."""
    rng = np.random.default_rng(seed)
    ids = np.unique(patients)
    rows_of = {p: np.flatnonzero(patients == p) for p in ids}

    def score(sample_ids, probs_list):
        rows = np.concatenate([rows_of[p] for p in sample_ids])
        # a patient drawn twice counts twice: rename the copies so patient scores stay per draw
        names = np.concatenate([np.full(len(rows_of[p]), f"{p}#{i}") for i, p in enumerate(sample_ids)])
        per_repeat = [metrics(y[rows], pr[rows], names) for pr in probs_list]
        return {k: float(np.mean([m[k] for m in per_repeat])) for k in ("patient", "image", "balanced", "auc")}

    point = score(ids, probs_by_repeat)
    draws, diffs = [], []
    for _ in range(n):
        sample = rng.choice(ids, size=len(ids), replace=True)
        draws.append(score(sample, probs_by_repeat))
        if reference is not None:
            ref = score(sample, reference)
            diffs.append({k: draws[-1][k] - ref[k] for k in ref})
    out = {}
    for k in point:
        vals = np.array([d[k] for d in draws])
        out[k] = {"mean": float(point[k]), "lo": float(np.nanpercentile(vals, 2.5)), "hi": float(np.nanpercentile(vals, 97.5))}
        if diffs:
            dv = np.array([d[k] for d in diffs])
            ref_point = score(ids, reference)[k]
            out[k]["diff"] = float(point[k] - ref_point)
            out[k]["diff_lo"], out[k]["diff_hi"] = float(np.nanpercentile(dv, 2.5)), float(np.nanpercentile(dv, 97.5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", nargs="+", default=["lopo", "kfold"], choices=["lopo", "kfold"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(BASELINES) + list(TRAINED))
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the default config for every trained method")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (SAMPLE / "BreaKHis_v1").is_dir():
        sys.exit(f"the real sample is not at {SAMPLE}")
    base = ["data.root=" + str(SAMPLE), "data.cache_dir=" + str(OUT / "cache"), *args.set]
    cfg = load_config("breakhis", base)
    data = load_data(cfg.data, split=False)
    records = [replace(r, split="train") for r in data.records]
    started = time.perf_counter()
    prep = prepare(cfg, progress=True, data=LoadedData(records, {}))
    feats = prep.features[:, 0].numpy()
    print(f"# real-sample benchmark; {date.today()}; {machine()}")
    print(f"# {data.summary_line()}")
    print(f"# features: {cfg.model.backbone} ({prep.weights}) at {cfg.data.image_size[0]}x{cfg.data.image_size[1]}, "
          f"{cfg.model.views} views, {feats.shape[1]} dims, {time.perf_counter() - started:.0f} s (cached after the first run)")
    print(f"# overrides: {' '.join(args.set) or '(none: the shipped breakhis config)'}; logistic regression C={PROBE_C}; "
          "baselines fit on all non-test patients, trained heads on the same minus their validation patients")
    y = np.array([r.label == "malignant" for r in records], dtype=int)
    patients = np.array([r.patient for r in records])
    results: dict = {}
    for protocol in args.protocol:
        plan = patient_folds(records, None if protocol == "lopo" else args.folds, args.repeats)
        probs = {}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            for m in args.methods:
                if m in BASELINES:
                    probs[m] = baseline_out_of_fold(BASELINES[m], feats, y, records, plan, cfg)
                else:
                    c = load_config("breakhis", base + TRAINED[m])
                    malignant = sorted({r.label for r in records}).index("malignant")
                    probs[m] = [p[:, malignant] for p in heads_out_of_fold(c, records, plan, Path(tmp) / m)]
        reference = probs.get("logreg")
        results[protocol] = {m: bootstrap(y, probs[m], patients, reference if m != "logreg" else None, args.bootstrap)
                             for m in args.methods}
        what = ("leave-one-patient-out" if protocol == "lopo"
                else f"patient-grouped stratified {args.folds}-fold x {args.repeats} repeats")
        print(f"\n## {what} ({len(set(patients))} patients, {len(records)} images; {time.perf_counter() - t0:.0f} s)\n")
        print("| method | patient acc | image acc | balanced acc | ROC-AUC | patient acc - logreg |")
        print("|---|---|---|---|---|---|")
        for m, res in results[protocol].items():
            cells = [f"{100 * res[k]['mean']:.1f} [{100 * res[k]['lo']:.1f}, {100 * res[k]['hi']:.1f}]" if k != "auc"
                     else f"{res[k]['mean']:.3f} [{res[k]['lo']:.3f}, {res[k]['hi']:.3f}]" for k in ("patient", "image", "balanced", "auc")]
            d = res["patient"]
            diff = (f"{100 * d['diff']:+.1f} [{100 * d['diff_lo']:+.1f}, {100 * d['diff_hi']:+.1f}]" if "diff" in d else "-")
            print(f"| {m} | " + " | ".join(cells) + f" | {diff} |")
    if args.json:
        args.json.write_text(json.dumps({"overrides": args.set, "results": results}, indent=1))


if __name__ == "__main__":
    main()
