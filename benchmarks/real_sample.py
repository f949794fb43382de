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

from smse.baselines import PROBE_C, knn_probe, linear_probe, out_of_fold, patient_folds  # noqa: E402
from smse.config import load_config  # noqa: E402
from smse.cv import heads_out_of_fold  # noqa: E402
from smse.data.loading import LoadedData, load_data  # noqa: E402
from smse.metrics import balanced_accuracy, image_accuracy, patient_accuracy, roc_auc  # noqa: E402
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
KEYS = ("patient", "image", "balanced", "auc")


def metrics(y: np.ndarray, prob: np.ndarray, patients: np.ndarray) -> dict:
    pred = (prob >= 0.5).astype(int)
    return {"patient": patient_accuracy(y, pred, patients), "image": image_accuracy(y, pred),
            "balanced": balanced_accuracy(y, pred), "auc": roc_auc(y, prob)}


def bootstrap(y: np.ndarray, probs: dict[str, list[np.ndarray]], patients: np.ndarray, reference: str | None,
              n: int = 2000, seed: int = 0) -> dict:
    """Per method: the mean over repeats of each metric, its bootstrap 95% interval over patients and, against
    the ``reference`` method, the paired difference on the same draws (each draw scored once per method)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(patients)
    rows_of = {p: np.flatnonzero(patients == p) for p in ids}
    samples = [ids] + [rng.choice(ids, size=len(ids), replace=True) for _ in range(n)]  # the point, then draws

    def score(sample_ids, probs_list):
        rows = np.concatenate([rows_of[p] for p in sample_ids])
        # a patient drawn twice counts twice: rename the copies so patient scores stay per draw
        names = np.concatenate([np.full(len(rows_of[p]), f"{p}#{i}") for i, p in enumerate(sample_ids)])
        per_repeat = [metrics(y[rows], pr[rows], names) for pr in probs_list]
        return [float(np.mean([m[k] for m in per_repeat])) for k in KEYS]

    scores = {m: np.array([score(sample, p) for sample in samples]) for m, p in probs.items()}  # [1 + n, metric]
    out = {}
    for m, sc in scores.items():
        out[m] = {}
        for j, k in enumerate(KEYS):
            cell = {"mean": sc[0, j], "lo": np.nanpercentile(sc[1:, j], 2.5), "hi": np.nanpercentile(sc[1:, j], 97.5)}
            if reference in scores and m != reference:
                diff = sc[:, j] - scores[reference][:, j]
                cell |= {"diff": diff[0], "diff_lo": np.nanpercentile(diff[1:], 2.5),
                         "diff_hi": np.nanpercentile(diff[1:], 97.5)}
            out[m][k] = {key: float(v) for key, v in cell.items()}
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
                    probs[m] = out_of_fold(BASELINES[m], feats, y, patients, plan)
                else:
                    c = load_config("breakhis", base + TRAINED[m])
                    malignant = sorted({r.label for r in records}).index("malignant")
                    probs[m] = [p[:, malignant] for p in heads_out_of_fold(c, records, plan, Path(tmp) / m)]
        results[protocol] = bootstrap(y, probs, patients, "logreg", args.bootstrap)
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
