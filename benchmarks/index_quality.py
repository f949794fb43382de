"""What the archive index finds: the approximate index against exact search, and slides ranked by their tiles.

Part 1, real patients (``--embeddings``: ``smse embed RUN ../shared/data/breakhis-sample --out FILE.npz``):
the sample's images hidden in an archive of ``--background`` vectors drawn around the k-means centroids of
those same embeddings (benchmarks/index.py's clusters), indexed twice, exact (flat) and approximate (ivfpq
with its defaults: nprobe, exact re-rank of 256 candidates from the memory-mapped vectors). Each real image
queries the index for its nearest real images of other patients (background vectors and the query's own
patient filtered out by the index's selector); precision@5 of the tumour type and of the class, and mAP@R of
the class (R: the other patients' images of the query's class), for both indexes, side by side.

Part 2, synthetic slides (``--slide-embeddings``: tile embeddings of whole slides with ``slides``, e.g.
benchmarks/mil.py's ``slides-whole-type/attention-0/embeddings.npz`` and its ``labels.csv``): leave one slide
out; its tiles query an index of every other slide's tiles with ``by="slide"`` (each query tile's k = 10
nearest tiles vote for their slides with weight 1 / rank); MV@5 = the majority label (and tumour type) of the
top 5 slides equals the query slide's. Baseline: one mean embedding per slide, its 5 nearest slides.

Run: python benchmarks/index_quality.py --embeddings REAL.npz [--background 1000000] [--slide-embeddings E.npz
--slide-labels labels.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, machine  # noqa: E402

from smse.index import Index  # noqa: E402
from smse.runfiles import load_embeddings  # noqa: E402

REAL_MAGS = [40, 100, 200, 400]
BACKGROUND_MAG = 1  # no real tile has it: the selector keeps the real images only


def average_precision_at_r(relevant: np.ndarray, r: int) -> float:
    """mAP@R of one query: the mean over the first R ranks of precision@i at the ranks that are relevant."""
    hits, total = 0, 0.0
    for i, rel in enumerate(relevant[:r], start=1):
        if rel:
            hits += 1
            total += hits / i
    return total / r if r else float("nan")


def real(args, work: Path) -> None:
    arrays = load_embeddings(args.embeddings)
    emb = arrays["embeddings"].astype(np.float32)
    n_real = len(emb)
    rng = np.random.default_rng(args.seed)
    from index import Clusters

    background = Clusters.of_embeddings(emb, args.seed, 8, 0.01, str(args.embeddings)).draw(args.background, rng)
    vectors = np.concatenate([emb, background])
    meta = {
        "slide": np.concatenate([arrays["patients"], np.full(args.background, "background")]),
        "patient": np.concatenate([arrays["patients"], np.full(args.background, "background")]),
        "label": np.concatenate([arrays["labels"], np.full(args.background, "")]),
        "tumor_type": np.concatenate([arrays["tumor_types"], np.full(args.background, "")]),
        "magnification": np.concatenate([arrays["magnifications"], np.full(args.background, BACKGROUND_MAG)]),
        "path": np.concatenate([arrays["paths"], np.char.add("/background/", np.arange(args.background).astype(str))]),
    }
    labels, types, patients = arrays["labels"], arrays["tumor_types"], arrays["patients"]
    rows = []
    for kind in ("flat", "ivfpq"):
        index = Index.build_from_arrays(
            work / kind, vectors, meta, fingerprint="benchmark", kind=kind, skip_known=False
        )
        p5_type, p5_class, map_r = [], [], []
        for q in range(n_real):
            others = patients != patients[q]
            r = int((others & (labels == labels[q])).sum())
            _, ids = index.search_vectors(
                emb[q : q + 1], max(r, 5), magnifications=REAL_MAGS, exclude_slides=[str(patients[q])]
            )
            found = ids[0][ids[0] >= 0]  # ids are row numbers: the real images come first
            hit_types = np.array([types[i] if i < n_real else "" for i in found])
            hit_labels = np.array([labels[i] if i < n_real else "" for i in found])
            p5_type.append(float(np.mean(hit_types[:5] == types[q])))
            p5_class.append(float(np.mean(hit_labels[:5] == labels[q])))
            map_r.append(average_precision_at_r(hit_labels == labels[q], r))
        rows.append((kind, index.kind, np.mean(p5_type), np.mean(p5_class), np.mean(map_r)))
    print(
        f"## real sample: {n_real} images of {len(set(patients))} patients hidden among {args.background:,} "
        f"background vectors ({len(vectors):,} in all); each image queries for other patients' images"
    )
    print("| index | tumour-type P@5 | class P@5 | class mAP@R |")
    print("|---|---|---|---|")
    for name, kind, a, b, c in rows:
        print(f"| {name} ({kind}) | {100 * a:.1f} | {100 * b:.1f} | {100 * c:.1f} |")
    (_, _, a0, b0, c0), (_, _, a1, b1, c1) = rows
    print(
        f"# approximate - exact: {100 * (a1 - a0):+.1f} / {100 * (b1 - b0):+.1f} / {100 * (c1 - c0):+.1f} points "
        "(target: within 1 point)",
        flush=True,
    )


def majority(values: list[str]) -> str:
    """The most common value; a tie goes to the one ranked first."""
    counts = Counter(values)
    top = max(counts.values())
    return next(v for v in values if counts[v] == top)


def slides(args, work: Path) -> None:
    arrays = load_embeddings(args.slide_embeddings)
    with open(args.slide_labels, newline="") as handle:
        truth = {r["slide"]: r for r in csv.DictReader(handle)}
    emb = arrays["embeddings"].astype(np.float32)
    names = arrays["slides"].astype(str)
    meta = {
        "slide": names,
        "patient": names,
        "label": np.array([truth[s]["label"] for s in names]),
        "tumor_type": np.array([truth[s]["tumor_type"] for s in names]),
        "magnification": arrays["magnifications"],
        "x": arrays["xs"],
        "y": arrays["ys"],
        "path": arrays["paths"],
    }
    index = Index.build_from_arrays(work / "slides", emb, meta, fingerprint="benchmark", kind="flat", skip_known=False)
    order = list(dict.fromkeys(names.tolist()))
    means = np.stack([emb[names == s].mean(0) for s in order])
    vote = {"class": [], "type": []}
    base = {"class": [], "type": []}
    for i, s in enumerate(order):
        result = index.search(emb[names == s], k=10, by="slide", exclude_slides=[s])
        top = [h.slide for h in result.slides[:5]]
        d = ((means - means[i]) ** 2).sum(1)
        d[i] = np.inf
        nearest = [order[j] for j in np.argsort(d)[:5]]
        for key, field in (("class", "label"), ("type", "tumor_type")):
            vote[key].append(majority([truth[t][field] for t in top]) == truth[s][field])
            base[key].append(majority([truth[t][field] for t in nearest]) == truth[s][field])
    n = len(order)
    print(f"## synthetic slides: {n} slides ({Counter(truth[s]['label'] for s in order)}), leave one slide out")
    print("| rule | MV@5 class | MV@5 tumour type |")
    print("|---|---|---|")
    print(
        f"| --by slide (tile votes, 1 / rank, k = 10) | {100 * np.mean(vote['class']):.1f} ({sum(vote['class'])}/{n}) "
        f"| {100 * np.mean(vote['type']):.1f} ({sum(vote['type'])}/{n}) |"
    )
    print(
        f"| one mean embedding per slide | {100 * np.mean(base['class']):.1f} ({sum(base['class'])}/{n}) "
        f"| {100 * np.mean(base['type']):.1f} ({sum(base['type'])}/{n}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=Path, help="smse embed of the real sample (.npz)")
    parser.add_argument("--background", type=int, default=1_000_000, help="archive vectors around the real ones")
    parser.add_argument("--slide-embeddings", type=Path, help="tile embeddings of whole slides (.npz)")
    parser.add_argument("--slide-labels", type=Path, help="labels.csv of those slides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"# archive index quality; {date.today()}; {machine()}")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        if args.embeddings:
            real(args, Path(tmp))
        if args.slide_embeddings:
            slides(args, Path(tmp))


if __name__ == "__main__":
    main()
