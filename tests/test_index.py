"""The archive index (smse.index): exact and approximate search, add / remove, slide ranking, refusals, the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("faiss")

from smse.errors import CheckpointError, ConfigError, DataError, OutputError  # noqa: E402
from smse.index import Index, IndexLockedError, SlideHit, TileHit, rank_slides  # noqa: E402

MAGS = (40, 100, 200, 400)


def clustered(n: int, d: int, seed: int = 0, clusters: int = 64, spread: float = 0.1) -> np.ndarray:
    """Unit vectors drawn around ``clusters`` random unit centroids: neighbourhoods like real embeddings'."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(clusters, d))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    x = centroids[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def metadata(n: int, slides: int = 10, start: int = 0, prefix: str = "s") -> dict:
    i = np.arange(start, start + n)
    return {
        "slide": np.array([f"{prefix}{v % slides:02d}" for v in i]),
        "patient": np.array([f"p{(v % slides) // 2}" for v in i]),
        "label": np.array(["benign" if v % slides < slides // 2 else "malignant" for v in i]),
        "magnification": np.array([MAGS[v % 4] for v in i]),
        "path": np.array([f"/archive/{prefix}{v % slides:02d}/t{v}.png" for v in i]),
        "x": (i * 7 % 1000).astype(float),
        "y": (i * 13 % 1000).astype(float),
    }


def brute_force(queries: np.ndarray, refs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: squared L2 by a plain loop in float32, nearest first."""
    dist = np.empty((len(queries), len(refs)), np.float32)
    for q in range(len(queries)):
        for r in range(len(refs)):
            diff = queries[q] - refs[r]
            dist[q, r] = np.float32(np.dot(diff, diff))
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), order


def test_exact_search_equals_a_numpy_loop(tmp_path):
    """Catches: a flat index that ranks by another distance (inner product on unnormalised vectors), returns
    faiss's ids instead of the rows', or loses a tile when k exceeds the index."""
    x = clustered(400, 16, seed=1)
    index = Index.build_from_arrays(tmp_path / "ix", x, metadata(400), fingerprint="model-a")
    assert index.kind == "flat" and len(index) == 400
    queries = clustered(5, 16, seed=2)
    want_d, want_i = brute_force(queries, x, 7)
    got_d, got_i = index.search_vectors(queries, 7)
    assert np.array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-5)
    result = index.search(queries, k=7)
    assert [[h.id for h in hits] for hits in result.tiles] == want_i.tolist()
    assert result.tiles[0][0].path == f"/archive/s{want_i[0, 0] % 10:02d}/t{want_i[0, 0]}.png"
    everything = index.search(queries[:1], k=10_000)  # k above the size: every tile, nearest first
    assert len(everything.tiles[0]) == 400 and [h.rank for h in everything.tiles[0]] == list(range(1, 401))


def test_ivfpq_recall_at_10_against_exact_search(tmp_path):
    """Catches: an approximate index whose parameters (lists, probes, sub-quantisers, re-ranking from the full
    vectors) lose the neighbours: recall@10 on 20,000 clustered vectors must stay at or above 0.9."""
    x = clustered(20_000, 32, seed=3)
    index = Index.build_from_arrays(tmp_path / "ivf", x, metadata(20_000, slides=50), fingerprint="m", kind="ivfpq")
    assert index.kind == "ivfpq" and index.params["m"] == 4 and (tmp_path / "ivf" / "vectors.f32").stat().st_size
    rng = np.random.default_rng(4)
    queries = x[rng.choice(len(x), 100, replace=False)] + 0.02 * rng.normal(size=(100, 32)).astype(np.float32)
    _, exact = brute_force(queries, x, 10)
    _, approx = index.search_vectors(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert recall >= 0.9, recall
    reopened = Index.open(tmp_path / "ivf")  # memory-mapped lists and vectors.f32 answer the same
    assert np.array_equal(reopened.search_vectors(queries, 10)[1], approx)


def test_a_filtered_ivfpq_search_widens_its_probe_until_k_tiles_pass(tmp_path):
    """Catches: a filter that keeps 1% of the tiles answered from the few probed lists only (fewer than k hits,
    or the wrong ones): the filtered approximate search must return the exact filtered top 10."""
    x = clustered(20_000, 32, seed=5)
    meta = metadata(20_000, slides=50)
    meta["magnification"] = np.where(np.arange(20_000) % 100 == 0, 40, 400)  # 200 tiles at 40X
    index = Index.build_from_arrays(tmp_path / "ivf", x, meta, fingerprint="m", kind="ivfpq")
    rng = np.random.default_rng(6)
    queries = x[rng.choice(len(x), 20, replace=False)]
    keep = np.flatnonzero(meta["magnification"] == 40)
    _, exact = brute_force(queries, x[keep], 10)
    _, approx = index.search_vectors(queries, 10, magnifications=[40])
    assert (approx >= 0).all()
    recall = np.mean([len(set(a) & set(keep[b])) / 10 for a, b in zip(approx, exact)])
    assert recall >= 0.9, recall


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_add_and_remove_round_trip(tmp_path, kind):
    """Catches: added tiles not found, removed slides still returned, ids reused, a tile added twice, or changes
    that do not survive reopening."""
    x = clustered(1200, 16, seed=5)
    params = {"nlist": 16} if kind == "ivfpq" else {}
    index = Index.build_from_arrays(tmp_path / "ix", x, metadata(1200), fingerprint="m", kind=kind, params=params)
    new = clustered(40, 16, seed=6)
    report = index.add_arrays(new, metadata(40, slides=2, prefix="new"), fingerprint="m")
    assert report == {"added": 40, "skipped": 0} and len(index) == 1240
    again = index.add_arrays(new, metadata(40, slides=2, prefix="new"))
    assert again == {"added": 0, "skipped": 40} and len(index) == 1240
    hits = index.search(new[:3], k=1).tiles
    assert [h[0].slide for h in hits] == ["new00", "new01", "new00"] and all(h[0].distance < 1e-4 for h in hits)
    assert all(h[0].id >= 1200 for h in hits)
    assert index.remove(["s03", "new01"]) == 120 + 20
    assert len(index) == 1100
    reopened = Index.open(tmp_path / "ix")
    assert len(reopened) == 1100 and "s03" not in reopened.info()["by_slide"]
    found = reopened.search(np.concatenate([x[3:4], new[1:2]]), k=50).tiles
    assert not any(h.slide in ("s03", "new01") for hits in found for h in hits)
    assert reopened.search(x[14:15], k=1).tiles[0][0].id == 14  # the others keep their ids
    index.add_arrays(clustered(5, 16, seed=7), {"slide": ["late"] * 5})
    assert Index.open(tmp_path / "ix").store.ids_where("slide", ["late"]).tolist() == list(range(1240, 1245))


def plain_slide_ranking(tiles: list[list[TileHit]], top: int) -> list[tuple[str, float, float]]:
    """The rule written out: each neighbour at rank r votes 1/r for its slide; by score, then best distance, name."""
    scores: dict[str, float] = {}
    best: dict[str, float] = {}
    for hits in tiles:
        for position in range(len(hits)):
            hit = hits[position]
            scores[hit.slide] = scores.get(hit.slide, 0.0) + 1.0 / (position + 1)
            best[hit.slide] = min(best.get(hit.slide, np.inf), hit.distance)
    ranked = sorted(scores.items(), key=lambda item: (-item[1], best[item[0]], item[0]))
    return [(slide, score, best[slide]) for slide, score in ranked[:top]]


def hit(query: int, rank: int, id_: int, slide: str, distance: float) -> TileHit:
    return TileHit(query, rank, id_, distance, slide, "p", "benign", "A", 100, 1.0, 2.0, f"t{id_}.png", "src")


def test_slide_ranking_follows_the_stated_rule():
    """Catches: votes not weighted by rank, ties broken by something else than the best distance, regions listed
    twice or out of distance order."""
    rng = np.random.default_rng(8)
    slides = [f"s{i}" for i in range(6)]
    tiles = []
    for q in range(5):
        d = np.sort(rng.random(8))
        tiles.append([hit(q, r + 1, int(rng.integers(0, 30)), slides[rng.integers(0, 6)], d[r]) for r in range(8)])
    got = rank_slides(tiles, top=4)
    want = plain_slide_ranking(tiles, 4)
    assert [(s.slide, s.best_distance) for s in got] == [(s, b) for s, _, b in want]
    np.testing.assert_allclose([s.score for s in got], [w[1] for w in want])
    for s in got:
        ids = [r.id for r in s.regions]
        assert len(ids) == len(set(ids)) and [r.distance for r in s.regions] == sorted(r.distance for r in s.regions)
        assert s.votes == sum(h.slide == s.slide for hits in tiles for h in hits)
    tie = [[hit(0, 1, 1, "b", 0.2), hit(0, 2, 2, "a", 0.3)], [hit(1, 1, 3, "a", 0.1), hit(1, 2, 4, "b", 0.4)]]
    assert [s.slide for s in rank_slides(tie, 2)] == ["a", "b"]  # 1.5 each: a's best tile is nearer
    assert isinstance(got[0], SlideHit)


def test_search_by_slide_and_magnification_filters(tmp_path):
    """Catches: a magnification filter that lets other magnifications through (or returns fewer tiles than it
    could), ``same`` ignoring the query's magnification, slide search not built from the tile search."""
    x = clustered(800, 16, seed=9)
    index = Index.build_from_arrays(tmp_path / "ix", x, metadata(800), fingerprint="m")
    queries = x[[0, 1, 2]]
    only = index.search(queries, k=12, magnification="40X,100X").tiles
    assert all(len(h) == 12 and {t.magnification for t in h} <= {40, 100} for h in only)
    d, i = brute_force(queries, x, 800)
    allowed = np.isin(np.array(metadata(800)["magnification"]), [40, 100])
    assert [t.id for t in only[0]] == [int(v) for v in i[0] if allowed[v]][:12]
    same = index.search(queries, k=5, magnification="same", query_magnifications=[400, 200, 40]).tiles
    assert [{t.magnification for t in h} for h in same] == [{400}, {200}, {40}]
    tiles = index.search(queries, k=6).tiles
    slides = index.search(queries, k=6, by="slide")
    assert [s.slide for s in slides.slides] == [s for s, _, _ in plain_slide_ranking(tiles, 6)]
    assert slides.rows()[0]["slide"] == slides.slides[0].slide and "x" in slides.rows()[0]
    assert json.loads(json.dumps(slides.to_dict()))["slides"][0]["regions"][0]["magnification"] in MAGS
    excluded = index.search(queries, k=6, by="slide", exclude_slides=[slides.slides[0].slide])
    assert slides.slides[0].slide not in [s.slide for s in excluded.slides]
    with pytest.raises(ConfigError, match="magnification same: the magnification of query <query 0> is unknown"):
        index.search(queries, magnification="same")
    with pytest.raises(ConfigError, match="magnification"):
        index.search(queries, magnification="often")


def test_info_counts(tmp_path):
    """Catches: counts by slide, magnification or label that disagree with the rows, or sizes left out."""
    index = Index.build_from_arrays(tmp_path / "ix", clustered(120, 8), metadata(120, slides=4), fingerprint="m")
    info = index.info()
    assert info["vectors"] == 120 and info["slides"] == 4 and info["kind"] == "flat" and info["dim"] == 8
    assert info["by_slide"] == {"s00": 30, "s01": 30, "s02": 30, "s03": 30}
    assert info["by_magnification"] == {"40X": 30, "100X": 30, "200X": 30, "400X": 30}
    assert info["by_label"] == {"benign": 60, "malignant": 60}
    assert info["files"]["vectors.faiss"] > 120 * 8 * 4 and info["memory"]["faiss_index_bytes"] > 0
    desc = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert desc["format"] == "smse-index" and desc["counts"] == {"vectors": 120, "slides": 4}
    import sqlite3  # any tool reads the metadata

    with sqlite3.connect(tmp_path / "ix" / "metadata.sqlite") as con:
        assert con.execute("select count(*) from tiles where slide = 's01'").fetchone()[0] == 30


@pytest.fixture
def small_index(tmp_path):
    Index.build_from_arrays(tmp_path / "ix", clustered(200, 8), metadata(200), fingerprint="model-a")
    return tmp_path / "ix"


def test_foreign_and_truncated_files_are_refused_by_name(small_index):
    """Catches: a damaged index read as an empty or wrong one, or a crash (faiss abort) instead of an error."""
    faiss_file = small_index / "vectors.faiss"
    whole = faiss_file.read_bytes()
    faiss_file.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="vectors.faiss: not a readable faiss index"):
        Index.open(small_index)
    faiss_file.write_bytes(b"PK\x03\x04 certainly not faiss" * 10)
    with pytest.raises(DataError, match="vectors.faiss: not a readable faiss index"):
        Index.open(small_index)
    faiss_file.write_bytes(whole)
    desc = small_index / "index.json"
    good = desc.read_text()
    desc.write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="index.json: not an smse index"):
        Index.open(small_index)
    desc.write_text("{truncated")
    with pytest.raises(DataError, match="index.json: not an smse index description"):
        Index.open(small_index)
    desc.write_text(good.replace('"version": 1', '"version": 99'))
    with pytest.raises(DataError, match="version 99"):
        Index.open(small_index)
    desc.write_text(good)
    (small_index / "metadata.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(DataError, match="metadata.sqlite: not an smse index metadata store"):
        Index.open(small_index)
    with pytest.raises(DataError, match="no index here"):
        Index.open(small_index.parent)


def test_truncated_full_vectors_are_refused(tmp_path):
    """Catches: a cut vectors.f32 memory-mapped anyway (a bus error at the first re-rank)."""
    Index.build_from_arrays(tmp_path / "ix", clustered(1500, 16), {}, fingerprint="m", kind="ivfpq")
    full = tmp_path / "ix" / "vectors.f32"
    full.write_bytes(full.read_bytes()[:1000])
    with pytest.raises(DataError, match="vectors.f32: 1000 bytes, but the index holds 1500 rows"):
        Index.open(tmp_path / "ix")


def test_another_model_dimension_k_and_empty_index_are_refused(small_index):
    """Catches: embeddings of another model or dimension compared anyway, k below 1 accepted, an empty index
    answering with nothing instead of saying so."""
    index = Index.open(small_index)
    queries = clustered(2, 8)
    with pytest.raises(CheckpointError, match="built with model model-a.*model other"):
        index.search(queries, fingerprint="other-model")
    assert len(index.search(queries, fingerprint="model-a", k=3).tiles[0]) == 3
    with pytest.raises(CheckpointError, match="model-a"):
        index.add_arrays(queries, fingerprint="other-model")
    with pytest.raises(DataError, match="queries: 12-dimensional, but .*index.json holds 8-dimensional"):
        index.search(clustered(2, 12))
    with pytest.raises(DataError, match="embeddings: 12-dimensional"):
        index.add_arrays(clustered(2, 12))
    for k in (0, -3, 1.5):
        with pytest.raises(ConfigError, match="k: the number of neighbours"):
            index.search(queries, k=k)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="built from embeddings, without a checkpoint"):
        index.search(["an-image.png"])
    with pytest.raises(DataError, match="holds no slide 'nope'"):
        index.remove("nope")
    index.remove([f"s{i:02d}" for i in range(10)])
    assert len(index) == 0 and len(Index.open(small_index)) == 0
    with pytest.raises(DataError, match="the index holds no vectors"):
        index.search(queries)
    with pytest.raises(OutputError, match="already holds an index"):
        Index.build_from_arrays(small_index, queries, fingerprint="m")
    with pytest.raises(DataError, match="no embeddings to index"):
        Index.build_from_arrays(small_index.parent / "empty", np.zeros((0, 8), np.float32), fingerprint="m")


def test_a_second_add_is_refused_and_nothing_is_lost(small_index, monkeypatch):
    """Catches: two writers at once (one overwriting the other's vectors), or a refusal that leaves a change half
    made."""
    from filelock import FileLock

    import smse.index.archive as archive

    monkeypatch.setattr(archive, "LOCK_TIMEOUT", 0.05)
    index = Index.open(small_index)
    with FileLock(str(small_index / ".lock")):  # another add holds the index
        with pytest.raises(IndexLockedError, match=f"another smse index add holds {small_index}"):
            index.add_arrays(clustered(3, 8, seed=11), {"slide": ["x"] * 3})
        with pytest.raises(IndexLockedError):
            index.remove("s01")
    assert len(Index.open(small_index)) == 200
    assert index.add_arrays(clustered(3, 8, seed=11), {"slide": ["x"] * 3})["added"] == 3


def test_an_add_that_fails_before_its_commit_changes_nothing(small_index, monkeypatch):
    """Catches: vectors committed without their rows (or rows without vectors): after a failure between the faiss
    write and the SQLite commit, searches never return the uncommitted vectors and the next add reuses their ids."""
    from smse.index.store import MetadataStore

    index = Index.open(small_index)
    new = clustered(4, 8, seed=12)

    def fail(self):
        raise OSError("disk gone")

    monkeypatch.setattr(MetadataStore, "commit", fail)
    with pytest.raises(OSError, match="disk gone"):
        index.add_arrays(new, {"slide": ["lost"] * 4})
    monkeypatch.undo()
    reopened = Index.open(small_index)  # the faiss file holds 204 vectors, SQLite 200 rows
    assert len(reopened) == 200 and reopened._faiss.ntotal == 200
    assert all(h.slide != "lost" for h in reopened.search(new, k=3).tiles[0])
    assert reopened.add_arrays(new, {"slide": ["kept"] * 4})["added"] == 4
    assert Index.open(small_index).store.ids_where("slide", ["kept"]).tolist() == [200, 201, 202, 203]


def test_sources_are_checked_before_any_work(tmp_path):
    """Catches: a slide that is not one, a missing source or a file that is no dataset found only after minutes of
    embedding the sources before it."""
    from smse.errors import SlideError

    checkpoint = tmp_path / "best.safetensors"
    checkpoint.write_bytes(b"weights")
    slide = tmp_path / "case.svs"
    slide.write_bytes(b"slide")
    with pytest.raises(SlideError, match="case.svs: not a whole-slide image"):
        Index.build(checkpoint, [slide], tmp_path / "ix")
    with pytest.raises(DataError, match="nope: no such file or folder"):
        Index.build(checkpoint, [tmp_path / "nope"], tmp_path / "ix")
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="notes.txt: not a source"):
        Index.build(checkpoint, [tmp_path / "notes.txt"], tmp_path / "ix")
    assert not (tmp_path / "ix" / "parts").exists()


def test_the_command_line_refuses_with_exit_2(small_index, monkeypatch, capsys):
    """Catches: a refusal that prints a traceback or exits 0 or 1."""
    from smse.cli import main

    (small_index.parent / "q.png").write_bytes(b"")
    for args, message in [
        (["search", str(small_index), str(small_index.parent / "q.png"), "--k", "0"], "--k: at least 1"),
        (["search", str(small_index), str(small_index.parent / "q.png")], "without a checkpoint"),
        (["index", "remove", str(small_index), "--slide", "nope"], "holds no slide 'nope'"),
        (["index", "info", str(small_index.parent)], "no index here"),
    ]:
        monkeypatch.setattr(sys, "argv", ["smse", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2, args
        assert message in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["smse", "index", "info", str(small_index), "--slides", "2"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "| all | 200 |" in out and "| ... 8 more slides | 160 |" in out


@pytest.mark.slow
def test_slides_to_tiles_to_run_to_index_to_search_by_slide(tmp_path):
    """Catches: the walk of the README (synthetic slides -> tiles -> train -> index build -> search --by slide)
    broken anywhere; a rerun of a killed build that embeds again; add, remove and info through the CLI."""
    from smse.pipeline import run_pipeline
    from smse.synth.wsi import generate_slides
    from smse.wsi import TileSpec, write_tiles
    from tests.conftest import invoke
    from tests.test_spots import tiny_tile_config

    generate_slides(tmp_path / "wsi", patients=4, seed=0, size=(1200, 900), workers=1)
    slides = sorted((tmp_path / "wsi" / "slides").iterdir())
    spec = TileSpec(magnifications=(100, 400), size=(32, 32), grid=400, max_locations=40)
    write_tiles(slides[:3], tmp_path / "tiles", spec, labels=tmp_path / "wsi" / "labels.csv", progress=False)
    write_tiles(slides[3:], tmp_path / "more", spec, labels=tmp_path / "wsi" / "labels.csv", progress=False)
    run, _ = run_pipeline(tiny_tile_config(tmp_path / "tiles" / "manifest.csv", tmp_path / "run", "train.epochs=2"))

    archive = tmp_path / "archive"
    out = invoke("index", "build", run, tmp_path / "tiles", "--out", archive)
    assert "flat index of 240 tiles of 3 slides" in out and "| 100X | 120 |" in out
    part = archive / "parts" / "0.npz"
    embedded_at = part.stat().st_mtime_ns
    for name in ("index.json", "metadata.sqlite", "vectors.faiss"):  # killed after embedding: rerun resumes
        (archive / name).unlink()
    invoke("index", "build", run, tmp_path / "tiles", "--out", archive)
    assert part.stat().st_mtime_ns == embedded_at

    query = sorted((tmp_path / "tiles").rglob("*_400X.jpg"))[0]
    own_slide = query.parent.parent.name
    out = invoke(
        "search", archive, query, "--by", "slide", "--k", "5", "--format", "json", "--out", tmp_path / "s.json"
    )
    found = json.loads((tmp_path / "s.json").read_text())
    assert found["slides"][0]["slide"] == own_slide  # the tile itself is in the index, at distance 0
    assert found["slides"][0]["regions"][0]["distance"] < 1e-6 and found["slides"][0]["regions"][0]["x"] is not None
    out = invoke("search", archive, query, "--magnification", "same", "--k", "3")
    rows = out.strip().splitlines()  # the runner shows standard error too: the summary line last
    assert rows[0].startswith("query_path,query,rank,id,distance") and rows[-1] == "1 queries, 3 tiles of 240 tiles"
    assert len(rows) == 5 and all(",400," in row for row in rows[1:4])

    out = invoke("index", "add", archive, tmp_path / "more")
    assert "added 80 tiles" in out
    assert "skipped 80 already in the index" in invoke("index", "add", archive, tmp_path / "more" / "manifest.csv")
    new_slide = slides[3].stem
    assert "removed 80 tiles of 1 slide(s); 240 tiles now" in invoke("index", "remove", archive, "--slide", new_slide)
    info = invoke("index", "info", archive, "--json", tmp_path / "info.json")
    assert "| all | 240 |" in info and json.loads((tmp_path / "info.json").read_text())["slides"] == 3


def test_a_magnification_the_index_lacks_is_refused_naming_what_it_holds(small_index):
    """Catches: --magnification 50X answered with an empty table and exit 0, as if nothing were similar."""
    index = Index.open(small_index)
    with pytest.raises(ConfigError, match="the index holds .*none at 50X"):
        index.search(np.ones((1, index.dim), np.float32) / np.sqrt(index.dim), k=3, magnification=[50])
