"""``Index``: a persistent, searchable archive of tile embeddings (build, open, add, remove, info, search).

The folder's files and why SQLite holds the metadata: ``smse.index.store``. The slide-ranking rule and the
result types: ``smse.index.search``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smse.errors import CheckpointError, ConfigError, DataError, OutputError, RunLockedError, SlideError
from smse.index.search import (
    MagnificationFilter,
    SearchResult,
    TileHit,
    magnification_from_name,
    parse_magnification_filter,
    rank_slides,
)
from smse.index.slides import (
    SLIDE_SUFFIXES,
    SlideReading,
    check_slide,
    embed_slide,
    is_slide_file,
    parse_slide_query,
    parse_tile_path,
    read_tile,
    slide_labels,
    tiling_from_dict,
    write_slide_part,
)
from smse.index.store import (
    COLUMNS,
    FLAT_MAX,
    FORMAT,
    VERSION,
    IndexFiles,
    MetadataStore,
    choose_kind,
    default_params,
    import_faiss,
    index_ids,
    ivfpq_min_vectors,
    make_index,
    open_full_vectors,
    read_index,
    remove_ids,
    write_index,
)
from smse.io import read_text, writable_folder, write_json

if TYPE_CHECKING:
    from smse.runtime import Dist
    from smse.wsi.tiles import TileSpec

log = logging.getLogger(__name__)

#: seconds an add, remove or build waits for another one on the same index before it is refused
LOCK_TIMEOUT = 2.0
#: vectors handed to faiss, vectors.f32 and SQLite at a time
CHUNK = 1 << 16
#: searches of fewer queries run on one thread: faiss's OpenMP threads cost a single query more than they give
#: (0.2 ms on one thread against 16 ms on two for a flat search of 20,000 vectors on a busy 2-core machine)
FEW_QUERIES = 16
#: how long a process of a ``torchrun`` build waits at a barrier for the others (their share of the sources)
PROCESS_WAIT = timedelta(hours=48)


class IndexLockedError(RunLockedError):
    """Another process adds to, removes from or builds the same index."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def _locked(files: IndexFiles, dist: Dist | None = None) -> Iterator[None]:
    """Hold ``INDEX/.lock`` (the first process of a ``torchrun`` job holds it for all: the others wait for it);
    refuse after ``LOCK_TIMEOUT`` seconds when another process holds it."""
    from filelock import FileLock, Timeout

    dist = dist or _alone()
    writable_folder(files.root, "index folder")
    if not dist.main:
        dist.barrier()  # the first process holds the lock
        yield
        return
    lock = FileLock(str(files.lock), timeout=LOCK_TIMEOUT)
    try:
        lock.acquire()
    except Timeout:
        raise IndexLockedError(
            f"another smse index add holds {files.root} ({files.lock} is locked by an add, remove or build): "
            "wait for it to finish, then run again; nothing was changed"
        ) from None
    try:
        dist.barrier()
        yield
    finally:
        lock.release()


def _alone() -> Dist:
    """The place of a process run alone (no ``torchrun``)."""
    from smse.runtime import Dist

    return Dist()


@contextmanager
def _processes() -> Iterator[Dist]:
    """This process's place in a ``torchrun`` job (world 1 alone). When torchrun started several processes and no
    process group is open, one is opened (gloo: only barriers cross it, on any device) with a wait of
    ``PROCESS_WAIT`` (a barrier waits for the slowest process's share of the sources), and closed after."""
    from smse.runtime import Dist

    dist = Dist.from_env()
    opened = False
    if dist.world > 1:
        import torch.distributed

        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", timeout=PROCESS_WAIT)
            opened = True
    try:
        yield dist
    finally:
        if opened:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _columns(metadata: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Every ``COLUMNS`` entry for ``n`` rows (defaults for the ones not given), each indexable by an int array.

    Raises:
        DataError: naming a column that is unknown or of another length.
    """
    unknown = set(metadata) - set(COLUMNS)
    if unknown:
        raise DataError(f"metadata: unknown column(s) {', '.join(sorted(unknown))} (known: {', '.join(COLUMNS)})")
    out: dict[str, Any] = {}
    for name in COLUMNS:
        if name in metadata:
            values = metadata[name]
            if not hasattr(values, "__getitem__") or isinstance(values, (list, tuple)):
                values = np.asarray(values)
            if len(values) != n:
                raise DataError(f"metadata: column {name!r} holds {len(values)} values for {n} embeddings")
            out[name] = values
    if "slide" not in out:
        out["slide"] = out.get("patient", np.full(n, "", dtype=object))
    if "patient" not in out:
        out["patient"] = out["slide"]
    if "tumor_type" not in out:
        out["tumor_type"] = out.get("label", np.full(n, "", dtype=object))
    defaults: dict[str, Any] = {
        "source": np.full(n, "", dtype=object),
        "path": np.full(n, "", dtype=object),
        "label": np.full(n, "", dtype=object),
        "magnification": np.zeros(n, np.int64),
        "x": np.full(n, np.nan),
        "y": np.full(n, np.nan),
    }
    for name, value in defaults.items():
        out.setdefault(name, value)
    return out


def _check_vectors(embeddings: Any, what: str = "embeddings") -> np.ndarray:
    """``embeddings`` as an [n, d] float array (a memory map stays one), checked finite chunk by chunk.

    Raises:
        DataError: naming ``what`` for another shape or NaN / infinite values.
    """
    emb = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] < 1:
        raise DataError(f"{what}: expected an [n, d] array of embeddings, got shape {emb.shape}")
    for start in range(0, len(emb), CHUNK * 4):
        block = np.asarray(emb[start : start + CHUNK * 4], dtype=np.float32)
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if len(bad):
            raise DataError(f"{what}: row {start + int(bad[0])} holds NaN or infinite values")
    return emb


class Index:
    """An archive index folder: tile embeddings in faiss, their metadata in SQLite, the model's fingerprint.

    Build one with ``Index.build`` (from a run and its sources) or ``Index.build_from_arrays`` (from embeddings),
    open it with ``Index.open``; ``add`` and ``remove`` change it in place, atomically, one writer at a time.
    """

    def __init__(self, files: IndexFiles, description: dict, store: MetadataStore, vectors, mmap: bool):
        self.files = files
        self.description = description
        self.store = store
        self._faiss = vectors
        self._mmap = mmap
        self._full: np.ndarray | None = None
        self._selectors: dict[tuple, tuple[Any, np.ndarray, int]] = {}  # filter: selector, its bitmap, ids passing
        self._model = None

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def root(self) -> Path:
        return self.files.root

    @property
    def kind(self) -> str:
        return str(self.description["kind"])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.description["params"])

    @property
    def dim(self) -> int:
        return int(self.description["dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.description["fingerprint"])

    def __len__(self) -> int:
        return self.store.count

    def __repr__(self) -> str:
        return f"Index({str(self.root)!r}, kind={self.kind}, vectors={len(self)}, dim={self.dim})"

    def close(self) -> None:
        self.store.close()
        self._faiss = None
        self._full = None

    # ------------------------------------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str | os.PathLike, mmap: bool = True) -> Index:
        """The index in folder ``path``, checked: ``index.json``'s format and fields, the metadata store, the faiss
        file (``mmap``: an ivfpq index's inverted lists are memory-mapped, read on demand) and ``vectors.f32``.

        Raises:
            DataError: naming the file that is missing, truncated or foreign, or a dimension that differs.
        """
        files = IndexFiles(path)
        if not files.root.is_dir():
            raise DataError(f"{files.root}: no such index folder")
        desc = files.read_description()
        store = MetadataStore(files.metadata)
        try:
            vectors = cls._read_vectors(files, desc, store, mmap)
        except BaseException:
            store.close()
            raise
        index = cls(files, desc, store, vectors, mmap)
        if desc["kind"] == "ivfpq" and desc["params"].get("rerank", 0):
            index._full = open_full_vectors(files.full_vectors, store.next_id, desc["dim"])
        return index

    @staticmethod
    def _read_vectors(files: IndexFiles, desc: dict, store: MetadataStore, mmap: bool):
        """The faiss index, reconciled with the committed rows (a crash between the faiss write and the SQLite commit
        leaves vectors without rows: they are dropped here, in memory; the next add or remove writes them out)."""
        recorded = store.get("faiss_bytes", -1)
        actual = files.vectors.stat().st_size if files.vectors.is_file() else -1
        # a memory map of a file cut short would fault on first touch: map only a file of the size committed
        use_mmap = mmap and desc["kind"] == "ivfpq" and recorded == actual
        vectors = read_index(files.vectors, mmap=use_mmap)
        if vectors.d != desc["dim"]:
            raise DataError(
                f"{files.vectors}: vectors of dimension {vectors.d}, but {files.description.name} says {desc['dim']}"
            )
        if vectors.ntotal != store.count:
            if use_mmap:
                vectors = read_index(files.vectors, mmap=False)
            extra = np.setdiff1d(index_ids(vectors), store.all_ids())
            if len(extra):
                log.warning("%s: %d vectors of an add that did not commit are left out", files.vectors, len(extra))
                vectors = remove_ids(vectors, desc["kind"], desc["params"], extra)
            if vectors.ntotal != store.count:
                raise DataError(
                    f"{files.vectors}: holds {vectors.ntotal} vectors, but {files.metadata.name} {store.count} rows: "
                    "the index is damaged; rebuild it"
                )
        return vectors

    # ------------------------------------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        run: str | os.PathLike,
        sources: Sequence[str | os.PathLike],
        out: str | os.PathLike,
        kind: str = "auto",
        params: Mapping[str, Any] | None = None,
        which: str = "best",
        progress: bool = True,
        *,
        tiling: TileSpec | Mapping[str, Any] | None = None,
        reading: SlideReading = SlideReading(),
        labels: Any = None,
    ) -> Index:
        """Embed ``sources`` with the model of ``run`` and write an index folder at ``out``.

        Sources: BreakHis folders, manifest CSVs, tile folders of ``smse tiles`` (their ``manifest.csv``), or
        whole-slide images (.svs, .ndpi, .mrxs, pyramidal .tiff, ...: ``smse.index.slides``), tiled as ``tiling``
        says: a ``TileSpec``, or TileSpec fields replacing those of the run's training tiling (default: that
        tiling, else ``TileSpec``'s defaults), kept in ``index.json`` for ``add`` and for slide queries.
        ``reading``: the slides' resolution where their metadata lacks it, the backend, a cap on locations.
        ``labels``: a label CSV (``slide,label[,patient][,tumor_type]``, as ``smse tiles --labels``) for the slides;
        without it their label is unknown and each slide is its own patient.

        Each source is embedded to ``out/parts/<n>.npz`` first (``smse embed``'s format; one part per slide): a
        rerun after a kill reuses the parts already written (same source, unchanged, same model, same tiling),
        then the index is assembled. Under ``torchrun`` each process embeds a share of the sources (largest first,
        each to the process with the least bytes so far) into its own parts; after a barrier the first process
        assembles the index (the index folder must be on a file system every process sees).
        ``kind``: ``auto`` (flat below ``FLAT_MAX`` vectors, else ivfpq), ``flat``, ``ivfpq`` or ``hnsw``;
        ``params`` override the kind's parameters (``smse.index.store.default_params``).

        Raises:
            OutputError: ``out`` already holds an index.
            CheckpointError: no such run or checkpoint.
            ConfigError: an unknown kind or parameter, a tiling field out of range.
            DataError: a source that is not a dataset; sources without images; a slide that cannot be opened, of
                unknown resolution, missing from ``labels``, or named like another slide.
            IndexLockedError: another process builds into ``out``.
        """
        from smse.api import load_model
        from smse.checkpoint import find_checkpoint
        from smse.runfiles import file_fingerprint

        files = IndexFiles(out)
        cls._refuse_existing(files)
        checkpoint = find_checkpoint(Path(run), which).resolve()
        fingerprint = file_fingerprint(checkpoint)
        sources = list(sources)
        if not sources:
            raise DataError("sources: give at least one BreakHis folder, manifest CSV, tile folder or slide")
        resolved = [_resolve_source(s) for s in sources]  # every source checked before any work
        if kind != "auto":
            choose_kind(kind, 0)  # an unknown kind refused before minutes of embedding
        from smse.wsi.tiles import TileSpec

        slides = _check_slides(resolved, reading, labels)
        model = load_model(checkpoint)
        spec = tiling if isinstance(tiling, TileSpec) else _resolve_tiling(model, tiling)
        with _processes() as dist, _locked(files, dist):
            parts = _embed_sources(files, checkpoint, fingerprint, resolved, progress, spec, reading, slides, dist)
            if dist.main:
                emb, columns = _read_parts(files, parts)
                cls._create(
                    files,
                    emb,
                    columns,
                    {
                        "run": str(Path(run).resolve()),
                        "checkpoint": str(checkpoint),
                        "fingerprint": fingerprint,
                        "preprocessing": model.data_config,
                        "classes": list(model.classes),
                        "sources": [str(p) for p in resolved],
                        "tiling": spec.to_dict(),
                        "slide_mpp": {str(p): reading.mpp for p in slides} if reading.mpp is not None else {},
                    },
                    kind,
                    params,
                    skip_known=True,
                    progress=progress,
                )
            dist.barrier()  # the index is written: every process opens it
        return cls.open(out)

    @classmethod
    def build_from_arrays(
        cls,
        out: str | os.PathLike,
        embeddings: Any,
        metadata: Mapping[str, Any] | None = None,
        *,
        fingerprint: str,
        kind: str = "auto",
        params: Mapping[str, Any] | None = None,
        run: str = "",
        checkpoint: str = "",
        preprocessing: Mapping[str, Any] | None = None,
        skip_known: bool = True,
        progress: bool = False,
    ) -> Index:
        """An index at ``out`` of ``embeddings`` [n, d] (an array or a ``np.memmap``) and their ``metadata`` (columns
        of ``smse.index.store.COLUMNS``, each of n values; missing ones get defaults: slide = patient, tumour type =
        label, magnification 0), embedded by the model of ``fingerprint``. ``Index.build`` calls it after embedding.

        ``skip_known``: rows whose path repeats an earlier row's are left out (False: every row is indexed).

        Raises:
            OutputError: ``out`` already holds an index.
            DataError: no embeddings, a non-finite one, or metadata of another length.
            ConfigError: an unknown kind or parameter, or too few vectors to train an ivfpq index.
        """
        files = IndexFiles(out)
        cls._refuse_existing(files)
        model = {
            "run": run,
            "checkpoint": checkpoint,
            "fingerprint": fingerprint,
            "preprocessing": dict(preprocessing or {}),
            "classes": [],
            "sources": [],
        }
        with _locked(files):
            cls._create(files, embeddings, metadata or {}, model, kind, params, skip_known, progress)
        return cls.open(out)

    @staticmethod
    def _refuse_existing(files: IndexFiles) -> None:
        if files.description.exists():
            raise OutputError(
                f"{files.root}: already holds an index ({files.description.name}); add to it with smse index add, "
                "or choose another --out"
            )

    @classmethod
    def _create(
        cls,
        files: IndexFiles,
        embeddings: Any,
        metadata: Mapping[str, Any],
        model: dict,
        kind: str,
        params: Mapping[str, Any] | None,
        skip_known: bool,
        progress: bool,
    ) -> None:
        start = time.perf_counter()
        emb = _check_vectors(embeddings)
        n, d = emb.shape
        columns = _columns(metadata, n)
        keep = _unique_paths(columns["path"]) if skip_known else np.arange(n)
        if len(keep) == 0:
            raise DataError(f"{files.root}: no embeddings to index")
        kind = choose_kind(kind, len(keep))
        params = default_params(kind, len(keep), d, params)
        sample = None
        if kind == "ivfpq":
            least = ivfpq_min_vectors(params)
            if len(keep) < least:
                raise ConfigError(
                    f"kind ivfpq: needs at least {least} vectors to train its quantisers, the sources hold "
                    f"{len(keep)}; use --kind flat (exact, and fast at this size)"
                )
            rng = np.random.default_rng(params["seed"])
            chosen = np.sort(rng.choice(len(keep), min(len(keep), params["train_size"]), replace=False))
            sample = np.asarray(emb[keep[chosen]], dtype=np.float32)
        for stale in (files.metadata, files.vectors, files.full_vectors):  # a killed build's leftovers
            if stale.exists():
                stale.unlink()
        vectors = make_index(kind, d, params, sample)
        store = MetadataStore(files.metadata, create=True)
        try:
            store.begin()
            _append(vectors, store, files, kind, params, emb, columns, keep, 0, progress)
            size = write_index(vectors, files.vectors)
            store.put("next_id", len(keep))
            store.put("count", len(keep))
            store.put("faiss_bytes", size)
            store.commit()
            desc = {
                "format": FORMAT,
                "version": VERSION,
                "smse_version": _smse_version(),
                "created": _now(),
                "updated": _now(),
                **model,
                "dim": int(d),
                "metric": "squared-l2",
                "kind": kind,
                "params": params,
                "counts": {"vectors": store.count, "slides": len(store.counts("slide"))},
                "build_seconds": round(time.perf_counter() - start, 3),
            }
        except BaseException:
            store.rollback()
            store.close()
            raise
        store.close()
        files.write_description(desc)  # written last: its presence says the build finished
        log.info("%s: %d vectors, %s index %s", files.root, len(keep), kind, params)

    # ------------------------------------------------------------------------------------------------ add / remove
    def add(
        self,
        sources: Sequence[str | os.PathLike],
        progress: bool = True,
        *,
        reading: SlideReading = SlideReading(),
        labels: Any = None,
    ) -> dict[str, int]:
        """Embed ``sources`` with the index's model and add their tiles (those whose path is not in the index yet).

        Sources as for ``build``; whole-slide images are tiled with the index's tiling (``index.json``), read as
        ``reading`` says and labelled from ``labels``. The tiles' rows and vectors are committed together or not
        at all; a second add (or remove) on the same index is refused while one runs. Under ``torchrun`` the
        processes share the embedding as in ``build``; the first one adds. Returns ``{"added": n, "skipped": m}``
        (m: tiles already in the index), on every process.

        Raises:
            IndexLockedError: another process writes the index.
            CheckpointError: the index's checkpoint is gone or was trained again (another fingerprint).
            ConfigError, DataError: as for ``build``; a slide named like a slide of another file in the index.
        """
        sources = list(sources)
        if not sources:
            raise DataError("sources: give at least one BreakHis folder, manifest CSV, tile folder or slide")
        resolved = [_resolve_source(s) for s in sources]
        checkpoint = self._checked_checkpoint()
        slides = _check_slides(resolved, reading, labels)
        for path in slides:  # a slide id is one file's: another file of the same name would merge into it
            others = [o for o in self.store.sources_of(path.stem) if o != str(path) and is_slide_file(o)]
            if others:  # (its tiles of smse tiles, from a manifest, are the same slide's)
                raise DataError(
                    f"{path}: the index holds a slide {path.stem!r} from another file ({others[0]}); rename one, or "
                    f"remove it first (smse index remove {self.root} --slide {path.stem})"
                )
        spec = self.tiling()
        with _processes() as dist, _locked(self.files, dist):
            parts = _embed_sources(
                self.files, checkpoint, self.fingerprint, resolved, progress, spec, reading, slides, dist
            )
            report = {"added": 0, "skipped": 0}
            if dist.main:
                emb, columns = _read_parts(self.files, parts)
                report = self._add_locked(emb, columns, skip_known=True, progress=progress)
                self.description["sources"] = [*self.description.get("sources", []), *map(str, resolved)]
                if reading.mpp is not None:
                    self.description["slide_mpp"] = {
                        **self.description.get("slide_mpp", {}),
                        **{str(p): reading.mpp for p in slides},
                    }
                self._write_description()
            if dist.world > 1:
                import torch.distributed

                shared = [report]
                torch.distributed.broadcast_object_list(shared, src=0)
                report = shared[0]
        if not dist.main:  # the first process changed the index: read it again
            self._reopen()
        return report

    def _reopen(self) -> None:
        """Read the index's files again (another process changed them)."""
        fresh = Index.open(self.root, self._mmap)
        self.store.close()
        self.description, self.store, self._faiss, self._full = (
            fresh.description,
            fresh.store,
            fresh._faiss,
            fresh._full,
        )
        self._selectors.clear()

    def tiling(self) -> TileSpec:
        """How whole slides are tiled for this index (``index.json``'s ``tiling``: the run's training tiling, else
        ``TileSpec``'s defaults, as the index was built); an index without one (built from embeddings, or before
        slides were sources) tiles as its run does."""
        found = self.description.get("tiling")
        if isinstance(found, Mapping):
            return tiling_from_dict(found, str(self.files.description))
        return _resolve_tiling(self.model())

    def add_arrays(
        self,
        embeddings: Any,
        metadata: Mapping[str, Any] | None = None,
        *,
        fingerprint: str | None = None,
        skip_known: bool = True,
    ) -> dict[str, int]:
        """Add ``embeddings`` [n, d] with their ``metadata`` (as for ``build_from_arrays``); ``fingerprint``: the
        model that embedded them, refused when it is not the index's.

        Raises:
            CheckpointError: ``fingerprint`` differs from the index's.
            DataError: another dimension, a non-finite embedding, metadata of another length.
            IndexLockedError: another process writes the index.
        """
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise CheckpointError(
                f"{self.files.description}: the index was built with model {self.fingerprint[:12]}, the embeddings "
                f"come from model {fingerprint[:12]}: embeddings of another model cannot be compared"
            )
        emb = _check_vectors(embeddings)
        self._check_dim(emb.shape[1], "embeddings")
        columns = _columns(metadata or {}, len(emb))
        with _locked(self.files):
            report = self._add_locked(emb, columns, skip_known, progress=False)
            self._write_description()
        return report

    def _add_locked(self, emb: Any, columns: dict[str, Any], skip_known: bool, progress: bool) -> dict[str, int]:
        emb = _check_vectors(emb)
        self._check_dim(emb.shape[1], "embeddings")
        keep = _unique_paths(columns["path"]) if skip_known else np.arange(len(emb))
        if skip_known and len(keep):
            paths = [str(columns["path"][i]) for i in keep]
            known = self.store.known_paths(paths)
            if known:
                keep = np.array([i for i, p in zip(keep, paths) if p not in known], dtype=np.int64)
        skipped = len(emb) - len(keep)
        if len(keep) == 0:
            return {"added": 0, "skipped": skipped}
        vectors = self._writable_vectors()
        start = self.store.next_id
        self.store.begin()
        try:
            _append(vectors, self.store, self.files, self.kind, self.params, emb, columns, keep, start, progress)
            size = write_index(vectors, self.files.vectors)  # the new vectors first, then the rows: one commit
            self.store.put("next_id", start + len(keep))
            self.store.put("count", self.store.count + len(keep))
            self.store.put("faiss_bytes", size)
            self.store.commit()
        except BaseException:
            self.store.rollback()
            self._faiss = None  # reread on next use: the in-memory index may hold the uncommitted vectors
            raise
        self._after_change(vectors)
        if self.kind == "flat" and self.store.count >= FLAT_MAX:
            log.warning(
                "%s: a flat (exact) index of %d tiles; searches slow down linearly from here: rebuild it with "
                "--kind ivfpq (or auto)",
                self.root,
                self.store.count,
            )
        return {"added": int(len(keep)), "skipped": int(skipped)}

    def remove(self, slide: str | Sequence[str]) -> int:
        """Remove every tile of ``slide`` (one name or several); returns how many were removed.

        Raises:
            DataError: naming the slides the index does not hold (nothing is removed then).
            IndexLockedError: another process writes the index.
        """
        slides = [slide] if isinstance(slide, str) else list(slide)
        if not slides:
            raise DataError("slide: give at least one slide to remove")
        with _locked(self.files):
            missing = [s for s in slides if not len(self.store.ids_where("slide", [s]))]
            if missing:
                raise DataError(
                    f"{self.root}: holds no slide {', '.join(map(repr, missing))} (smse index info lists the slides); "
                    "nothing was removed"
                )
            vectors = self._writable_vectors()
            self.store.begin()
            try:  # the rows first, then the vectors: between the two, vectors without rows are never returned
                ids = self.store.delete_slides(slides)
                self.store.put("count", self.store.count - len(ids))
                self.store.commit()
            except BaseException:
                self.store.rollback()
                raise
            vectors = remove_ids(vectors, self.kind, self.params, ids)
            size = write_index(vectors, self.files.vectors)
            self.store.begin()
            self.store.put("faiss_bytes", size)
            self.store.commit()
            self._after_change(vectors)
            self._write_description()
        return int(len(ids))

    def _writable_vectors(self):
        """The faiss index in memory (a memory-mapped one cannot change), reconciled with the committed rows."""
        if self._faiss is None or (self._mmap and self.kind == "ivfpq"):
            return self._read_vectors(self.files, self.description, self.store, mmap=False)
        return self._faiss

    def _after_change(self, vectors) -> None:
        self._faiss = vectors
        self._selectors.clear()
        if self.kind == "ivfpq" and self.params.get("rerank", 0):
            self._full = open_full_vectors(self.files.full_vectors, self.store.next_id, self.dim)

    def _write_description(self) -> None:
        self.description["updated"] = _now()
        self.description["counts"] = {"vectors": self.store.count, "slides": len(self.store.counts("slide"))}
        self.files.write_description(self.description)

    def _check_dim(self, d: int, what: str) -> None:
        if d != self.dim:
            raise DataError(
                f"{what}: {d}-dimensional, but {self.files.description} holds {self.dim}-dimensional embeddings: "
                "they come from another model"
            )

    # ------------------------------------------------------------------------------------------------ model
    def _checked_checkpoint(self) -> Path:
        """The index's checkpoint, refused when it is gone or no longer the one that built the index."""
        from smse.runfiles import file_fingerprint

        name = self.description.get("checkpoint") or ""
        if not name:
            raise CheckpointError(
                f"{self.files.description}: this index was built from embeddings, without a checkpoint: "
                "search it with embeddings, add embeddings with add_arrays"
            )
        checkpoint = Path(name)
        if not checkpoint.is_file():
            raise CheckpointError(
                f"{checkpoint}: the checkpoint that built this index ({self.files.description}) is gone; "
                "restore it, or search with embeddings of its model"
            )
        found = file_fingerprint(checkpoint)
        if found != self.fingerprint:
            raise CheckpointError(
                f"{checkpoint}: fingerprint {found[:12]}, but {self.files.description} was built with "
                f"{self.fingerprint[:12]}: the run was trained again since; rebuild the index with its new model"
            )
        return checkpoint

    def model(self):
        """The index's model (``smse.api.Model``), loaded once, its checkpoint checked against the fingerprint."""
        if self._model is None:
            from smse.api import load_model

            self._model = load_model(self._checked_checkpoint())
        return self._model

    def embed(self, images: Any) -> np.ndarray:
        """Embeddings of ``images`` (paths, PIL images, uint8 arrays or tensors) with the index's model."""
        return self.model().embed(images)

    def tile_image(self, tile_id: int):
        """The tile ``tile_id`` of the index as a PIL RGB image: an indexed image file is read, a tile of a whole
        slide is cut again from the slide file its row records (at its centre and magnification, the index's tile
        size). Paths come from the index's own rows only.

        Raises:
            KeyError: the index holds no tile ``tile_id``.
            ImageError: the image file cannot be read any more.
            SlideError: the slide file is gone or cannot be read.
        """
        row = self.store.rows([int(tile_id)]).get(int(tile_id))
        if row is None:
            raise KeyError(tile_id)
        return self.row_image(row)

    def row_image(self, row: Mapping):
        """``tile_image`` of a metadata row already looked up (reads files only: no query of the store)."""
        from smse.data.images import read_image

        tile = parse_tile_path(row["path"])
        if tile is None:
            return read_image(row["path"])
        found = self.description.get("tiling")
        size = tuple(found["size"]) if isinstance(found, Mapping) and "size" in found else self.tiling().size
        mpp = (self.description.get("slide_mpp") or {}).get(tile.file)
        return read_tile(tile, (int(size[0]), int(size[1])), mpp)

    # ------------------------------------------------------------------------------------------------ search
    def search(
        self,
        queries: Any,
        k: int = 10,
        magnification: MagnificationFilter = "any",
        by: str = "tile",
        *,
        query_magnifications: Sequence[int | None] | None = None,
        fingerprint: str | None = None,
        names: Sequence[str] | None = None,
        exclude_slides: Sequence[str] = (),
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
        reading: SlideReading = SlideReading(),
        progress: bool = False,
    ) -> SearchResult:
        """The nearest index tiles of each query (``by="tile"``), or the slides they vote for (``by="slide"``).

        Args:
            queries: images (a path, a PIL image, a uint8 array, or a list of them), embedded with the index's model;
                whole slides (``SLIDE.svs``: each of its tiles is a query, named by its ``tile_path``, of known
                magnification) or regions of them (``SLIDE.svs@x,y,w,h``, level-0 pixels: the tiles whose centre
                lies in the box), tiled as the index's slides are (``tiling``) and read as ``reading`` says;
                or embeddings, a float array [n, d] (or [d]) of the index's model (``fingerprint``: that model's
                checkpoint fingerprint, checked when given).
            k: neighbours per query tile; above the index's size, every tile is returned. With ``by="slide"`` it is
                also the most slides returned.
            magnification: ``any``; ``same`` (each query's own: from ``query_magnifications``, else from a BreakHis
                or ``smse tiles`` file name); or a list of magnifications (``[40, 100]`` or ``"40X,100X"``).
            by: ``tile`` or ``slide`` (the rule: ``smse.index.search``).
            names: how the queries are named in the result (default: their paths, or ``<query i>``).
            exclude_slides: slides never returned (e.g. the query's own slide).
            nprobe: ivfpq: inverted lists scanned per query (default: the index's ``nprobe``).
            ef_search: hnsw: the search's candidate list length (default: the index's ``ef_search``).
            rerank: ivfpq: candidates re-ranked by exact distance (default: the index's ``rerank``; 0: approximate
                distances only).
            reading: query slides' resolution where their metadata lacks it, the backend, a cap on locations.
            progress: show the embedding of query slides.

        Raises:
            ConfigError: ``k`` below 1, an unknown ``by`` or ``magnification``, ``same`` for a query of unknown
                magnification, a search parameter below 1, a region that is not ``SLIDE@x,y,w,h``.
            CheckpointError: ``fingerprint`` is not the index's model, or its checkpoint changed since (images).
            DataError: an empty index; embeddings of another dimension or not finite.
            ImageError: a query that is not a readable image.
            SlideError: a query slide that cannot be read, holds no tissue, or a region without tissue (naming
                the query).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k: the number of neighbours must be an integer of at least 1, got {k!r}")
        if by not in ("tile", "slide"):
            raise ConfigError(f"by: tile or slide, got {by!r}")
        mags = parse_magnification_filter(magnification)
        if len(self) == 0:
            raise DataError(f"{self.root}: the index holds no vectors (add sources with smse index add)")
        if isinstance(mags, tuple):
            held = sorted(int(m) for m in self.store.counts("magnification"))
            if not set(mags) & set(held):
                from smse.data.records import mag_name

                raise ConfigError(
                    f"magnification: the index holds {', '.join(mag_name(m) for m in held)} tiles, none at "
                    f"{', '.join(mag_name(m) for m in mags)}"
                )
        vectors, query_names, name_mags = self._queries(queries, fingerprint, reading, progress)
        if names is not None:
            if len(names) != len(vectors):
                raise ConfigError(f"names: {len(names)} names for {len(vectors)} queries")
            query_names = [str(n) for n in names]
        if query_magnifications is not None:
            if len(query_magnifications) != len(vectors):
                raise ConfigError(
                    f"query_magnifications: {len(query_magnifications)} values for {len(vectors)} queries"
                )
            name_mags = [None if m is None else int(m) for m in query_magnifications]
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for q in range(len(vectors)):
            key: tuple[int, ...] | None
            if mags == "any":
                key = None
            elif mags == "same":
                if not name_mags[q]:
                    raise ConfigError(
                        f"magnification same: the magnification of query {query_names[q]} is unknown (not a BreakHis "
                        "or smse tiles file name); give it (query_magnifications, or --magnification 40X,...)"
                    )
                key = (int(name_mags[q] or 0),)
            else:
                key = tuple(int(m) for m in mags)
            groups.setdefault(key, []).append(q)
        dist = [np.zeros(0, np.float32)] * len(vectors)
        ids = [np.zeros(0, np.int64)] * len(vectors)
        for key, members in groups.items():
            found_d, found_i = self.search_vectors(
                vectors[members],
                k,
                magnifications=key,
                exclude_slides=exclude_slides,
                nprobe=nprobe,
                ef_search=ef_search,
                rerank=rerank,
            )
            for position, q in enumerate(members):
                dist[q], ids[q] = found_d[position], found_i[position]
        rows = self.store.rows(np.concatenate(ids) if ids else [])
        tiles: list[list[TileHit]] = []
        for q in range(len(vectors)):
            hits: list[TileHit] = []
            for distance, i in zip(dist[q], ids[q]):
                row = rows.get(int(i))
                if row is None:  # a vector of an add that did not commit
                    continue
                hits.append(
                    TileHit(
                        query=q,
                        rank=len(hits) + 1,
                        id=int(i),
                        distance=float(distance),
                        slide=row["slide"],
                        patient=row["patient"],
                        label=row["label"],
                        tumor_type=row["tumor_type"],
                        magnification=int(row["magnification"]),
                        x=row["x"],
                        y=row["y"],
                        path=row["path"],
                        source=row["source"],
                    )
                )
            tiles.append(hits)
        result = SearchResult(by=by, queries=query_names, tiles=tiles)
        if by == "slide":
            result.slides = rank_slides(tiles, k)
        return result

    def _queries(
        self, queries: Any, fingerprint: str | None, reading: SlideReading = SlideReading(), progress: bool = False
    ) -> tuple[np.ndarray, list[str], list[int | None]]:
        """Query embeddings, names and magnifications (from image names; a slide's tiles' own), in query order."""
        try:
            import torch

            if isinstance(queries, torch.Tensor) and queries.is_floating_point() and queries.ndim <= 2:
                queries = queries.detach().cpu().numpy()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        if isinstance(queries, np.ndarray) and np.issubdtype(queries.dtype, np.floating) and queries.ndim <= 2:
            if fingerprint is not None and fingerprint != self.fingerprint:
                raise CheckpointError(
                    f"{self.files.description}: the index was built with model {self.fingerprint[:12]}, the queries "
                    f"were embedded by model {fingerprint[:12]}: embeddings of another model cannot be compared"
                )
            vectors = np.atleast_2d(np.asarray(queries, dtype=np.float32))
            self._check_dim(vectors.shape[1], "queries")
            if not np.isfinite(vectors).all():
                raise DataError("queries: embeddings hold NaN or infinite values")
            n = len(vectors)
            return np.ascontiguousarray(vectors), [f"<query {i}>" for i in range(n)], [None] * n
        items = list(queries) if isinstance(queries, (list, tuple)) else [queries]
        if not items:
            raise DataError("queries: no images given")
        kinds = [parse_slide_query(x) if isinstance(x, (str, os.PathLike)) else None for x in items]
        blocks: list[np.ndarray] = []
        names: list[str] = []
        mags: list[int | None] = []
        images: list[int] = []

        def flush() -> None:
            if not images:
                return
            named = [str(items[i]) if isinstance(items[i], (str, os.PathLike)) else f"<image {i}>" for i in images]
            blocks.append(np.asarray(self.embed([items[i] for i in images]), dtype=np.float32))
            names.extend(named)
            mags.extend(
                magnification_from_name(n) if isinstance(items[i], (str, os.PathLike)) else None
                for n, i in zip(named, images)
            )
            images.clear()

        for i, kind in enumerate(kinds):
            if kind is None:
                images.append(i)
                continue
            flush()
            tiles = embed_slide(
                self.model(), kind.path, self.tiling(), reading, kind.region, query=kind.text, progress=progress
            )
            if not len(tiles.embeddings):
                raise SlideError(f"{kind.text}: no tissue found, so no tiles to search with; check the slide")
            blocks.append(tiles.embeddings)
            names.extend(tiles.paths)
            mags.extend(int(m) for m in tiles.magnifications)
        flush()
        vectors = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        self._check_dim(vectors.shape[1], "queries")
        return np.ascontiguousarray(vectors, dtype=np.float32), names, mags

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int,
        magnifications: Sequence[int] | None = None,
        exclude_slides: Sequence[str] = (),
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The raw search: (squared distances, ids) [n, min(k, size)], nearest first, -1 / inf where fewer tiles
        pass the filter; only tiles of ``magnifications`` (None: all) and not of ``exclude_slides``."""
        faiss = import_faiss()
        if self._faiss is None:
            self._faiss = self._read_vectors(self.files, self.description, self.store, self._mmap)
        vectors = self._faiss
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ntotal = int(vectors.ntotal)
        kk = min(int(k), ntotal)
        if kk == 0 or len(queries) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        selector = self._selector(magnifications, exclude_slides)
        params = self.params
        fetch = kk
        sp: Any = None
        if self.kind == "ivfpq":
            rerank = params.get("rerank", 0) if rerank is None else rerank
            if rerank < 0:
                raise ConfigError(f"rerank: at least 0, got {rerank}")
            if rerank and self._full is None:
                self._full = open_full_vectors(self.files.full_vectors, self.store.next_id, self.dim)
            fetch = min(max(kk, rerank), ntotal)
            sp = faiss.SearchParametersIVF()
            sp.nprobe = _positive("nprobe", params["nprobe"] if nprobe is None else nprobe)
        elif self.kind == "hnsw":
            sp = faiss.SearchParametersHNSW()
            sp.efSearch = max(_positive("ef_search", params["ef_search"] if ef_search is None else ef_search), kk)
        elif selector is not None:
            sp = faiss.SearchParameters()
        if selector is not None:
            sp.sel = selector
        with _threads(faiss, 1 if len(queries) < FEW_QUERIES else None):
            dist, ids = vectors.search(queries, fetch, params=sp)
            if self.kind == "ivfpq" and selector is not None:
                # a filter keeps few of the probed lists' tiles: widen the probe (x4 each time, up to every
                # list) for the queries that came back short, while enough tiles pass the filter
                passing = min(self._passing(magnifications, exclude_slides), fetch)
                short = (ids[:, :passing] < 0).any(axis=1)
                nlist = int(faiss.extract_index_ivf(vectors).nlist)
                while short.any() and sp.nprobe < nlist:
                    sp.nprobe = min(nlist, sp.nprobe * 4)
                    d2, i2 = vectors.search(queries[short], fetch, params=sp)
                    dist[short], ids[short] = d2, i2
                    short = (ids[:, :passing] < 0).any(axis=1)
        if self.kind == "ivfpq" and rerank:
            dist, ids = self._rerank(queries, ids, kk)
        dist, ids = dist[:, :kk], ids[:, :kk]
        dist = np.where(ids < 0, np.inf, dist).astype(np.float32)
        return dist, ids.astype(np.int64)

    def _rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of each query's candidates ``ids``, by exact squared distance from ``vectors.f32``."""
        full = self._full
        assert full is not None
        out_d = np.full((len(queries), k), np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        for q in range(len(queries)):
            cand = ids[q][ids[q] >= 0]
            if not len(cand):
                continue
            diff = np.asarray(full[cand], dtype=np.float32) - queries[q]
            d = np.einsum("ij,ij->i", diff, diff)
            order = np.argsort(d, kind="stable")[:k]
            out_d[q, : len(order)] = d[order]
            out_i[q, : len(order)] = cand[order]
        return out_d, out_i

    def _passing(self, magnifications: Sequence[int] | None, exclude_slides: Sequence[str]) -> int:
        """How many tiles pass the filter (counted when its selector was built)."""
        key = (None if magnifications is None else tuple(sorted(magnifications)), tuple(sorted(exclude_slides)))
        return self._selectors[key][2]

    def _selector(self, magnifications: Sequence[int] | None, exclude_slides: Sequence[str]):
        """A faiss ``IDSelectorBitmap`` of the ids that pass the filter (None: every id passes); cached."""
        if magnifications is None and not exclude_slides:
            return None
        key = (None if magnifications is None else tuple(sorted(magnifications)), tuple(sorted(exclude_slides)))
        if key not in self._selectors:
            faiss = import_faiss()
            n = max(self.store.next_id, 1)
            allowed = np.zeros(n, bool)
            if magnifications is None:
                allowed[:] = True
            else:
                allowed[self.store.ids_where("magnification", list(magnifications))] = True
            if exclude_slides:
                allowed[self.store.ids_where("slide", list(exclude_slides))] = False
            bitmap = np.packbits(allowed, bitorder="little")
            passing = int(allowed.sum())
            self._selectors[key] = (faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap)), bitmap, passing)
        return self._selectors[key][0]

    # ------------------------------------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        """What the index holds: counts (vectors, slides; by slide, magnification and label, from SQLite), the kind
        and its parameters, the model, and the size of each file; ``memory``: the faiss index (read whole, except
        an ivfpq index's inverted lists, which are memory-mapped) and, apart, the full-precision vectors that ivfpq
        re-ranks from (on disk, memory-mapped: only the rows read stay in the page cache)."""
        from smse.data.records import mag_name

        sizes = {}
        for path in (self.files.description, self.files.metadata, self.files.vectors, self.files.full_vectors):
            if path.exists():
                sizes[path.name] = path.stat().st_size
        parts = sum(p.stat().st_size for p in self.files.parts.glob("*")) if self.files.parts.is_dir() else 0
        sizes["parts"] = parts
        by_slide = self.store.counts("slide")
        desc = self.description
        return {
            "path": str(self.root),
            "format": f"{desc['format']} {desc['version']}",
            "kind": self.kind,
            "params": self.params,
            "metric": desc.get("metric", "squared-l2"),
            "dim": self.dim,
            "vectors": len(self),
            "slides": len(by_slide),
            "by_slide": by_slide,
            "by_magnification": {
                mag_name(int(m)): c for m, c in sorted(self.store.counts("magnification").items(), key=lambda i: i[0])
            },
            "by_label": self.store.counts("label"),
            "run": desc.get("run", ""),
            "checkpoint": desc.get("checkpoint", ""),
            "fingerprint": self.fingerprint,
            "preprocessing": desc.get("preprocessing", {}),
            "sources": desc.get("sources", []),
            "tiling": desc.get("tiling"),
            "created": desc.get("created"),
            "updated": desc.get("updated"),
            "files": sizes,
            "memory": {
                "faiss_index_bytes": sizes.get(self.files.vectors.name, 0),
                "faiss_index_memory_mapped": self._mmap and self.kind == "ivfpq",
                "full_vectors_bytes_on_disk": sizes.get(self.files.full_vectors.name, 0),
            },
        }


def _bytes(n: int) -> str:
    """``1234567`` -> ``1.2 MB``."""
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "kB"
    for bigger in ("MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:,.1f} {unit}"


def info_lines(info: Mapping[str, Any], slides: int = 20) -> list[str]:
    """``Index.info()`` as lines for a terminal: a summary, tables of tiles by magnification, label and slide (the
    ``slides`` with most tiles; 0: all), the files and the memory."""
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items()) or "exact search"
    lines = [
        f"{info['path']}: {info['kind']} index of {info['vectors']:,} tiles of {info['slides']:,} slides, "
        f"{info['dim']}-dimensional embeddings ({info['metric']})",
        f"model: {info['run'] or '(embeddings given directly)'}, checkpoint fingerprint {info['fingerprint'][:12]}",
        f"parameters: {params}",
    ]
    tiling = info.get("tiling")
    if isinstance(tiling, Mapping):
        from smse.data.records import mag_name

        size = "x".join(str(v) for v in tiling.get("size", []))
        mags = ", ".join(mag_name(int(m)) for m in tiling.get("magnifications", []))
        cap = tiling.get("max_locations")
        lines.append(
            f"whole slides are tiled: {size} px tiles at {mags} on a {mag_name(int(tiling.get('grid') or 0))} grid, "
            f"{100 * float(tiling.get('min_tissue', 0)):.0f}% tissue"
            + (f", at most {cap} locations a slide" if cap else "")
        )

    def table(title: str, counts: Mapping[Any, int], limit: int = 0) -> None:
        lines.extend(["", f"| {title} | tiles |", "|---|---:|"])
        shown = list(counts.items())
        for name, count in shown[:limit] if limit else shown:
            lines.append(f"| {name if name != '' else '(none)'} | {count:,} |")
        if limit and len(shown) > limit:
            rest = sum(c for _, c in shown[limit:])
            lines.append(f"| ... {len(shown) - limit:,} more slides | {rest:,} |")
        lines.append(f"| all | {sum(counts.values()):,} |")

    table("magnification", info["by_magnification"])
    table("label", info["by_label"])
    table("slide", info["by_slide"], slides)
    files = ", ".join(f"{name} {_bytes(size)}" for name, size in info["files"].items())
    memory = info["memory"]
    lines += [
        "",
        f"files: {files}",
        f"memory: faiss index {_bytes(memory['faiss_index_bytes'])}"
        + (" (inverted lists memory-mapped, read on demand)" if memory["faiss_index_memory_mapped"] else " (in RAM)")
        + (
            f"; full-precision vectors for re-ranking {_bytes(memory['full_vectors_bytes_on_disk'])} on disk, "
            "memory-mapped"
            if memory["full_vectors_bytes_on_disk"]
            else ""
        ),
    ]
    return lines


@contextmanager
def _threads(faiss: Any, n: int | None) -> Iterator[None]:
    """faiss's OpenMP threads set to ``n`` (None: unchanged) for the block, then restored."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ConfigError(f"{name}: at least 1, got {value!r}")
    return int(value)


def _smse_version() -> str:
    from smse import __version__

    return __version__


def _unique_paths(paths: Any) -> np.ndarray:
    """The positions of the first row of each path (rows without a path are all kept), ascending."""
    values = np.asarray(paths).astype(str)
    _, first = np.unique(values, return_index=True)
    keep = np.zeros(len(values), bool)
    keep[first] = True
    keep[values == ""] = True
    return np.flatnonzero(keep)


def _append(
    vectors,
    store: MetadataStore,
    files: IndexFiles,
    kind: str,
    params: Mapping[str, Any],
    emb: Any,
    columns: Mapping[str, Any],
    keep: np.ndarray,
    start: int,
    progress: bool,
) -> None:
    """Add the rows ``keep`` of ``emb`` with ids ``start``... to the faiss index, to vectors.f32 (ivfpq) and to the
    open SQLite transaction, a chunk at a time (a memory-mapped ``emb`` is never read whole)."""
    from smse.io import describe
    from smse.progress import batch_sizes
    from smse.progress import progress as show

    d = emb.shape[1]
    handle = None
    if kind == "ivfpq":
        try:
            handle = open(files.full_vectors, "r+b" if files.full_vectors.exists() else "w+b")
            handle.truncate(start * d * 4)  # rows of an add that did not commit go
            handle.seek(start * d * 4)
        except OSError as exc:
            raise OutputError(f"{files.full_vectors}: cannot write ({describe(exc)})") from None
    try:
        chunks = range(0, len(keep), CHUNK)
        for c in show(
            chunks,
            desc="indexing vectors",
            unit="vectors",
            enabled=progress and len(keep) > CHUNK,
            weights=batch_sizes(len(keep), CHUNK),
        ):
            rows = keep[c : c + CHUNK]
            block = np.ascontiguousarray(np.asarray(emb[rows]), dtype=np.float32)
            ids = np.arange(start + c, start + c + len(rows), dtype=np.int64)
            vectors.add_with_ids(block, ids)
            if handle is not None:
                handle.write(block.tobytes())
            store.insert(ids, {name: columns[name][rows] for name in COLUMNS})
        if handle is not None:
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OutputError(f"{files.full_vectors}: cannot write ({describe(exc)})") from None
    finally:
        if handle is not None:
            handle.close()


# ---------------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------------
def _resolve_source(source: str | os.PathLike) -> Path:
    """A source as the dataset ``embed_folder`` reads (a manifest CSV, a BreakHis folder, a tile folder's
    ``manifest.csv``) or a whole-slide image file, resolved.

    Raises:
        DataError: naming a source that is not there or not a dataset.
    """
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        manifest = path / "manifest.csv"
        return (manifest if manifest.is_file() else path).resolve()
    suffix = path.suffix.lower()
    if suffix == ".csv" or is_slide_file(path):
        return path.resolve()
    raise DataError(
        f"{path}: not a source (a BreakHis folder, a manifest CSV, a tile folder of smse tiles, or a whole-slide "
        f"image: {', '.join(SLIDE_SUFFIXES)})"
    )


def _check_slides(sources: Sequence[Path], reading: SlideReading, labels: Any) -> dict[Path, tuple[str, str, str]]:
    """The slides among ``sources``, each opened once (missing, foreign or of unknown resolution: refused before
    any work), with their (label, patient, tumour type).

    Raises:
        SlideError: naming a slide that cannot be opened.
        DataError: two slides of one name (the slide id), or a slide the label file lacks.
    """
    slides = list(dict.fromkeys(p for p in sources if is_slide_file(p)))
    seen: dict[str, Path] = {}
    for p in slides:
        if p.stem in seen:
            raise DataError(f"two slides have the id {p.stem!r}: {seen[p.stem]} and {p}; rename one")
        seen[p.stem] = p
        check_slide(p, reading)
    if labels is not None and not slides:
        log.warning("labels: no whole-slide image among the sources; the label file is not used")
    return slide_labels(labels, slides)


def _survey(source: Path) -> tuple[str, int]:
    """What identifies a source's current contents (a file's size and time; a folder's files' names, sizes and
    times) and its bytes (a manifest's own: its listed images are not counted), in one walk of a folder."""
    if source.is_file():
        st = source.stat()
        return f"{st.st_size}:{st.st_mtime_ns}", st.st_size
    digest, total = hashlib.sha1(), 0
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            digest.update(f"{os.path.relpath(full, source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            total += st.st_size
    return digest.hexdigest(), total


def share(sizes: Sequence[int], world: int) -> list[int]:
    """The process (0 to ``world`` - 1) that embeds each of the sources of ``sizes`` bytes: largest first, each to
    the process with the fewest bytes so far (ties: the lower rank; equal sizes in the given order)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
    return owner


def _embed_sources(
    files: IndexFiles,
    checkpoint: Path,
    fingerprint: str,
    sources: Sequence[Path],
    progress: bool,
    spec: TileSpec,
    reading: SlideReading,
    slides: Mapping[Path, tuple[str, str, str]],
    dist: Dist | None = None,
) -> list[int]:
    """Each source's part number, embedding the sources that have no current part (``parts/<n>.npz`` and its note,
    written after it). Under ``torchrun``, every process plans the same part numbers from the notes it reads
    before any process writes, embeds its ``share`` of the sources to embed, and waits for the others."""
    from smse.evaluate import embed_folder

    dist = dist or _alone()
    files.parts.mkdir(parents=True, exist_ok=True)
    notes: dict[int, dict] = {}
    for note in files.parts.glob("*.json"):
        try:
            notes[int(note.stem)] = json.loads(read_text(note))
        except (ValueError, DataError):
            continue
    taken = {int(p.stem) for p in files.parts.glob("*.npz") if p.stem.isdigit()} | set(notes)
    plan: list[tuple[Path, int, dict, bool]] = []  # source, part, its note, to embed
    sizes: dict[Path, int] = {}
    for source in sources:
        stamp, sizes[source] = _survey(source)
        wanted: dict[str, Any] = {"source": str(source), "stamp": stamp, "fingerprint": fingerprint}
        if source in slides:
            label, patient, tumor_type = slides[source]
            wanted.update(
                tiling=spec.to_dict(), reading=_reading_note(reading), slide_label=[label, patient, tumor_type]
            )
        found = [
            n
            for n, note in sorted(notes.items())
            if all(note.get(key) == value for key, value in wanted.items())
            and len(note) == len(wanted)
            and (files.part(n).is_file() or any(p[1] == n for p in plan))
        ]
        if found:
            plan.append((source, found[0], wanted, False))
            continue
        n = max(taken, default=-1) + 1
        taken.add(n)
        notes[n] = wanted  # a source given twice is embedded once
        plan.append((source, n, wanted, True))
    dist.barrier()  # every process has read the notes before any writes a part
    todo = [item for item in plan if item[3]]
    owners = share([sizes[source] for source, *_ in todo], dist.world)
    mine = [item for item, owner in zip(todo, owners) if owner == dist.rank]
    for j, (source, n, _, to_embed) in enumerate(plan, start=1):
        if not to_embed:
            log.info("source %d of %d, %s: embedded before (%s), reused", j, len(plan), source, files.part(n))
    model = None
    for j, (source, n, wanted, _) in enumerate(mine, start=1):
        where = f" (process {dist.rank} of {dist.world})" if dist.world > 1 else ""
        log.info("source %d of %d%s, %s: embedding to %s", j, len(mine), where, source, files.part(n))
        if source in slides:
            if model is None:
                model = _slide_model(checkpoint, dist)
            tiles = embed_slide(model, source, spec, reading, progress=progress)
            label, patient, tumor_type = slides[source]
            write_slide_part(files.part(n), tiles, label, patient, tumor_type)
            log.info("%s: %d tiles at %d locations", source, len(tiles.embeddings), tiles.locations)
        else:
            embed_folder(checkpoint, source, files.part(n), progress=progress)
        write_json(files.part_note(n), wanted)
    dist.barrier()  # every part is written
    return [n for _, n, _, _ in plan]


def _reading_note(reading: SlideReading) -> dict:
    """What of ``reading`` changes a slide's tiles (the resolution given, the cap on locations)."""
    return {"mpp": reading.mpp, "max_locations": reading.max_locations}


def _slide_model(checkpoint: Path, dist: Dist):
    """The model that embeds slide tiles, on the device the run trained on (``cuda`` of this process's
    ``torchrun`` rank where the run says ``cuda`` or ``auto`` and there is one)."""
    from smse.api import load_model
    from smse.runtime import resolve_device

    model = load_model(checkpoint)
    device = resolve_device(model.config.train.device, dist.local_rank)
    if device != model.device:
        model.module.to(device)
        model.device = device
    return model


def _read_parts(files: IndexFiles, parts: Sequence[int]) -> tuple[np.ndarray, dict[str, Any]]:
    """The embeddings of ``parts`` and their metadata columns, concatenated."""
    from smse.runfiles import load_embeddings

    embs, cols = [], []
    for n in parts:
        arrays = load_embeddings(files.part(n))
        note = json.loads(read_text(files.part_note(n)))
        emb = np.asarray(arrays["embeddings"], dtype=np.float32)
        count = len(emb)
        patients = arrays["patients"].astype(str)
        slides = arrays["slides"].astype(str) if "slides" in arrays else patients
        slides = np.where(slides == "", patients, slides)
        nan = np.full(count, np.nan)
        embs.append(emb)
        cols.append(
            {
                "source": np.full(count, note["source"], dtype=object),
                "path": arrays["paths"].astype(str),
                "slide": slides,
                "patient": patients,
                "label": arrays["labels"].astype(str),
                "tumor_type": arrays["tumor_types"].astype(str),
                "magnification": arrays["magnifications"].astype(np.int64),
                "x": arrays["xs"].astype(np.float64) if "xs" in arrays else nan,
                "y": arrays["ys"].astype(np.float64) if "ys" in arrays else nan,
            }
        )
    emb = np.concatenate(embs) if embs else np.zeros((0, 1), np.float32)
    columns = {name: np.concatenate([c[name] for c in cols]) for name in COLUMNS} if cols else {}
    return emb, columns


def _resolve_tiling(model: Any, overrides: Mapping[str, Any] | None = None) -> Any:
    """``smse.wsi.slide_predict.resolve_tiling``, imported when slides are cut (``smse.index`` imports no torch)."""
    from smse.wsi.slide_predict import resolve_tiling

    return resolve_tiling(model, overrides)


__all__ = ["Index", "IndexLockedError", "LOCK_TIMEOUT", "PROCESS_WAIT", "info_lines", "share"]
