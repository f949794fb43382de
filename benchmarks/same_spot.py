"""Same-spot positives: does a tile find its own spot at another magnification, and what do classes lose?

Part 1, a real slide (``../shared/data/wsi-sample/cmu-1-small-region.svs``, Aperio SVS at 0.499 um/px):
tiled at 100X, 200X and 400X (224 x 224 px, on a grid of an 800X field), split into two spatially
disjoint halves (top: training, every spot; bottom: test, spots a 400X field apart) with a gap of one
100X tile between them, so that no test tile overlaps a training tile. Label-free same-spot training
(pair, triplet and InfoNCE on frozen EfficientNet-Lite0 features, plain and zoomed: ``model.zooms``)
against the frozen features themselves; localisation top-1 / top-5 / median rank of the test half's
tiles, within the slide, with chance beside them; trained rows over ``--seeds`` seeds.

Part 2, synthetic slides (``smse synth --wsi``, labelled; slide-disjoint split, 3 seeds): class positives,
same-spot positives and both, on the same zoomed features (and class positives on plain features); the
patient-level accuracy of the k-NN classifier, localisation top-1 and the magnification probe, mean and
spread over the seeds.

With ``--finetune N`` part 1 also trains the backbone (N epochs, pair and InfoNCE, learning rate 1e-4).

Run: python benchmarks/same_spot.py [--seeds 3] [--part real synthetic] [--finetune N]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, ROOT, machine  # noqa: E402

from smse.config import load_config  # noqa: E402
from smse.pipeline import run_pipeline  # noqa: E402
from smse.synth.wsi import generate_slides  # noqa: E402
from smse.wsi import TileSpec, write_tiles  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "wsi-sample" / "cmu-1-small-region.svs"
#: the shipped breakhis config's frozen-feature mode (pair loss, neighbourhood term, 128 dims), no validation
FROZEN = ["model.freeze_backbone=true", "model.views=2", "data.split.val_fraction=0"]


def halves(tiles: Path) -> Path:
    """The manifest with a split column: top half train, bottom half test, a 100X tile's height between them.

    The tiles are cut on a grid of an 800X field (28 um); the training half keeps them all (spots half a
    400X field apart: four times the spots of a 400X grid), the test half every other row and column (a
    grid of the 400X field, whose tiles touch, as ``smse tiles --grid 400X`` cuts them).
    """
    with open(tiles / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    xs, ys = sorted({float(r["x"]) for r in rows}), sorted({float(r["y"]) for r in rows})
    step = min(np.diff(ys).min(), np.diff(xs).min())
    middle = (ys[0] + ys[-1]) / 2
    gap = 224 * 1.0 / 0.499  # a 100X tile (224 px at 1 um/px) in level-0 px: no test tile overlaps a training tile

    def on_400x_grid(r: dict) -> bool:
        return all(round((float(r[a]) - lo) / step) % 2 == 0 for a, lo in (("x", xs[0]), ("y", ys[0])))

    kept = []
    for r in rows:
        y = float(r["y"])
        if y < middle - gap / 2:
            kept.append({**r, "split": "train", "patient": f"{r['slide']}-top"})
        elif y > middle + gap / 2 and on_400x_grid(r):
            kept.append({**r, "split": "test", "patient": f"{r['slide']}-bottom"})
    out = tiles / "halves.csv"
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0].keys(), "split"])
        writer.writeheader()
        writer.writerows(kept)
    counts = {s: sum(r["split"] == s for r in kept) for s in ("train", "test")}
    print(
        f"# real slide: {len(rows)} tiles on a grid of {step * 0.499:.0f} um; train (top, every tile) "
        f"{counts['train']}, test (bottom, a 400X field apart) {counts['test']}, the rest (gap, test half "
        "between the 400X grid) left out"
    )
    return out


def train_on(manifest: Path, out: Path, side: int, epochs: int, *overrides: str) -> dict:
    """The shipped ``breakhis`` config on ``manifest`` (square tiles of ``side`` px), trained and evaluated."""
    cfg = load_config(
        "breakhis",
        [
            f"data.root={manifest}",
            f"out={out}",
            f"data.image_size=[{side}, {side}]",
            f"train.epochs={epochs}",
            *overrides,
        ],
    )
    _, m = run_pipeline(cfg, report=False, progress=False)
    assert m is not None
    return m


def pooled(loc: dict, scope: str = "slide") -> str:
    r = loc["pooled"][scope]
    return (
        f"{100 * r['top_1']:.1f} ({100 * r['chance_top_1']:.1f}) | {100 * r['top_5']:.1f} "
        f"({100 * r['chance_top_5']:.1f}) | {r['median_rank']:g} ({r['chance_median_rank']:g}) | {r['queries']}"
    )


def real(work: Path, epochs: int, seeds: int, finetune: int = 0) -> None:
    if not REAL.exists():
        print(f"# real slide not found at {REAL}: part 1 skipped")
        return
    started = time.perf_counter()
    tiles = work / "real-tiles"
    write_tiles([REAL], tiles, TileSpec(magnifications=(100, 200, 400), size=(224, 224), grid=800), progress=False)
    manifest = halves(tiles)
    print(
        f"| representation | top-1 (chance) | top-5 (chance) | median rank (chance) | queries |  "
        f"(trained rows: mean ± sd over {seeds} seeds)"
    )
    print("|---|---|---|---|---|")
    for zooms in ("[1]", "[1, 2, 4]"):
        for metric in ("pair", "triplet", "infonce"):
            got = []
            for seed in range(seeds):
                m = train_on(
                    manifest,
                    work / f"real-{metric}-{len(zooms)}-{seed}",
                    224,
                    epochs,
                    "sampler.positives=same-spot",
                    f"loss.metric={metric}",
                    f"model.zooms={zooms}",
                    f"seed={seed}",
                    *FROZEN,
                )
                loc = m["localisation"]
                if metric == "pair" and seed == 0:  # the frozen features do not depend on the loss or the seed
                    frozen = pooled(loc["frozen_features"])
                    print(f"| frozen EfficientNet-Lite0 features, zooms {zooms} (baseline) | {frozen} |")
                got.append(loc["embedding"]["pooled"]["slide"])
            top1, top5, median = (np.array([g[k] for g in got], dtype=float) for k in ("top_1", "top_5", "median_rank"))
            g = got[0]
            print(
                f"| same-spot, label-free ({metric}), zooms {zooms} | {100 * top1.mean():.1f} ± {100 * top1.std():.1f} "
                f"({100 * g['chance_top_1']:.1f}) | {100 * top5.mean():.1f} ± {100 * top5.std():.1f} "
                f"({100 * g['chance_top_5']:.1f}) | {median.mean():.1f} ({g['chance_median_rank']:g}) | "
                f"{g['queries']} |",
                flush=True,
            )
    if finetune:  # the backbone trained too: minutes a epoch on a CPU
        for metric in ("pair", "infonce"):
            m = train_on(
                manifest,
                work / f"real-finetune-{metric}",
                224,
                finetune,
                "sampler.positives=same-spot",
                f"loss.metric={metric}",
                "model.freeze_backbone=false",
                "model.views=1",
                "data.split.val_fraction=0",
                "train.lr=0.0001",
                "sampler.batch_size=48",
            )
            print(
                f"| same-spot, label-free, fine-tuned backbone ({metric}, {finetune} epochs) | "
                f"{pooled(m['localisation']['embedding'])} |",
                flush=True,
            )
    print(f"# part 1: {time.perf_counter() - started:.0f} s")


def synthetic(work: Path, seeds: int, epochs: int) -> None:
    started = time.perf_counter()
    data = work / "synth"
    generate_slides(data, patients=12, seed=0, size=(1600, 1200), proportions="balanced", workers=1)
    slides = sorted((data / "slides").iterdir())
    write_tiles(
        slides,
        data / "tiles",
        TileSpec(magnifications=(100, 200, 400), size=(64, 64), grid=400, max_locations=150),
        labels=data / "labels.csv",
        progress=False,
    )
    manifest = data / "tiles" / "manifest.csv"
    # every kind of positives on the same zoomed features (model.zooms=auto gives spot positives [1, 2, 4]),
    # and class positives as they run by default (plain features)
    variants = {
        "class positives, zooms [1] (the default for class positives)": ["sampler.positives=class"],
        "class positives, zooms [1, 2, 4]": ["sampler.positives=class", "model.zooms=[1, 2, 4]"],
        "same-spot positives, zooms [1, 2, 4]": ["sampler.positives=same-spot"],
        "both (same-spot weight 1), zooms [1, 2, 4]": ["sampler.positives=both"],
    }
    print(
        "# synthetic: 12 slides (balanced types), 64 x 64 tiles at 100X/200X/400X (150 locations a slide), "
        f"{seeds} slide-disjoint splits"
    )
    print(
        "| positives | patient-level accuracy (k-NN) | localisation top-1 (chance) | frozen top-1 | "
        "magnification probe |"
    )
    print("|---|---|---|---|---|")
    for v, (name, overrides) in enumerate(variants.items()):
        rows = []
        for seed in range(seeds):
            m = train_on(
                manifest,
                work / f"synth-{v}-{seed}",
                64,
                epochs,
                f"data.split.seed={seed}",
                f"seed={seed}",
                "data.split.test_fraction=0.34",
                *FROZEN,
                *overrides,
            )
            loc = m["localisation"]
            rows.append(
                [
                    m["head"]["all"]["patient_accuracy"],
                    loc["embedding"]["pooled"]["slide"]["top_1"],
                    loc["embedding"]["pooled"]["slide"]["chance_top_1"],
                    loc["frozen_features"]["pooled"]["slide"]["top_1"],
                    m["magnification_probe"]["balanced_accuracy"],
                ]
            )
        r, sd = np.mean(rows, axis=0), np.std(rows, axis=0)
        print(
            f"| {name} | {100 * r[0]:.1f} ± {100 * sd[0]:.1f} | {100 * r[1]:.1f} ± {100 * sd[1]:.1f} "
            f"({100 * r[2]:.1f}) | {100 * r[3]:.1f} | {100 * r[4]:.1f} ± {100 * sd[4]:.1f} |",
            flush=True,
        )
    print(f"# part 2: {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--part", nargs="+", default=["real", "synthetic"], choices=["real", "synthetic"])
    parser.add_argument(
        "--finetune", type=int, default=0, help="also fine-tune the backbone for this many epochs (real slide)"
    )
    args = parser.parse_args()
    print(f"# same-spot positives; {date.today()}; {machine()}")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        if "real" in args.part:
            real(Path(tmp), args.epochs, args.seeds, args.finetune)
        if "synthetic" in args.part:
            synthetic(Path(tmp), args.seeds, args.epochs)


if __name__ == "__main__":
    main()
