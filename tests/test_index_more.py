"""The archive index beyond tile folders: whole slides and regions as sources and queries, the web page's archive
search (``smse serve --index``), and ``index build`` under ``torchrun``."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from smse.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from smse.index import Index  # noqa: E402
from smse.index.slides import (  # noqa: E402
    Region,
    SlideQuery,
    is_slide,
    parse_slide_query,
    parse_tile_path,
    tile_path,
)
from tests.conftest import invoke, subprocess_env  # noqa: E402

MAGS = (40, 100)


def main_exit(args: list[str]) -> tuple[int, str]:
    """``smse ARGS`` through the command line's entry point, in process: its exit code and standard error."""
    from contextlib import redirect_stderr

    from smse.cli import main

    err = io.StringIO()
    argv, sys.argv = sys.argv, ["smse", *args]
    code: int = 0
    try:
        with redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return code, err.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------------
# without a model
# ---------------------------------------------------------------------------------------------------------------
def test_slide_queries_and_regions_are_parsed_or_refused_naming_the_query(tmp_path):
    """Catches: a region read with the wrong numbers, a bad region searched as an image (or as the whole slide),
    a file whose name holds '@' taken for a region, a region asked of an image file."""
    assert parse_slide_query("a/b.svs") == SlideQuery("a/b.svs", Path("a/b.svs"))
    assert parse_slide_query("a/b.svs@10,20,300,400") == SlideQuery(
        "a/b.svs@10,20,300,400", Path("a/b.svs"), Region(10, 20, 300, 400)
    )
    assert parse_slide_query("b.ndpi@ 0, 0, 1, 1") == SlideQuery(
        "b.ndpi@ 0, 0, 1, 1", Path("b.ndpi"), Region(0, 0, 1, 1)
    )
    for bad in ("b.svs@1,2,3", "b.svs@1,2,3,0", "b.svs@-1,2,3,4", "b.svs@1.5,2,3,4", "b.svs@x,y,w,h", "b.svs@"):
        with pytest.raises(ConfigError, match=rf"^{bad.replace('.', '[.]')}: a region is SLIDE@x,y,w,h"):
            parse_slide_query(bad)
    with pytest.raises(ConfigError, match="q.png@1,2,3,4: a region .* is for whole-slide images"):
        parse_slide_query("q.png@1,2,3,4")
    odd = tmp_path / "case@1,2,3,4"
    odd.write_bytes(b"x")
    assert parse_slide_query(odd) is None and parse_slide_query("q.png") is None
    assert parse_slide_query("someone@example.png") is None
    named = tile_path("/s/a.svs", 1200, 80, 100)
    assert named == "/s/a.svs#x1200_y80_100X"
    found = parse_tile_path(named)
    assert found is not None and (found.file, found.x, found.y, found.magnification) == ("/s/a.svs", 1200, 80, 100)
    assert parse_tile_path("/t/a_x1_y2_100X.jpg") is None and parse_tile_path("/t/a.png#x1_y2_100X") is None
    assert Region(10, 10, 5, 5).holds(np.array([10, 14, 15, 9]), np.array([10, 14, 10, 10])).tolist() == [
        True,
        True,
        False,
        False,
    ]


def test_a_plain_tiff_is_an_image_and_a_pyramid_is_a_slide(tmp_path):
    """Catches: a TIFF image given as a query tiled as a slide (no tissue found), or a pyramidal TIFF read as one
    image."""
    from PIL import Image

    from smse.synth.wsi import generate_slides

    plain = tmp_path / "tile.tif"
    Image.new("RGB", (64, 48), (200, 100, 150)).save(plain)
    assert not is_slide(plain) and parse_slide_query(plain) is None
    generate_slides(tmp_path / "wsi", patients=1, seed=0, size=(600, 450), mpp=2.0, workers=1)
    slide = next((tmp_path / "wsi" / "slides").iterdir())
    assert is_slide(slide) and parse_slide_query(slide) == SlideQuery(str(slide), slide)


def test_each_process_gets_a_share_of_the_sources_largest_first():
    """Catches: a process left idle while another embeds every slide, or shares that differ between processes."""
    from smse.index.archive import share

    assert share([10, 1, 5, 5], 2) == [0, 0, 1, 1]  # 10 -> 0; 5 -> 1; 5 -> 1 (5 < 10); 1 -> 0 (10 = 10: the lower)
    assert share([3, 3, 3, 3], 2) == [0, 1, 0, 1] and share([7], 3) == [0] and share([], 2) == []
    sizes = list(np.random.default_rng(0).integers(1, 100, 40))
    owners = share(sizes, 3)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(sizes)


# ---------------------------------------------------------------------------------------------------------------
# a tiny tile run on synthetic slides
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slides_run(tmp_path_factory):
    """Four 600 x 450 synthetic slides (2 um/px), cut into 32 x 32 tiles at 40X and 100X (20 locations each), and a
    tiny paper-cnn run trained on them for one epoch (its tiling recorded in the run)."""
    from smse.pipeline import run_pipeline
    from smse.synth.wsi import generate_slides
    from smse.wsi import TileSpec, write_tiles
    from tests.test_spots import tiny_tile_config

    root = tmp_path_factory.mktemp("index-slides")
    generate_slides(root / "wsi", patients=4, seed=0, size=(600, 450), mpp=2.0, workers=1)
    slides = sorted((root / "wsi" / "slides").iterdir())
    labels = root / "wsi" / "labels.csv"
    spec = TileSpec(magnifications=MAGS, size=(32, 32), max_locations=20)
    write_tiles(slides, root / "tiles", spec, labels=labels, progress=False)
    run, _ = run_pipeline(
        tiny_tile_config(root / "tiles" / "manifest.csv", root / "run", "train.epochs=1"),
        evaluate=False,
        report=False,
        progress=False,
    )
    return SimpleNamespace(root=root, slides=slides, labels=labels, tiles=root / "tiles", run=run)


@pytest.fixture(scope="module")
def archive(slides_run):
    """An index of two whole slides (labelled) and the tile folder of all four."""
    s = slides_run
    Index.build(s.run, [s.slides[0], s.slides[1], s.tiles], s.root / "archive", labels=s.labels, progress=False)
    return s.root / "archive"


def label_of(slides_run, name: str) -> str:
    rows = [line.split(",") for line in slides_run.labels.read_text().splitlines()[1:]]
    return next(r[1] for r in rows if r[0] == name)


def plan_of(slide: Path):
    from smse.wsi import TileSpec, open_slide, plan_tiles

    opened = open_slide(slide)
    return opened, plan_tiles(opened, TileSpec(magnifications=MAGS, size=(32, 32)))


@pytest.mark.slow
def test_whole_slides_are_tiled_like_the_runs_tiles_and_embedded_by_its_model(slides_run, archive, tmp_path):
    """Catches: slides tiled another way than the run's tiles (size, magnifications, grid), tiles embedded by
    another model or out of order, metadata (slide, x, y, magnification, label) lost, a rerun that embeds again."""
    from smse.api import load_model

    s = slides_run
    index = Index.open(archive)
    desc = json.loads((archive / "index.json").read_text())
    assert desc["tiling"]["magnifications"] == list(MAGS) and desc["tiling"]["size"] == [32, 32]
    name = s.slides[0].stem
    slide, plan = plan_of(s.slides[0])
    with sqlite3.connect(archive / "metadata.sqlite") as con:
        rows = con.execute(
            "select id, path, slide, patient, label, magnification, x, y, source from tiles "
            "where source = ? order by id",
            (str(s.slides[0].resolve()),),
        ).fetchall()
    assert len(rows) == 2 * len(plan) and len(plan) > 20  # every tissue location (the run's tiles took 20), 2 mags
    assert {r[2] for r in rows} == {name} and {r[3] for r in rows} == {name}
    assert {r[4] for r in rows} == {label_of(s, name)}
    want = [(int(x), int(y), m) for x, y in plan.locations for m in MAGS]
    assert [(int(r[6]), int(r[7]), r[5]) for r in rows] == want
    assert rows[0][1] == f"{s.slides[0].resolve()}#x{want[0][0]}_y{want[0][1]}_{want[0][2]}X"
    model = load_model(s.run)
    first = plan.cut(tuple(plan.locations[0]))
    expected = model.embed([first[40], first[100]])
    ids = np.array([rows[0][0], rows[1][0]])
    inner = faiss.downcast_index(index._faiss.index)
    held = faiss.vector_to_array(index._faiss.id_map)
    got = np.stack([inner.reconstruct(int(np.flatnonzero(held == i)[0])) for i in ids])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    slide.close()
    info = index.info()
    assert info["by_slide"][name] == 2 * len(plan) + 40  # its slide tiles and its 20 locations of smse tiles
    assert info["by_magnification"] == {"40X": info["vectors"] // 2, "100X": info["vectors"] // 2}

    parts = sorted((archive / "parts").glob("*.npz"))
    assert len(parts) == 3  # one per slide, one for the tile folder
    again = tmp_path / "again"  # a build killed after embedding (its parts only): the rerun reuses them
    (again / "parts").mkdir(parents=True)
    for p in (archive / "parts").iterdir():
        (again / "parts" / p.name).write_bytes(p.read_bytes())
    kept = {p.name: (again / "parts" / p.name).stat().st_mtime_ns for p in parts}
    Index.build(s.run, [s.slides[0], s.slides[1], s.tiles], again, labels=s.labels, progress=False)
    assert {p.name: (again / "parts" / p.name).stat().st_mtime_ns for p in parts} == kept
    assert index_contents(again)[0] == index_contents(archive)[0]
    capped = Index.build(s.run, [s.slides[0]], tmp_path / "capped", tiling={"max_locations": 5}, progress=False)
    assert len(capped) == 10 and capped.info()["by_label"] == {"": 10}  # no label file: label unknown
    assert json.loads((tmp_path / "capped" / "index.json").read_text())["tiling"]["max_locations"] == 5


@pytest.mark.slow
def test_slide_sources_are_added_and_refused_by_name(slides_run, archive, tmp_path):
    """Catches: an added slide not tiled with the index's tiling, a slide missing from the label file or of
    another file under a known slide name found after the work, a removed slide still found."""
    import shutil

    s = slides_run
    copy = tmp_path / "archive"
    shutil.copytree(archive, copy)
    out = invoke("index", "add", copy, s.slides[2], "--labels", s.labels)
    slide, plan = plan_of(s.slides[2])
    slide.close()
    assert f"added {2 * len(plan)} tiles" in out
    assert "skipped" in invoke("index", "add", copy, s.slides[2], "--labels", s.labels)
    index = Index.open(copy)
    rows = index.store.rows(index.store.ids_where("slide", [s.slides[2].stem]))
    assert {r["magnification"] for r in rows.values()} == set(MAGS)
    assert {r["source"] for r in rows.values()} >= {str(s.slides[2].resolve())}
    other = tmp_path / "elsewhere" / s.slides[2].name
    other.parent.mkdir()
    shutil.copy(s.slides[2], other)
    with pytest.raises(DataError, match=f"holds a slide {s.slides[2].stem!r} from another file"):
        index.add([other], progress=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nnobody,benign\n")
    code, err = main_exit(["index", "add", str(copy), str(s.slides[3]), "--labels", str(labels)])
    assert code == 2 and f"no row for slide(s) {s.slides[3].name}" in err
    assert not (copy / "parts" / "4.npz").exists()  # refused before any work
    assert "removed" in invoke("index", "remove", copy, "--slide", s.slides[2].stem)
    assert s.slides[2].stem not in Index.open(copy).store.counts("slide")


@pytest.mark.slow
def test_a_whole_slide_or_a_region_is_a_query(slides_run, archive, tmp_path):
    """Catches: a slide query that does not search with all its tiles, a region that takes tiles outside its box
    (or misses one inside), query tiles of unknown magnification, a bad region or a box without tissue that is not
    a clear error naming the query (exit 2)."""
    s = slides_run
    slide_file = s.slides[0]
    slide, plan = plan_of(slide_file)
    slide.close()
    out = tmp_path / "hits.json"
    invoke("search", archive, slide_file, "--by", "slide", "--k", "3", "--format", "json", "--out", out)
    found = json.loads(out.read_text())
    assert len(found["queries"]) == 2 * len(plan)
    assert found["slides"][0]["slide"] == slide_file.stem  # its own tiles are in the index, at distance 0
    assert found["slides"][0]["regions"][0]["distance"] < 1e-6

    (x0, y0), (x1, y1) = plan.locations[0], plan.locations[min(3, len(plan) - 1)]
    box = (min(x0, x1), min(y0, y1), abs(int(x1) - int(x0)) + 1, abs(int(y1) - int(y0)) + 1)
    inside = [
        (int(x), int(y)) for x, y in plan.locations if box[0] <= x < box[0] + box[2] and box[1] <= y < box[1] + box[3]
    ]
    region = f"{slide_file}@{box[0]},{box[1]},{box[2]},{box[3]}"
    index = Index.open(archive)
    result = index.search([region], k=2, magnification="same")
    assert result.queries == [f"{slide_file}#x{x}_y{y}_{m}X" for x, y in inside for m in MAGS]
    assert all({h.magnification for h in hits} == {m} for hits, m in zip(result.tiles, [40, 100] * len(inside)))
    assert result.tiles[0][0].distance < 1e-6 and result.tiles[0][0].x == inside[0][0]

    for query, message in [
        (f"{slide_file}@1,2,3", f"error: {slide_file}@1,2,3: a region is SLIDE@x,y,w,h"),
        (f"{slide_file}@0,0,2,2", f"error: {slide_file}@0,0,2,2: no tissue tile has its centre in the box x 0 to 2"),
        (f"{slide_file}@5000,0,10,10", "@5000,0,10,10: the box starts outside the slide, which is 600x450 level-0"),
        (f"{tmp_path / 'gone.svs'}", f"error: {tmp_path / 'gone.svs'}: slide file not found"),
        (f"{tmp_path / 'q.png'}@1,2,3,4", "q.png@1,2,3,4: a region (@x,y,w,h) is for whole-slide images"),
    ]:
        code, err = main_exit(["search", str(archive), query])
        assert code == 2 and message in err, (query, err)


# ---------------------------------------------------------------------------------------------------------------
# the web page's archive search
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(slides_run, archive):
    from fastapi.testclient import TestClient

    from smse.serve import Service, create_app
    from tests.test_serve import LIMITS

    service = Service.from_run(slides_run.run, limits=LIMITS, index=archive)
    return service, TestClient(create_app(service=service), base_url="http://127.0.0.1")


def a_tile(slides_run) -> Path:
    return sorted(slides_run.tiles.glob(f"{slides_run.slides[1].stem}/100X/*.jpg"))[2]


@pytest.mark.slow
def test_the_page_api_ranks_archive_slides_with_thumbnails_of_their_regions(slides_run, served):
    """Catches: an archive answer left out of the prediction (or dropped by its response schema), hit slides not
    ranked by the index's rule, thumbnails that take a path from the client, tiles of slides that cannot be read
    back from the slide file."""
    from PIL import Image

    service, client = served
    health = client.get("/api/health").json()["archive"]
    assert health["tiles"] == len(service.archive) and health["slides"] == 4 and health["kind"] == "flat"
    tile = a_tile(slides_run)
    response = client.post(
        "/api/predict", files=[("images", (tile.name, tile.read_bytes(), "image/jpeg"))], data={"k": "3"}
    )
    assert response.status_code == 200, response.text
    found = response.json()["archive"]
    assert found["k"] == 10 and found["slides_in_index"] == 4 and "1/r" in found["rule"]
    want = service.archive.search(service.model.embed([str(tile)]), k=10, by="slide").slides
    assert [s["slide"] for s in found["slides"]] == [s.slide for s in want][:5]
    top = found["slides"][0]
    assert top["slide"] == slides_run.slides[1].stem and top["label"] == label_of(slides_run, top["slide"])
    assert top["regions"][0]["distance"] < 1e-6 and top["regions"][0]["image"] == 0
    assert 0 < len(top["regions"]) <= 4 and top["matching_regions"] >= len(top["regions"])
    assert all("/" not in r["name"] for s in found["slides"] for r in s["regions"])
    for s in found["slides"]:
        for r in s["regions"]:
            thumb = client.get(f"/api/archive/{r['id']}/thumbnail")
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg", r
    store = service.archive.store
    from_slide = int(store.ids_where("source", [str(slides_run.slides[1].resolve())])[5])
    from_file = int(store.ids_where("source", [str((slides_run.tiles / "manifest.csv").resolve())])[5])
    row = store.rows([from_slide])[from_slide]
    slide, plan = plan_of(Path(row["source"]))
    cut = plan.cut((int(row["x"]), int(row["y"])))[int(row["magnification"])].astype(float)
    slide.close()
    assert np.abs(np.asarray(service.archive.tile_image(from_slide), dtype=float) - cut).max() <= 1
    thumb = Image.open(io.BytesIO(client.get(f"/api/archive/{from_slide}/thumbnail").content))
    assert thumb.size == (32, 32) and np.abs(np.asarray(thumb, dtype=float) - cut).mean() < 8  # (JPEG)
    file_row = store.rows([from_file])[from_file]
    thumb = Image.open(io.BytesIO(client.get(f"/api/archive/{from_file}/thumbnail").content))
    assert np.abs(np.asarray(thumb, dtype=float) - np.asarray(Image.open(file_row["path"]), dtype=float)).mean() < 8
    for bad, code in [("999999", "unknown_tile"), ("-1", "unknown_tile"), ("1e3", "unknown_tile")]:
        answer = client.get(f"/api/archive/{bad}/thumbnail")
        assert answer.status_code == 404 and answer.json()["code"] == code, (bad, answer.text)
    assert client.get("/api/archive/..%2F..%2Fetc%2Fpasswd/thumbnail").status_code == 404


@pytest.mark.slow
def test_serve_refuses_an_index_of_another_model_and_answers_without_one(slides_run, served, tmp_path):
    """Catches: an archive embedded by another model served anyway (every distance meaningless), or a server
    without an archive that crashes on the archive's endpoint."""
    from fastapi.testclient import TestClient

    from smse.serve import Service, create_app
    from tests.test_index import clustered

    foreign = tmp_path / "foreign"
    Index.build_from_arrays(foreign, clustered(50, 32), {}, fingerprint="another-model")
    with pytest.raises(CheckpointError, match=r"--index .*foreign: built with the model of .*another-mod"):
        Service.from_run(slides_run.run, index=foreign)
    port = str(free_port())
    code, err = main_exit(["serve", str(slides_run.run), "--port", port, "--index", str(foreign)])
    assert code == 2 and "embeddings of another model cannot be compared" in err, err
    code, err = main_exit(["serve", str(slides_run.run), "--port", port, "--index", str(tmp_path / "nowhere")])
    assert code == 2 and "no such index folder" in err, err
    service, _ = served
    plain = TestClient(
        create_app(service=Service(service.model, service.index, service.source)), base_url="http://127.0.0.1"
    )
    assert plain.get("/api/health").json()["archive"] is None
    assert plain.get("/api/archive/0/thumbnail").json()["code"] == "no_archive"
    tile = a_tile(slides_run)
    answer = plain.post("/api/predict", files=[("images", (tile.name, tile.read_bytes(), "image/jpeg"))]).json()
    assert answer["archive"] is None


@pytest.mark.slow
def test_page_in_chromium_shows_the_archive_slides_and_their_regions(slides_run, served, tmp_path):
    """Catches: the archive panel hidden, its thumbnails not loading (the token, the CSP), or a script error."""
    from smse.serve import Service, create_app
    from tests.cdp import Chromium
    from tests.test_report import chromium
    from tests.test_serve import serving

    browser = chromium()
    service, _ = served
    service = Service(service.model, service.index, service.source, archive=service.archive)
    tile = a_tile(slides_run)
    with serving(create_app(service=service)) as url, Chromium(browser, url + "/", tmp_path / "profile") as page:
        page.wait_for("document.body?.dataset.state === 'ready'")
        assert not page.evaluate("document.getElementById('archive').hidden")
        assert "archive of 4 slides" in page.evaluate("document.getElementById('model-info').textContent")
        page.set_files("#file-input", [tile])
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "done", page.evaluate("document.getElementById('status').textContent")
        seen = page.evaluate("""({
            slides: [...document.querySelectorAll('#archive .archive-slide .slide-name')].map(e => e.textContent),
            ranks: [...document.querySelectorAll('#archive .slide-rank')].map(e => e.textContent),
            thumbs: [...document.querySelectorAll('#archive .region img')].map(i => i.complete && i.naturalWidth > 0),
            captions: [...document.querySelectorAll('#archive .region figcaption')].map(e => e.textContent),
            rule: document.querySelector('#archive-body > p').textContent})""")
        shot = page.screenshot(tmp_path / "archive-page.png")
        errors = page.errors()
    assert errors == []
    assert seen["slides"][0] == slides_run.slides[1].stem and seen["ranks"][:2] == ["#1", "#2"]
    assert seen["thumbs"] and all(seen["thumbs"]), seen
    assert seen["captions"][0].startswith("100X · x ") and "d = " in seen["captions"][0]
    assert "1/r" in seen["rule"] and shot.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------------------
# many machines
# ---------------------------------------------------------------------------------------------------------------
def index_contents(path: Path) -> tuple[list, np.ndarray, np.ndarray]:
    """Every row of the metadata, the ids and the vectors of a flat index, by id."""
    import faiss

    with sqlite3.connect(path / "metadata.sqlite") as con:
        rows = con.execute("select * from tiles order by id").fetchall()
    index = faiss.read_index(str(path / "vectors.faiss"))
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    vectors = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)
    order = np.argsort(ids)
    return rows, ids[order], vectors[order]


@pytest.mark.slow
def test_two_torchrun_processes_build_the_same_index_as_one(slides_run, tmp_path):
    """Catches: processes that embed the same slides twice or skip some, part numbers that clash between processes,
    an index assembled before every part is written, or ids, metadata or vectors that depend on the process count."""
    s = slides_run
    sources = [str(p) for p in (s.slides[0], s.slides[1], s.slides[2], s.tiles)]
    env = subprocess_env(OMP_NUM_THREADS="1", SMSE_CACHE_DIR=str(tmp_path / "cache"))
    outputs = {}
    for n in (1, 2):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(n),
                "-m",
                "smse.cli",
                "index",
                "build",
                str(s.run),
                *sources,
                "--out",
                str(tmp_path / f"ix{n}"),
                "--labels",
                str(s.labels),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[n] = done.stdout + done.stderr
    assert "(process 1 of 2)" in outputs[2] and "(process 0 of 2)" in outputs[2]
    assert outputs[2].count("flat index of") == 1  # the first process reports
    rows1, ids1, vectors1 = index_contents(tmp_path / "ix1")
    rows2, ids2, vectors2 = index_contents(tmp_path / "ix2")
    assert rows1 == rows2 and np.array_equal(ids1, ids2) and len(ids1) == len(rows1)
    np.testing.assert_array_equal(vectors1, vectors2)
    notes = [json.loads(p.read_text()) for p in sorted((tmp_path / "ix2" / "parts").glob("*.json"))]
    assert sorted(n["source"] for n in notes) == sorted(
        [*(str(Path(p).resolve()) for p in sources[:3]), str((s.tiles / "manifest.csv").resolve())]
    )
