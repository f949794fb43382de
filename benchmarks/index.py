"""The archive index at scale (smse.index): query latency, recall against exact search, memory, build time.

At each size of --sizes (default 10^6 and 10^7), vectors of the default embedding's dimension
(configs/breakhis.yaml, model.embedding_dim) are drawn around cluster centroids, the index is built
with the kind ``auto`` picks (ivfpq from 200,000 vectors; --kind overrides) through the library's own
path (Index.build_from_arrays: training, faiss, SQLite rows, vectors.f32), and then, in a fresh
process, opened as a search opens it and queried one query at a time (k=10):

- p50 / p99 latency of Index.search (metadata lookup included) and of the raw vector search;
- recall@10 against exact search (a brute-force pass over the same vectors);
- memory: the faiss index (the file, read whole except ivfpq's memory-mapped lists), the process's
  anonymous resident memory after opening and querying, and, apart, vectors.f32 on disk (the
  full-precision vectors ivfpq re-ranks from, memory-mapped);
- build time.

Where the clusters come from (said in the output): --embeddings FILE.npz (``smse embed RUN
../shared/data/breakhis-sample``: k-means centroids of the real embeddings, and each cluster's own
principal axes and spreads), else --centroids FILE.npy (centroids; each cluster gets a random subspace
of --intrinsic dimensions), else 64 random unit centroids with random subspaces. Real embeddings have a low
intrinsic dimension; isotropic noise in 128 dimensions would make every neighbour nearly equidistant.

Targets (issue 22), on the 2-core machine: p50 <= 10 ms, recall@10 >= 0.95, <= 1 GB resident at 10^7.

Run: python benchmarks/index.py [--sizes 1e6 1e7] [--kind auto] [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, ROOT, machine  # noqa: E402

from smse.config import load_config  # noqa: E402
from smse.index import Index  # noqa: E402

MAGS = (40, 100, 200, 400)
TILES_PER_SLIDE = 2_000
TARGET_P50_MS = 10.0
TARGET_RECALL = 0.95
TARGET_RESIDENT = 1e9


class Column:
    """A metadata column computed from row numbers on demand: the index takes it chunk by chunk."""

    def __init__(self, n: int, make):
        self.n = n
        self.make = make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows):
        return self.make(np.arange(self.n)[rows] if isinstance(rows, slice) else np.asarray(rows))


def lazy_metadata(n: int) -> dict:
    return {
        "slide": Column(n, lambda i: np.char.add("slide", (i // TILES_PER_SLIDE).astype(str))),
        "magnification": Column(n, lambda i: np.array(MAGS)[i % 4]),
        "path": Column(n, lambda i: np.char.add(np.char.add("/bench/", i.astype(str)), ".png")),
        "x": Column(n, lambda i: (i % 97) * 350.0),
        "y": Column(n, lambda i: (i % 89) * 230.0),
        "label": Column(n, lambda i: np.where((i // TILES_PER_SLIDE) % 2 == 0, "benign", "malignant")),
    }


class Clusters:
    """Gaussian clusters: centroid + its principal axes (scaled) + a little isotropic noise, normalised."""

    def __init__(self, centroids: np.ndarray, axes: np.ndarray, noise: float, how: str):
        self.centroids = centroids.astype(np.float32)  # [c, d]
        self.axes = axes.astype(np.float32)  # [c, r, d], rows scaled by each axis's spread
        self.noise = noise
        self.how = how

    @classmethod
    def make(cls, args, d: int) -> Clusters:
        rng = np.random.default_rng(args.seed)
        r = args.intrinsic
        if args.embeddings:
            with np.load(args.embeddings) as npz:
                emb = np.asarray(npz["embeddings"], dtype=np.float32)
            return cls.of_embeddings(emb, args.seed, r, args.noise, str(args.embeddings))
        if args.centroids:
            centroids = np.load(args.centroids).astype(np.float32)
            how = f"{len(centroids)} centroids of {args.centroids}, random {r}-dimensional subspaces"
        else:
            centroids = rng.normal(size=(64, d)).astype(np.float32)
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
            how = f"64 random unit centroids (no real embeddings given), random {r}-dimensional subspaces"
        basis = np.linalg.qr(rng.normal(size=(len(centroids), centroids.shape[1], r)))[0]  # [c, d, r]
        axes = np.transpose(basis, (0, 2, 1)) * args.spread  # each axis with spread --spread
        return cls(centroids, axes, args.noise, how + f", spread {args.spread}, noise {args.noise}")

    @classmethod
    def of_embeddings(cls, emb: np.ndarray, seed: int, r: int, noise: float, source: str = "") -> Clusters:
        """k-means centroids of real embeddings ``emb`` [n, d], each cluster with its own ``r`` principal axes."""
        import faiss

        c = min(64, max(1, len(emb) // 20))
        km = faiss.Kmeans(emb.shape[1], c, niter=25, seed=seed)
        km.train(emb)
        _, assign = km.index.search(emb, 1)
        axes = np.zeros((c, r, emb.shape[1]), np.float32)
        for j in range(c):
            members = emb[assign[:, 0] == j] - km.centroids[j]
            if len(members) > 1:
                _, s, vt = np.linalg.svd(members, full_matrices=False)
                keep = min(r, len(s))
                axes[j, :keep] = vt[:keep] * (s[:keep] / np.sqrt(len(members)))[:, None]
        how = f"{c} k-means centroids of {len(emb)} real embeddings ({source}), their own {r} axes"
        return cls(km.centroids, axes, noise, how)

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        j = rng.integers(0, len(self.centroids), n)
        z = rng.normal(size=(n, self.axes.shape[1])).astype(np.float32)
        x = self.centroids[j] + np.einsum("nr,nrd->nd", z, self.axes[j])
        x += self.noise * rng.normal(size=x.shape).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_vectors(path: Path, n: int, clusters: Clusters, seed: int, chunk: int = 1_000_000) -> np.memmap:
    vectors = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, clusters.dim))
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        vectors[start : start + chunk] = clusters.draw(min(chunk, n - start), rng)
    vectors.flush()
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, clusters.dim))


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 500_000) -> tuple[np.ndarray, float]:
    """Exact top-k ids by brute force over chunks of the memory-mapped vectors; and the seconds per query."""
    import faiss

    start = time.perf_counter()
    best_d = np.full((len(queries), 0), np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for c in range(0, len(vectors), chunk):
        flat = faiss.IndexFlatL2(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors[c : c + chunk]))
        d, i = flat.search(queries, k)
        best_d = np.concatenate([best_d, d], 1)
        best_i = np.concatenate([best_i, i + c], 1)
        order = np.argsort(best_d, 1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)
    return best_i, (time.perf_counter() - start) / len(queries)


def resident() -> dict[str, int]:
    """This process's resident memory (bytes): anonymous, file-backed, and the peak."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def measure(index_path: str, queries_path: str, k: int, warmup: int) -> None:
    """In a fresh process: open the index as a search does, time single queries, print JSON."""
    queries = np.load(queries_path)
    import faiss  # noqa: F401  (imported before the baseline, like smse.index on first search)

    before = resident()
    start = time.perf_counter()
    index = Index.open(index_path)
    opened = time.perf_counter() - start
    for q in queries[:warmup]:
        index.search(q[None], k=k)
    full, raw, ids = [], [], []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], k=k)
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, found = index.search_vectors(q[None], k)
        raw.append(time.perf_counter() - t)
        ids.append(found[0])
    after = resident()
    print(
        json.dumps(
            {
                "open_s": opened,
                "search_ms": [1000 * v for v in full],
                "vector_search_ms": [1000 * v for v in raw],
                "ids": np.array(ids).tolist(),
                "anon_bytes": after["RssAnon"] - before["RssAnon"],
                "file_bytes": after["RssFile"] - before["RssFile"],
                "peak_bytes": after["VmHWM"],
            }
        )
    )


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def run_size(n: int, args, clusters: Clusters, work: Path) -> dict:
    print(f"\n== {n:,} vectors ==", flush=True)
    vectors = write_vectors(work / "vectors.raw", n, clusters, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    queries = clusters.draw(args.queries, rng)
    np.save(work / "queries.npy", queries)
    start = time.perf_counter()
    index = Index.build_from_arrays(
        work / "index",
        vectors,
        lazy_metadata(n),
        fingerprint="benchmark",
        kind=args.kind,
        skip_known=False,
        progress=True,
    )
    build_s = time.perf_counter() - start
    info = index.info()
    index.close()
    print(f"built {info['kind']} {info['params']} in {build_s:.1f} s", flush=True)
    exact, exact_s = exact_top(vectors, queries, args.k)
    done = subprocess.run(
        [sys.executable, __file__, "--measure", str(work / "index"), str(work / "queries.npy"), "--k", str(args.k)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])},
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    m = json.loads(done.stdout.strip().splitlines()[-1])
    found = np.array(m["ids"])
    recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, exact)]))
    files = info["files"]
    return {
        "vectors": n,
        "kind": info["kind"],
        "params": info["params"],
        "build_s": build_s,
        "p50_ms": float(np.percentile(m["search_ms"], 50)),
        "p99_ms": float(np.percentile(m["search_ms"], 99)),
        "vector_p50_ms": float(np.percentile(m["vector_search_ms"], 50)),
        "recall_at_10": recall,
        "faiss_index_bytes": files.get("vectors.faiss", 0),
        "resident_anon_bytes": m["anon_bytes"],
        "resident_file_bytes": m["file_bytes"],
        "full_vectors_bytes": files.get("vectors.f32", 0),
        "metadata_bytes": files.get("metadata.sqlite", 0),
        "exact_ms_per_query": 1000 * exact_s,
        "open_s": m["open_s"],
    }


def table(rows: list[dict]) -> str:
    ok = {True: "yes", False: "**no**"}
    lines = [
        "| vectors | kind | build | p50 (target <= 10 ms) | p99 | raw p50 | recall@10 (target >= 0.95) | faiss index "
        "| resident anon (target <= 1 GB at 10^7) | vectors.f32 on disk (memory-mapped) | exact search / query |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        resident_bytes = max(r["resident_anon_bytes"], r["faiss_index_bytes"])
        lines.append(
            f"| {r['vectors']:,} | {r['kind']} {', '.join(f'{k}={v}' for k, v in r['params'].items())} "
            f"| {r['build_s']:.1f} s | {r['p50_ms']:.2f} ms ({ok[r['p50_ms'] <= TARGET_P50_MS]}) "
            f"| {r['p99_ms']:.2f} ms | {r['vector_p50_ms']:.2f} ms "
            f"| {r['recall_at_10']:.3f} ({ok[r['recall_at_10'] >= TARGET_RECALL]}) | {gb(r['faiss_index_bytes'])} "
            f"| {gb(r['resident_anon_bytes'])} ({ok[resident_bytes <= TARGET_RESIDENT]}) "
            f"| {gb(r['full_vectors_bytes'])} | {r['exact_ms_per_query']:.1f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7], help="index sizes (vectors)")
    parser.add_argument("--kind", default="auto", help="auto, flat, ivfpq or hnsw")
    parser.add_argument("--dim", type=int, default=None, help="default: configs/breakhis.yaml model.embedding_dim")
    parser.add_argument("--embeddings", default=None, help=".npz of smse embed: clusters of real embeddings")
    parser.add_argument("--centroids", default=None, help=".npy of centroids [c, d]")
    parser.add_argument("--intrinsic", type=int, default=12, help="dimensions each cluster spreads in")
    parser.add_argument("--spread", type=float, default=0.15, help="std along each of a cluster's axes")
    parser.add_argument("--noise", type=float, default=0.01, help="isotropic std added in every dimension")
    parser.add_argument("--queries", type=int, default=300, help="single queries timed (and scored)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the vectors and indexes (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the indexes in --work")
    parser.add_argument("--measure", nargs=2, metavar=("INDEX", "QUERIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1], args.k, warmup=20)
        return
    d = args.dim or load_config(ROOT / "configs" / "breakhis.yaml").model.embedding_dim
    clusters = Clusters.make(args, d)  # real embeddings bring their own dimension
    print(f"# archive index, {date.today()}: {machine()}")
    print(f"vectors: {clusters.dim}-dimensional, {clusters.how}")
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            work = Path(tmp)
            rows.append(run_size(int(size), args, clusters, work))
            if args.keep and args.work:
                shutil.copytree(work / "index", Path(args.work) / f"index-{int(size)}")
        print(table(rows), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "index-benchmark.json"
    out.write_text(json.dumps({"machine": machine(), "vectors": clusters.how, "rows": rows}, indent=2))
    print(
        f"\n{table(rows)}\n\nresident anon: the searching process's anonymous memory after opening the index and "
        f"{args.queries} queries (faiss index and caches; the page cache of memory-mapped files apart)\nwrote {out}"
    )


if __name__ == "__main__":
    main()
