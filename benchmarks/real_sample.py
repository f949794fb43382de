"""Real BreakHis patients: the shipped default against independent baselines, patient-grouped cross-validation.

On ``../shared/data/breakhis-sample`` (315 images, 38 patients), with the frozen features of the
shipped ``breakhis`` config computed once (the trainer's own feature cache), every method sees the
same folds:

- ``logreg``: scikit-learn logistic regression on the standardised plain-view features, C = 0.1 fixed;
- ``logreg-tuned``: the same with C chosen in each fold by patient-grouped cross-validation on that
  fold's training patients only (``smse.baselines.tuned_linear_probe``): the bar a default must clear;
- ``knn`` / ``knn15``: k-nearest neighbours (k = 5 / 15, cosine) on the same features;
- trained methods: the trainer's heads (``smse train`` as it runs) with the overrides in ``TRAINED``;
  ``default`` is the shipped ``breakhis`` config exactly, ``before`` the default before the embedding
  kept the features' neighbourhoods (pair loss + classifier head, epoch chosen on validation patients).

Besides classification, what "similar" means, from each fold's model: tumour-type precision@5 of
the test images among the references (every non-test image of other patients), over all references
and within the query's class, with the chance level of a random ranking; and the references' spread
(share of variance on the first axis, effective rank). ``frozen`` rows give the same for the frozen
features themselves and their PCA to the embedding's dimension.

Protocols: leave-one-patient-out (``lopo``), repeated patient-grouped stratified k-fold (``kfold``),
and ``nested``: in each outer fold every candidate of ``NESTED_CANDIDATES`` is scored by an inner
patient-grouped cross-validation on the outer training patients only (patient-level accuracy +
ROC-AUC), the best is trained on all of them and scored on the outer test patients: an estimate of
choosing among the candidates that never sees the patients it reports on. Metrics: mean over repeats
of the out-of-fold predictions, a bootstrap 95% interval over patients, and each method's paired
difference to ``logreg-tuned``.

Run: python benchmarks/real_sample.py [--protocol lopo kfold nested] [--methods ...] [--set a.b=v ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, SAMPLE, machine  # noqa: E402

from smse.baselines import PROBE_C, knn_probe, linear_probe, out_of_fold, patient_folds, tuned_linear_probe  # noqa: E402
from smse.config import load_config  # noqa: E402
from smse.cv import FoldEmbeddings, heads_out_of_fold  # noqa: E402
from smse.data.loading import LoadedData, load_data  # noqa: E402
from smse.metrics import balanced_accuracy, image_accuracy, patient_accuracy, roc_auc  # noqa: E402
from smse.prepare import prepare  # noqa: E402
from smse.similarity import embedding_spread, same_patient_retrieval, type_retrieval_per_query  # noqa: E402

HEAD = ["model.classifier=head", "loss.structure_weight=0", "data.split.val_fraction=0.15"]
TRAINED = {
    "default": [],
    "before": HEAD,
    "default + validation": ["data.split.val_fraction=0.15"],
    "not centred": ["loss.structure_scope=all"],
    "structure 3": ["loss.structure_weight=3"],
    "head + structure": ["model.classifier=head"],
    "knn, no structure": ["loss.structure_weight=0"],
    "knn, structure only": ["loss.metric=none"],
    "ce": HEAD + ["loss.classification=ce", "loss.metric=none"],
    "rfl": HEAD + ["loss.classification=rfl", "loss.metric=none"],
    "smse-triplet-cross": HEAD + ["loss.metric=triplet", "sampler.mode=cross-magnification"],
    "smse-pair-pooled": HEAD + ["loss.metric=pair", "sampler.mode=pooled"],
}
NESTED_CANDIDATES = ["default", "before", "structure 3", "head + structure", "knn, no structure"]
BASELINES = {
    "logreg": linear_probe,
    "logreg-tuned": tuned_linear_probe,
    "knn": partial(knn_probe, k=5),
    "knn15": partial(knn_probe, k=15),
}
DEFAULT_METHODS = [
    "logreg",
    "logreg-tuned",
    "knn",
    "knn15",
    "default",
    "before",
    "default + validation",
    "structure 3",
    "head + structure",
    "knn, no structure",
    "knn, structure only",
]
REFERENCE = "logreg-tuned"
KEYS = ("patient", "image", "balanced", "auc", "type", "type_chance", "within", "within_chance")


def metrics(y: np.ndarray, prob: np.ndarray, patients: np.ndarray, extra: dict[str, np.ndarray], rows) -> dict:
    pred = (prob >= 0.5).astype(int)
    out = {
        "patient": patient_accuracy(y, pred, patients),
        "image": image_accuracy(y, pred),
        "balanced": balanced_accuracy(y, pred),
        "auc": roc_auc(y, prob),
    }
    for k, v in extra.items():
        vals = v[rows]
        out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


def bootstrap(
    y: np.ndarray,
    probs: dict[str, list[np.ndarray]],
    extras: dict[str, list[dict]],
    patients: np.ndarray,
    reference: str | None,
    n: int = 2000,
    seed: int = 0,
) -> dict:
    """Per method: the mean over repeats of each metric, its bootstrap 95% interval over patients and, against
    the ``reference`` method, the paired difference on the same draws (each draw scored once per method).
    ``extras``: per method and repeat, per-image values (NaN where undefined) averaged over the drawn images."""
    rng = np.random.default_rng(seed)
    ids = np.unique(patients)
    rows_of = {p: np.flatnonzero(patients == p) for p in ids}
    samples = [ids] + [rng.choice(ids, size=len(ids), replace=True) for _ in range(n)]  # the point, then draws

    def score(sample_ids, probs_list, extra_list):
        rows = np.concatenate([rows_of[p] for p in sample_ids])
        # a patient drawn twice counts twice: rename the copies so patient scores stay per draw
        names = np.concatenate([np.full(len(rows_of[p]), f"{p}#{i}") for i, p in enumerate(sample_ids)])
        per_repeat = [metrics(y[rows], pr[rows], names, ex, rows) for pr, ex in zip(probs_list, extra_list)]
        return [float(np.nanmean([m.get(k, np.nan) for m in per_repeat])) for k in KEYS]

    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            scores = {
                m: np.array([score(s, p, extras.get(m, [{}] * len(p))) for s in samples]) for m, p in probs.items()
            }
    out = {}
    for m, sc in scores.items():
        out[m] = {}
        for j, k in enumerate(KEYS):
            if np.isnan(sc[0, j]):
                continue
            cell = {"mean": sc[0, j], "lo": np.nanpercentile(sc[1:, j], 2.5), "hi": np.nanpercentile(sc[1:, j], 97.5)}
            if reference in scores and m != reference and not np.isnan(scores[reference][0, j]):
                diff = sc[:, j] - scores[reference][:, j]
                cell |= {
                    "diff": diff[0],
                    "diff_lo": np.nanpercentile(diff[1:], 2.5),
                    "diff_hi": np.nanpercentile(diff[1:], 97.5),
                }
            out[m][k] = {key: float(v) for key, v in cell.items()}
    return out


def similarity_of(folds: list[FoldEmbeddings], records, n: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Per image (its own fold's model): tumour-type precision@5 overall and within class, with chance; and the
    spread of each fold's references."""
    cols = {k: np.full(n, np.nan) for k in ("type", "type_chance", "within", "within_chance")}
    spreads = []
    types = np.array([r.tumor_type for r in records])
    labels = np.array([r.label for r in records])
    pats = np.array([r.patient for r in records])
    for f in folds:
        q, g = f.test, f.references
        per = type_retrieval_per_query(
            f.test_embeddings, types[q], labels[q], pats[q], f.reference_embeddings, types[g], labels[g], pats[g], k=5
        )
        cols["type"][q], cols["type_chance"][q] = per["all"]["precision"], per["all"]["chance"]
        cols["within"][q], cols["within_chance"][q] = per["within_class"]["precision"], per["within_class"]["chance"]
        spread = embedding_spread(f.reference_embeddings)
        # the fold's test images against its test images at other magnifications: is the own patient found?
        spread["same_patient"] = same_patient_retrieval(
            f.test_embeddings, pats[q], [records[i].magnification for i in q]
        )
        spreads.append(spread)
    return cols, spreads


def frozen_folds(feats: np.ndarray, records, plan, dim: int | None) -> list[list[FoldEmbeddings]]:
    """The frozen features as an 'embedding' (standardised on each fold's references; PCA to ``dim``)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    patients = np.array([r.patient for r in records])
    out = []
    for fold_list in plan:
        folds = []
        for test in fold_list:
            held = np.isin(patients, list(test))
            q, g = np.flatnonzero(held), np.flatnonzero(~held)
            scaler = StandardScaler().fit(feats[g])
            xq, xg = scaler.transform(feats[q]), scaler.transform(feats[g])
            if dim:
                pca = PCA(min(dim, len(g)), random_state=0).fit(xg)
                xq, xg = pca.transform(xq), pca.transform(xg)
            folds.append(FoldEmbeddings(q, xq, g, xg))
        out.append(folds)
    return out


def trained_oof(method: str, base: list[str], records, plan, workdir: Path, embeddings=None) -> list[np.ndarray]:
    cfg = load_config("breakhis", base + TRAINED[method])
    malignant = sorted({r.label for r in records}).index("malignant")
    return [p[:, malignant] for p in heads_out_of_fold(cfg, records, plan, workdir, embeddings)]


def nested(base: list[str], records, y, patients, plan, workdir: Path, inner_folds: int = 4) -> tuple[list, Counter]:
    """Out-of-fold probabilities of 'choose a candidate by inner CV on the outer training patients, then train it'."""
    chosen: Counter = Counter()
    out = []
    for r, fold_list in enumerate(plan):
        prob = np.full(len(y), np.nan)
        for f, test in enumerate(fold_list):
            inner_idx = np.flatnonzero(~np.isin(patients, list(test)))
            inner = [records[i] for i in inner_idx]
            inner_plan = patient_folds(inner, inner_folds, 1, seed=100 + f)
            best, best_m = -np.inf, None
            for m in NESTED_CANDIDATES:
                p = trained_oof(m, base, inner, inner_plan, workdir / f"n{r}-{f}-{m}")[0]
                yi, pi = y[inner_idx], patients[inner_idx]
                s = patient_accuracy(yi, (p >= 0.5).astype(int), pi) + roc_auc(yi, p)
                if s > best:
                    best, best_m = s, m
            chosen[best_m] += 1
            # the chosen candidate, trained on every outer training patient, scored on the outer test patients
            p = trained_oof(best_m, base, records, [[set(test)]], workdir / f"n{r}-{f}-chosen")[0]
            held = np.isin(patients, list(test))
            prob[held] = p[held]
            print(f"#   nested repeat {r + 1} fold {f + 1}: chose {best_m} (inner score {best:.3f})", flush=True)
        out.append(prob)
    return out, chosen


def fmt(res: dict, k: str, pct: bool = True) -> str:
    if k not in res:
        return "-"
    c = res[k]
    return (
        f"{100 * c['mean']:.1f} [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]"
        if pct
        else f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"
    )


def print_table(results: dict, spreads: dict[str, list[dict]]) -> None:
    print(
        "| method | patient acc | image acc | ROC-AUC | type P@5 (chance) | type P@5 within class (chance) "
        "| same patient, other magnification: hit@5 (chance; queries) "
        "| variance on axis 1 | effective rank | patient acc - logreg-tuned | AUC - logreg-tuned |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, res in results.items():
        sim = "-", "-"
        if "type" in res:
            sim = (
                f"{fmt(res, 'type')} ({100 * res['type_chance']['mean']:.1f})",
                f"{fmt(res, 'within')} ({100 * res['within_chance']['mean']:.1f})",
            )
        sp = spreads.get(m)
        ax = f"{100 * np.mean([s['first_axis_share'] for s in sp]):.1f}%" if sp else "-"
        er = f"{np.mean([s['effective_rank'] for s in sp]):.1f}" if sp else "-"
        # (leave-one-patient-out: a fold's test images are one patient's, so every hit is trivially its own)
        same = [
            s["same_patient"]
            for s in sp or []
            if s["same_patient"]["queries"] and s["same_patient"]["chance_hit_at_5"] < 1.0
        ]
        n = sum(x["queries"] for x in same)
        hit = (
            "-"
            if not n
            else (
                f"{100 * sum(x['hit_at_5'] * x['queries'] for x in same) / n:.1f} "
                f"({100 * sum(x['chance_hit_at_5'] * x['queries'] for x in same) / n:.1f}; {n})"
            )
        )
        d, a = res["patient"], res["auc"]
        diff = f"{100 * d['diff']:+.1f} [{100 * d['diff_lo']:+.1f}, {100 * d['diff_hi']:+.1f}]" if "diff" in d else "-"
        adiff = f"{a['diff']:+.3f} [{a['diff_lo']:+.3f}, {a['diff_hi']:+.3f}]" if "diff" in a else "-"
        print(
            f"| {m} | {fmt(res, 'patient')} | {fmt(res, 'image')} | {fmt(res, 'auc', False)} | {sim[0]} | {sim[1]} "
            f"| {hit} | {ax} | {er} | {diff} | {adiff} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--protocol", nargs="+", default=["lopo", "kfold", "nested"], choices=["lopo", "kfold", "nested"]
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nested-repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
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
    print(
        f"# features: {cfg.model.backbone} ({prep.weights}) at {cfg.data.image_size[0]}x{cfg.data.image_size[1]}, "
        f"{cfg.model.views} views, {feats.shape[1]} dims, "
        f"{time.perf_counter() - started:.0f} s (cached after the first run)"
    )
    print(
        f"# overrides: {' '.join(args.set) or '(none: the shipped breakhis config)'}; logreg C={PROBE_C}; "
        "baselines fit on all non-test patients, trained heads on the same minus their validation patients"
    )
    y = np.array([r.label == "malignant" for r in records], dtype=int)
    patients = np.array([r.patient for r in records])
    results: dict = {}
    for protocol in args.protocol:
        k = None if protocol == "lopo" else args.folds
        repeats = args.nested_repeats if protocol == "nested" else args.repeats
        plan = patient_folds(records, k, repeats)
        probs, extras, spreads = {}, {}, {}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            methods = [REFERENCE, "default"] if protocol == "nested" else args.methods
            for m in methods:
                t1 = time.perf_counter()
                if m in BASELINES:
                    probs[m] = out_of_fold(BASELINES[m], feats, y, patients, plan)
                else:
                    embs: list = []
                    probs[m] = trained_oof(m, base, records, plan, Path(tmp) / m, embs)
                    sims = [similarity_of(folds, records, len(records)) for folds in embs]
                    extras[m], spreads[m] = [s[0] for s in sims], [x for s in sims for x in s[1]]
                print(f"#   {m}: {time.perf_counter() - t1:.0f} s", flush=True)
            if protocol == "nested":
                probs["nested choice"], chosen = nested(base, records, y, patients, plan, Path(tmp))
            else:
                for name, dim in (
                    ("frozen features", None),
                    (f"frozen PCA{cfg.model.embedding_dim}", cfg.model.embedding_dim),
                ):
                    sims = [
                        similarity_of(folds, records, len(records)) for folds in frozen_folds(feats, records, plan, dim)
                    ]
                    probs[name] = probs.get(REFERENCE) or out_of_fold(BASELINES[REFERENCE], feats, y, patients, plan)
                    extras[name], spreads[name] = [s[0] for s in sims], [x for s in sims for x in s[1]]
        results[protocol] = bootstrap(y, probs, extras, patients, REFERENCE, args.bootstrap)
        what = {
            "lopo": "leave-one-patient-out",
            "kfold": f"patient-grouped stratified {args.folds}-fold x {repeats} repeats",
            "nested": f"nested: outer patient-grouped {args.folds}-fold x {repeats} repeats, inner 4-fold choice "
            f"among {', '.join(NESTED_CANDIDATES)}",
        }[protocol]
        print(f"\n## {what} ({len(set(patients))} patients, {len(records)} images; {time.perf_counter() - t0:.0f} s)\n")
        if protocol == "nested":
            print(
                f"choices over the {sum(chosen.values())} outer folds: "
                + ", ".join(f"{m} {n}" for m, n in chosen.most_common())
                + "\n"
            )
            results[protocol]["choices"] = dict(chosen)
        else:
            print(
                "(frozen rows: the classification columns are logreg-tuned's; their similarity columns are the "
                "frozen features' own)\n"
            )
        print_table({m: r for m, r in results[protocol].items() if m != "choices"}, spreads)
    if args.json:
        args.json.write_text(json.dumps({"overrides": args.set, "results": results}, indent=1))


if __name__ == "__main__":
    main()
