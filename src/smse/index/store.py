"""The index folder on disk: its files, the SQLite metadata store, and the faiss index kinds.

    INDEX/
      index.json        format tag and version, the model (run, checkpoint, fingerprint, preprocessing), the
                        embedding dimension, the faiss kind and its parameters, counts (as of the last write)
      metadata.sqlite   one row per vector: table ``tiles`` (id = the vector's faiss id) and table ``meta``
                        (next id, vector count, size of vectors.faiss: written in the transaction that commits)
      vectors.faiss     the faiss index; ids = ``tiles.id``
      vectors.f32       ivfpq only: the full-precision vectors, float32 row ``id`` at byte ``id * d * 4``, read
                        memory-mapped to re-rank the approximate candidates exactly (rows of removed tiles stay
                        until the index is rebuilt)
      parts/<n>.npz     the embeddings of the n-th source (``smse embed``'s format; one per whole slide) and
                        ``parts/<n>.json`` (its source, the source's stamp and the model's fingerprint; for a slide
                        also the tiling, the resolution given and its label): a killed build or add resumes
      .lock             held while an add, a remove or a build writes the folder

Why SQLite for the metadata: it is in Python's standard library (no new dependency), transactional (an add's
rows become visible together, in one commit, or not at all), concurrent readers see the last commit while a
writer works, it answers the questions an index needs (rows by id, by slide, counts by magnification) through
indexes without loading the table, and any tool reads it (``sqlite3 INDEX/metadata.sqlite 'select * from tiles'``,
pandas, R, DuckDB). Parquet would need pyarrow, cannot delete rows in place, and has no transactions.

How a change commits (faiss file and SQLite rows together): the invariant is that the faiss file's ids are a
superset of the committed rows. An add writes the new faiss file atomically (temporary file + rename), then
commits its rows; a remove commits the deletion first, then writes the faiss file. A crash in between leaves
vectors without rows, which searches never return (hits are looked up in SQLite) and which the next open drops.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smse.errors import ConfigError, DataError, OutputError
from smse.io import atomic_path, describe, describe_error, read_text

#: the format tag of ``index.json`` and its version (a reader refuses other versions)
FORMAT = "smse-index"
VERSION = 1

#: ``kind="auto"`` picks ``flat`` (exact) below this many vectors, ``ivfpq`` from it on
FLAT_MAX = 200_000
#: the most vectors k-means sees when an ivfpq index is trained (a seeded sample)
TRAIN_SIZE = 50_000
#: k-means wants this many training vectors per centroid (faiss warns below 39)
POINTS_PER_CENTROID = 39
#: the most inverted lists
NLIST_MAX = 65_536
#: ivfpq: dimensions per PQ sub-quantiser (m = d / this where it divides d)
DIMS_PER_SUBQUANTIZER = 8
KINDS = ("flat", "ivfpq", "hnsw")

#: the metadata columns of every vector, in table order (after ``id``)
COLUMNS = ("source", "path", "slide", "patient", "label", "tumor_type", "magnification", "x", "y")
SCHEMA = """
CREATE TABLE IF NOT EXISTS tiles (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    slide TEXT NOT NULL,
    patient TEXT NOT NULL,
    label TEXT NOT NULL,
    tumor_type TEXT NOT NULL,
    magnification INTEGER NOT NULL,
    x REAL,
    y REAL
);
CREATE INDEX IF NOT EXISTS tiles_slide ON tiles(slide);
CREATE INDEX IF NOT EXISTS tiles_magnification ON tiles(magnification);
CREATE INDEX IF NOT EXISTS tiles_path ON tiles(path);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class IndexFiles:
    """The files of the index folder ``root``."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def description(self) -> Path:
        return self.root / "index.json"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.sqlite"

    @property
    def vectors(self) -> Path:
        return self.root / "vectors.faiss"

    @property
    def full_vectors(self) -> Path:
        return self.root / "vectors.f32"

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def part(self, n: int) -> Path:
        return self.parts / f"{n}.npz"

    def part_note(self, n: int) -> Path:
        return self.parts / f"{n}.json"

    def read_description(self) -> dict:
        """``index.json``, checked for the format tag, version and the fields every reader needs.

        Raises:
            DataError: naming index.json when it is missing, not JSON, another file's, or of another version.
        """
        path = self.description
        if not path.is_file():
            raise DataError(f"{path}: no index here (build one with smse index build)")
        try:
            desc = json.loads(read_text(path))
        except ValueError as exc:
            raise DataError(f"{path}: not an smse index description (not JSON: {exc})") from None
        if not isinstance(desc, dict) or desc.get("format") != FORMAT:
            raise DataError(f"{path}: not an smse index description (no format {FORMAT!r})")
        if desc.get("version") != VERSION:
            raise DataError(
                f"{path}: index format version {desc.get('version')!r}; this smse reads version {VERSION}: rebuild it"
            )
        for name, kind in (("dim", int), ("kind", str), ("fingerprint", str), ("params", dict)):
            if not isinstance(desc.get(name), kind):
                raise DataError(f"{path}: field {name!r} missing or not a {kind.__name__}")
        if desc["kind"] not in KINDS:
            raise DataError(f"{path}: field 'kind' is {desc['kind']!r}, not one of {', '.join(KINDS)}")
        return desc

    def write_description(self, desc: dict) -> None:
        with atomic_path(self.description) as tmp:
            tmp.write_text(json.dumps(desc, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------
class MetadataStore:
    """The ``tiles`` and ``meta`` tables of ``metadata.sqlite``.

    Writes run inside ``transaction()``; reads see the last commit. The connection may be used from any thread,
    by one thread at a time (callers that share it across threads hold a lock).
    """

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DataError(f"{self.path}: no metadata store (the index folder is incomplete: rebuild it)")
        try:
            # (any thread may use it, one at a time: the web page searches from a thread pool, under its lock)
            self.con = sqlite3.connect(str(self.path), isolation_level=None, timeout=30, check_same_thread=False)
            if create:
                self.con.executescript(SCHEMA)
            names = {row[0] for row in self.con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.path}: not an smse index metadata store ({exc})") from None
        if not {"tiles", "meta"} <= names:
            raise DataError(f"{self.path}: not an smse index metadata store (no tiles or meta table)")

    def close(self) -> None:
        self.con.close()

    # ---- meta ----
    def get(self, key: str, default: int = 0) -> int:
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def put(self, key: str, value: int) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(int(value))))

    @property
    def next_id(self) -> int:
        return self.get("next_id")

    @property
    def count(self) -> int:
        return self.get("count")

    # ---- writes ----
    def begin(self) -> None:
        self.con.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.con.execute("COMMIT")

    def rollback(self) -> None:
        if self.con.in_transaction:
            self.con.execute("ROLLBACK")

    def insert(self, ids: np.ndarray, columns: Mapping[str, Sequence[Any]]) -> None:
        """Rows ``ids`` with their ``COLUMNS`` (NaN x, y stored as NULL)."""

        def rows() -> Iterable[tuple]:
            for i, row in enumerate(zip(*(columns[c] for c in COLUMNS))):
                values = list(row)
                values[6] = int(values[6])
                for j in (7, 8):
                    v = values[j]
                    values[j] = None if v is None or v != v else float(v)  # NaN: unknown
                for j in range(6):
                    values[j] = str(values[j])
                yield (int(ids[i]), *values)

        self.con.executemany(f"INSERT INTO tiles(id, {', '.join(COLUMNS)}) VALUES ({', '.join('?' * 10)})", rows())

    def delete_slides(self, slides: Sequence[str]) -> np.ndarray:
        """Delete the rows of ``slides``; returns their ids."""
        ids = self.ids_where("slide", slides)
        self.con.executemany("DELETE FROM tiles WHERE slide = ?", [(s,) for s in slides])
        return ids

    # ---- reads ----
    def ids_where(self, column: str, values: Sequence[Any]) -> np.ndarray:
        """The ids of the rows whose ``column`` is one of ``values``, ascending."""
        if column not in COLUMNS:
            raise ValueError(column)
        out: list[int] = []
        values = list(values)
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            sql = f"SELECT id FROM tiles WHERE {column} IN ({', '.join('?' * len(chunk))})"
            out.extend(row[0] for row in self.con.execute(sql, chunk))
        return np.array(sorted(out), dtype=np.int64)

    def sources_of(self, slide: str) -> list[str]:
        """The sources the tiles of ``slide`` came from, sorted."""
        rows = self.con.execute("SELECT DISTINCT source FROM tiles WHERE slide = ?", (slide,)).fetchall()
        return sorted(row[0] for row in rows)

    def all_ids(self) -> np.ndarray:
        return np.fromiter((row[0] for row in self.con.execute("SELECT id FROM tiles ORDER BY id")), dtype=np.int64)

    def rows(self, ids: Iterable[int]) -> dict[int, dict]:
        """The rows of ``ids`` that exist, by id."""
        wanted = sorted({int(i) for i in ids if i >= 0})
        out: dict[int, dict] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            sql = f"SELECT id, {', '.join(COLUMNS)} FROM tiles WHERE id IN ({', '.join('?' * len(chunk))})"
            for row in self.con.execute(sql, chunk):
                out[row[0]] = dict(zip(("id", *COLUMNS), row))
        return out

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        """The ``paths`` already in the index."""
        out: set[str] = set()
        paths = list(paths)
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            sql = f"SELECT path FROM tiles WHERE path IN ({', '.join('?' * len(chunk))})"
            out.update(row[0] for row in self.con.execute(sql, chunk))
        return out

    def counts(self, column: str) -> dict[Any, int]:
        """Rows per value of ``column``, most first (then by value)."""
        if column not in COLUMNS:
            raise ValueError(column)
        rows = self.con.execute(f"SELECT {column}, COUNT(*) FROM tiles GROUP BY {column}").fetchall()
        return dict(sorted(rows, key=lambda r: (-r[1], str(r[0]))))

    def table_count(self) -> int:
        return int(self.con.execute("SELECT COUNT(*) FROM tiles").fetchone()[0])


# ---------------------------------------------------------------------------------------------------------------
# faiss
# ---------------------------------------------------------------------------------------------------------------
def import_faiss():
    """The faiss module.

    Raises:
        ConfigError: when faiss is not installed.
    """
    try:
        import faiss
    except ImportError:
        raise ConfigError("smse index needs faiss: pip install 'smse[faiss]' (faiss-cpu)") from None
    return faiss


def choose_kind(kind: str, n: int) -> str:
    """``flat``, ``ivfpq`` or ``hnsw``; ``auto`` is ``flat`` below ``FLAT_MAX`` vectors, else ``ivfpq``.

    Raises:
        ConfigError: naming ``kind`` when it is none of these.
    """
    if kind == "auto":
        return "flat" if n < FLAT_MAX else "ivfpq"
    if kind not in KINDS:
        raise ConfigError(f"kind: {kind!r} is not one of auto, {', '.join(KINDS)}")
    return kind


def default_params(kind: str, n: int, d: int, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parameters of an index of ``kind`` for ``n`` vectors of dimension ``d`` (``overrides`` win).

    - ``flat``: none; exact squared-L2 search (``IndexIDMap2(IndexFlatL2)``).
    - ``ivfpq``: ``nlist`` inverted lists (4 sqrt(n), at most ``train_size / 39`` so that each centroid is trained
      on 39 vectors, and at most 65,536); ``m`` PQ sub-quantisers (d / 8 where it divides d, else the largest
      divisor of d at most d / 8) of ``nbits`` = 8 bits, so a vector costs m bytes + 8 for its id; trained on
      ``train_size`` (50,000) vectors drawn with ``seed``; ``nprobe`` lists scanned per query (nlist / 40,
      clipped to 8..64; overridable per search); ``rerank``: the approximate top max(k, rerank) (256) are
      re-ranked by exact distances from the full vectors in ``vectors.f32`` (memory-mapped; 0 = off).
    - ``hnsw``: ``IndexHNSWFlat`` with ``hnsw_m`` (32) links per node, ``ef_construction`` (80) and
      ``ef_search`` (64; overridable per search). Keeps the full vectors in memory; removing slides rebuilds
      the graph.

    Raises:
        ConfigError: naming a parameter that is unknown or out of range.
    """
    overrides = dict(overrides or {})
    if kind == "flat":
        params: dict[str, Any] = {}
    elif kind == "ivfpq":
        train_size = int(overrides.get("train_size", TRAIN_SIZE))
        train_n = min(n, train_size)
        nlist_rule = max(1, min(round(4 * math.sqrt(max(n, 1))), train_n // POINTS_PER_CENTROID, NLIST_MAX))
        nlist = int(overrides.get("nlist", nlist_rule))
        params = {
            "nlist": nlist,
            "m": int(overrides.get("m", pq_subquantizers(d))),
            "nbits": int(overrides.get("nbits", 8)),
            "nprobe": int(overrides.get("nprobe", min(max(nlist // 40, 8), 64, nlist))),
            "train_size": train_size,
            "rerank": int(overrides.get("rerank", 256)),
            "seed": int(overrides.get("seed", 0)),
        }
        if d % params["m"]:
            raise ConfigError(f"m: {params['m']} PQ sub-quantisers do not divide the dimension {d}")
        if not 1 <= params["nbits"] <= 16:
            raise ConfigError(f"nbits: 1 to 16 bits per sub-quantiser, got {params['nbits']}")
    elif kind == "hnsw":
        params = {
            "hnsw_m": int(overrides.get("hnsw_m", 32)),
            "ef_construction": int(overrides.get("ef_construction", 80)),
            "ef_search": int(overrides.get("ef_search", 64)),
        }
    else:
        raise ConfigError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    unknown = set(overrides) - set(params)
    if unknown:
        known = ", ".join(params) or "none"
        raise ConfigError(f"{', '.join(sorted(unknown))}: not a parameter of a {kind} index ({known})")
    for name, value in params.items():
        if value < (0 if name in ("rerank", "seed") else 1):
            raise ConfigError(f"{name}: must be at least {0 if name in ('rerank', 'seed') else 1}, got {value}")
    return params


def pq_subquantizers(d: int) -> int:
    """The number of PQ sub-quantisers for dimension ``d``: d / 8 where 8 divides d, else the largest divisor of d
    at most d / 8 (at least 1)."""
    target = max(1, d // DIMS_PER_SUBQUANTIZER)
    return max(m for m in range(1, target + 1) if d % m == 0)


def ivfpq_min_vectors(params: Mapping[str, Any]) -> int:
    """The fewest vectors an ivfpq index can be trained on: 4 per PQ centroid, and one per inverted list."""
    return max(4 * 2 ** int(params["nbits"]), int(params["nlist"]))


def make_index(kind: str, d: int, params: Mapping[str, Any], sample: np.ndarray | None = None):
    """An empty faiss index of ``kind`` (trained on ``sample`` for ivfpq) whose ids are given at ``add_with_ids``."""
    faiss = import_faiss()
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatL2(d))
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, int(params["hnsw_m"]))
        inner.hnsw.efConstruction = int(params["ef_construction"])
        inner.hnsw.efSearch = int(params["ef_search"])
        return faiss.IndexIDMap2(inner)
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFPQ(quantizer, d, int(params["nlist"]), int(params["m"]), int(params["nbits"]))
    index.cp.seed = int(params["seed"])
    index.pq.cp.seed = int(params["seed"]) + 1
    if sample is None:
        raise ValueError("an ivfpq index needs a training sample")
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = int(params["nprobe"])
    return index


def read_index(path: Path, mmap: bool = False):
    """A faiss index file (``mmap``: the inverted lists memory-mapped, read only).

    Raises:
        DataError: naming the file when it is missing, truncated or not a faiss index.
    """
    faiss = import_faiss()
    if not path.is_file():
        raise DataError(f"{path}: missing (the index folder is incomplete: rebuild it)")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable faiss index (truncated or foreign file?): {reason[-200:]}") from None


def write_index(index, path: Path) -> int:
    """Write a faiss index atomically; returns its size in bytes.

    Raises:
        OutputError: naming the file when it cannot be written.
    """
    faiss = import_faiss()
    with atomic_path(path) as tmp:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as exc:
            raise OutputError(f"{path}: cannot write ({describe_error(exc)})") from None
        size = tmp.stat().st_size
    return size


def index_ids(index) -> np.ndarray:
    """Every id a faiss index of ours holds (IndexIDMap2, or an IVF index), unsorted."""
    faiss = import_faiss()
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = faiss.extract_index_ivf(index).invlists
    out = [np.zeros(0, np.int64)]
    for list_no in range(lists.nlist):
        size = lists.list_size(list_no)
        if size:
            out.append(faiss.rev_swig_ptr(lists.get_ids(list_no), size).astype(np.int64).copy())
    return np.concatenate(out)


def remove_ids(index, kind: str, params: Mapping[str, Any], ids: np.ndarray):
    """``index`` without ``ids`` (in place for flat and ivfpq; hnsw, which cannot remove, is rebuilt)."""
    faiss = import_faiss()
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return index
    if kind != "hnsw":
        index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
        return index
    held = index_ids(index)
    inner = faiss.downcast_index(index.index)
    vectors = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, index.d), np.float32)
    keep = ~np.isin(held, ids)
    rebuilt = make_index("hnsw", index.d, params)
    if keep.any():
        rebuilt.add_with_ids(np.ascontiguousarray(vectors[keep]), np.ascontiguousarray(held[keep]))
    return rebuilt


# ---------------------------------------------------------------------------------------------------------------
# full-precision vectors (ivfpq re-ranking)
# ---------------------------------------------------------------------------------------------------------------
def write_full_vectors(path: Path, start: int, vectors: np.ndarray, chunk: int = 1 << 16) -> None:
    """Write ``vectors`` as float32 rows ``start``... of ``path`` (created when missing; rows beyond are cut, the
    leftovers of an add that did not commit), flushed to disk.

    Raises:
        OutputError: naming the file when it cannot be written.
    """
    d = vectors.shape[1]
    try:
        with open(path, "r+b" if path.exists() else "w+b") as handle:
            handle.truncate(start * d * 4)
            handle.seek(start * d * 4)
            for i in range(0, len(vectors), chunk):
                handle.write(np.ascontiguousarray(vectors[i : i + chunk], dtype=np.float32).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({describe(exc)})") from None


def open_full_vectors(path: Path, rows: int, d: int) -> np.ndarray:
    """``vectors.f32`` memory-mapped as [rows, d] float32 (read only).

    Raises:
        DataError: naming the file when it is missing or shorter than ``rows`` rows (truncated).
    """
    need = rows * d * 4
    size = path.stat().st_size if path.is_file() else -1
    if size < need:
        raise DataError(
            f"{path}: {'missing' if size < 0 else f'{size} bytes'}, but the index holds {rows} rows of {d} float32 "
            f"({need} bytes): truncated; rebuild the index"
        )
    if rows == 0:
        return np.zeros((0, d), np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, d))


__all__ = [
    "FORMAT",
    "VERSION",
    "FLAT_MAX",
    "TRAIN_SIZE",
    "KINDS",
    "COLUMNS",
    "IndexFiles",
    "MetadataStore",
    "choose_kind",
    "default_params",
    "pq_subquantizers",
    "ivfpq_min_vectors",
    "make_index",
    "read_index",
    "write_index",
    "index_ids",
    "remove_ids",
    "write_full_vectors",
    "open_full_vectors",
]
