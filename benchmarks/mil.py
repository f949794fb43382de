"""Slide-level learning from slide labels: attention MIL against the mean (and max) of tile probabilities.

Synthetic slides (``smse synth --wsi --tumour-fraction``): malignant slides are benign tissue with tumour
regions covering a known share of the tissue; benign slides are benign throughout; labels are per slide.
Set A (``--train-slides``, other patients) trains the tile run (frozen EfficientNet-Lite0 features, the
shipped ``breakhis`` config), in two ways (``--tile-runs``): ``whole-type``, on slides whose tissue is all of
their type, so that every tile's label is right (as for a model trained on labelled images), and
``slide-labels``, on tumour-fraction slides with every tile labelled by its slide (what a user with slide
labels only has: most malignant tiles are labelled wrong). Set B (``--slides``) is then cross-validated by
patient with ``smse.train_slides``: attention, multimag, mean and max pools on the run's embeddings, and
the mean / max of its tile probabilities, on the same folds; each method's out-of-fold slide ROC-AUC and
balanced accuracy (mean and spread over ``--seeds`` fold draws), the AUC against benign slides of the
malignant slides with the smaller and the larger tumours (split at the median fraction), and localisation:
per malignant slide, the ROC-AUC of the attention per location (and of the tile probability per location)
against the true tumour mask at the location's centre; the mean over slides. Time per slide: embedding
(tile model) and slide model.

Run: python benchmarks/mil.py [--slides 72] [--train-slides 12] [--fraction 0.05-0.3] [--seeds 3]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, machine  # noqa: E402

from smse.config import load_config  # noqa: E402
from smse.metrics import roc_auc  # noqa: E402
from smse.mil.train import train_slides  # noqa: E402
from smse.pipeline import run_pipeline  # noqa: E402
from smse.runfiles import SlideRunFiles, load_embeddings  # noqa: E402
from smse.synth.wsi import generate_slides, load_slides, parse_tumour_fraction  # noqa: E402
from smse.wsi import TileSpec, write_tiles  # noqa: E402

FROZEN = ["model.freeze_backbone=true", "model.views=2", "data.split.val_fraction=0"]
SPEC = TileSpec(magnifications=(100, 200), size=(128, 128), grid=200, max_locations=120)


def slides_and_tiles(folder: Path, n: int, seed: int, fraction: tuple[float, float] | None) -> Path:
    """``n`` synthetic slides under ``folder`` and their labelled tiles (kept for reruns); the tile manifest."""
    manifest = folder / "tiles" / "manifest.csv"
    if not manifest.is_file():
        generate_slides(folder, patients=n, seed=seed, size=(2000, 1500), tumour_fraction=fraction)
        write_tiles(
            sorted((folder / "slides").iterdir()), folder / "tiles", SPEC, labels=folder / "labels.csv", progress=False
        )
    return manifest


def tile_run(folder: Path, manifest: Path, epochs: int) -> Path:
    """The tile run on a set A manifest (frozen EfficientNet-Lite0 features, the shipped breakhis config)."""
    run = folder / "run"
    if not (run / "run.json").is_file():
        cfg = load_config(
            "breakhis",
            [
                f"data.root={manifest}",
                f"out={run}",
                "data.image_size=[128, 128]",
                "data.split.test_fraction=0.25",
                f"train.epochs={epochs}",
                *FROZEN,
            ],
        )
        run_pipeline(cfg, report=False, progress=False)
    return run


def location_aucs(folder: Path, work: Path, attention: bool = True) -> tuple[list[float], list[float]]:
    """Per malignant slide of set B: ROC-AUC of the attention per location and of the tile P(malignant) per location
    against the true tumour at the location's centre."""
    truth = {s.name: s for s in load_slides(work)}
    files = SlideRunFiles(folder)
    arrays = load_embeddings(files.embeddings)
    names = [str(c) for c in arrays["class_names"]]
    p_tile = arrays["probabilities"][:, names.index("malignant")]
    att: dict[tuple[str, float, float], float] = {}
    with open(files.attention, newline="") as handle:
        for r in csv.DictReader(handle):
            key = (r["slide"], float(r["x"]), float(r["y"]))
            att[key] = att.get(key, 0.0) + float(r["attention"])
    prob: dict[tuple[str, float, float], list[float]] = {}
    for s, x, y, p in zip(arrays["slides"], arrays["xs"], arrays["ys"], p_tile):
        prob.setdefault((str(s), float(x), float(y)), []).append(float(p))
    out_att, out_prob = [], []
    for name in sorted({k[0] for k in prob}):
        slide = truth[name]
        if slide.label != "malignant":
            continue
        keys = [k for k in prob if k[0] == name]
        y = np.array([bool(slide.tumour(k[1] * slide.mpp, k[2] * slide.mpp)) for k in keys])
        if y.all() or not y.any():
            continue
        out_att.append(roc_auc(y, np.array([att.get(k, np.nan) for k in keys])))
        out_prob.append(roc_auc(y, np.array([np.mean(prob[k]) for k in keys])))
    return out_att, out_prob


def _auc(negatives: list[str], positives: list[str], score: dict[str, float]) -> float:
    y = np.array([False] * len(negatives) + [True] * len(positives))
    return roc_auc(y, np.array([score[s] for s in negatives + positives]))


def by_fraction(folder: Path, work: Path, methods: list[str]) -> dict[str, tuple[float, float, float]]:
    """Per method: slide ROC-AUC of benign vs malignant slides with tumours below / above the median fraction."""
    truth = {s.name: s for s in load_slides(work)}
    with open(SlideRunFiles(folder).predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    fractions = [truth[r["slide"]].tumour_fraction or 0.0 for r in rows if r["label"] == "malignant"]
    median = float(np.median(fractions))
    out = {}
    for m in methods:
        score = {r["slide"]: float(r[f"p_malignant_{m}"]) for r in rows}
        benign = [r["slide"] for r in rows if r["label"] == "benign"]
        small = [r["slide"] for r in rows if r["label"] == "malignant" and truth[r["slide"]].tumour_fraction < median]
        large = [r["slide"] for r in rows if r["label"] == "malignant" and truth[r["slide"]].tumour_fraction >= median]

        out[m] = (_auc(benign, small, score), _auc(benign, large, score), median)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=72, help="slides of set B (cross-validated)")
    parser.add_argument("--train-slides", type=int, default=12, help="slides of set A (train the tile run)")
    parser.add_argument("--fraction", default="0.05-0.3", help="tumour share of a malignant slide's tissue")
    parser.add_argument("--seeds", type=int, default=3, help="fold draws of the cross-validation")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the tile run")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument(
        "--tile-runs",
        nargs="+",
        default=["whole-type", "slide-labels"],
        choices=["whole-type", "slide-labels"],
        help="whole-type: the tile run learns from slides whose tissue is all of their type (every tile's label "
        "right, as for a model trained on labelled images); slide-labels: from tumour-fraction slides, every tile "
        "labelled by its slide (most malignant tiles wrong)",
    )
    args = parser.parse_args()
    fraction = parse_tumour_fraction(args.fraction)
    print(f"# slide-level learning (MIL); {date.today()}; {machine()}")
    started = time.perf_counter()
    work = OUT / f"mil-{args.fraction}-s{args.data_seed}"
    b_dir = work / f"B-{args.slides}"
    manifest = slides_and_tiles(b_dir, args.slides, args.data_seed, fraction)
    labels = b_dir / "labels.csv"
    print(f"# set B data: {time.perf_counter() - started:.0f} s", flush=True)
    for kind in args.tile_runs:
        a_dir = work / f"A-{kind}-{args.train_slides}"
        a_fraction = None if kind == "whole-type" else fraction
        run = tile_run(
            a_dir, slides_and_tiles(a_dir, args.train_slides, args.data_seed + 1000, a_fraction), args.epochs
        )
        overlap = {s.name for s in load_slides(a_dir)} & {s.name for s in load_slides(b_dir)}
        assert not overlap, f"set A and set B share slides {overlap}"
        print(f"# tile run ({kind}): {time.perf_counter() - started:.0f} s", flush=True)
        evaluate(work / f"slides-{kind}", run, manifest, labels, b_dir, kind, args)
    print(f"# total {time.perf_counter() - started:.0f} s")


def evaluate(base: Path, run: Path, manifest: Path, labels: Path, b_dir: Path, kind: str, args) -> None:
    results: dict[str, list] = {}
    locs: dict[str, tuple[list[float], list[float]]] = {}
    fractions: dict[str, list] = {}
    timing, m = None, None
    for seed in range(args.seeds):
        for pool in ("attention", "multimag"):
            folder = base / f"{pool}-{seed}"
            first = base / "attention-0"
            if folder != first and not (folder / "embeddings.npz").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                for f in ("embeddings.npz", "config.json"):
                    shutil.copy(first / f, folder / f)
            m = train_slides(run, manifest, labels, folder, [f"pool={pool}", f"seed={seed}"], show_progress=False)
            timing = timing or m["timing"]
            if pool == "attention":
                for name, r in m["methods"].items():
                    results.setdefault(name, []).append((r["roc_auc"], r["balanced_accuracy"], r["accuracy"]))
                for name, v in by_fraction(folder, b_dir, list(m["methods"])).items():
                    fractions.setdefault(name, []).append(v)
            a, p = location_aucs(folder, b_dir)
            locs.setdefault(pool, ([], []))
            locs[pool][0].extend(a)
            locs[pool][1].extend(p)
    assert m is not None and timing is not None
    print(
        f"## tile run: {kind}; set B: {m['slides']} slides ({m['class_counts']}), tumour {args.fraction} of a "
        f"malignant slide's tissue; {m['folds']}-fold CV by patient x {args.seeds} fold draws; tiles 128 px at "
        f"100X/200X, <= 120 locations a slide; tile run trained on {args.train_slides} other slides"
    )
    print("| method | slide ROC-AUC | balanced accuracy | AUC, smaller tumours | AUC, larger tumours |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        r, sd = np.mean(rows, axis=0), np.std(rows, axis=0)
        f = np.mean([v[:2] for v in fractions[name]], axis=0)
        print(f"| {name} | {r[0]:.3f} ± {sd[0]:.3f} | {100 * r[1]:.1f} ± {100 * sd[1]:.1f} | {f[0]:.3f} | {f[1]:.3f} |")
    median = fractions["attention"][0][2]
    print(f"# smaller / larger tumours: below / above the median tumour share {median:.3f}")
    print("| map | localisation ROC-AUC per malignant slide (mean ± sd) | slides x draws |")
    print("|---|---|---|")
    for pool, (a, _) in locs.items():
        print(f"| {pool} attention | {np.mean(a):.3f} ± {np.std(a):.3f} | {len(a)} |")
    p = locs["attention"][1]
    print(f"| tile P(malignant) (mean over magnifications) | {np.mean(p):.3f} ± {np.std(p):.3f} | {len(p)} |")
    print(
        f"# time per slide: embedding {timing['embedding_seconds'] / m['slides']:.2f} s (tile model, CPU); "
        f"slide model {timing['slide_model_ms_per_slide']:.1f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
