"""Issue 24, sections 2 and 4: every stored artefact read back is checked against what the run recorded and refused
by name otherwise; every bad option or broken file ends in one ``error:`` line and exit 2, never a traceback."""

import csv
import errno
import json
import logging
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError

from smse.api import ReferenceIndex, load_model
from smse.checkpoint import load_checkpoint, save_checkpoint
from smse.config import DataConfig
from smse.data.loading import load_data
from smse.engine import train
from smse.errors import CheckpointError, DataError, LeakageError, OutputError, SlideError
from smse.evaluate import evaluate_run
from smse.runfiles import RunFiles, save_embeddings
from smse.runfolder import split_fingerprint
from smse.synth.wsi import generate_slides
from smse.wsi import TileSpec, available_backends, open_slide, plan_tiles, write_tiles
from smse.wsi.slide_predict import predict_slide, tiling_of_run
from tests.conftest import make_tree, tiny_config

LONG = "x" * 5000  # a path component far over the 4,096 bytes a path may have


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The command line in this process: its exit code and what it wrote to standard error."""
    from smse import cli as command

    monkeypatch.setattr(sys, "argv", ["smse", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        command.main()
    return stop.value.code, capsys.readouterr().err


def one_error_line(code: int, err: str, *needles: str) -> None:
    """Exit 2 and a single ``error:`` line holding every needle: no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture(scope="module")
def run(synth_data, tmp_path_factory) -> Path:
    """A one-epoch run, not evaluated: each test that changes it works on a copy."""
    out = tmp_path_factory.mktemp("artefacts") / "run"
    return train(tiny_config(synth_data, out, "train.epochs=1"), progress=False)


@pytest.fixture
def copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def split_rows(run: Path) -> tuple[list[str], list[list[str]]]:
    with open(run / "split.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def write_rows(run: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(run / "split.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


# -- 2. split.csv checked against the run's record --------------------------------------------------------------------


def test_the_runs_own_split_passes_the_check(run):
    records = RunFiles(run).read_checked_split()
    assert split_fingerprint(records) == RunFiles(run).read_state()["data"]
    assert {r.split for r in records} >= {"train", "test"}


def test_evaluate_refuses_a_split_csv_cut_short(copy, monkeypatch, capsys):
    """Catches: ``smse evaluate`` on a split.csv cut short (a crash, a copy) exiting 0 on one test image, 100.0 in
    every cell; and, without state.pt, the same cut caught by the counts data.json recorded."""
    header, rows = split_rows(copy)
    split = header.index("split")
    kept = [r for r in rows if r[split] != "test"] + [r for r in rows if r[split] == "test"][:1]
    write_rows(copy, header, kept)
    with pytest.raises(CheckpointError, match=r"split\.csv: not the split this run was trained on .*state\.pt"):
        evaluate_run(copy, progress=False)
    code, err = cli(monkeypatch, capsys, "evaluate", copy)
    one_error_line(code, err, str(copy / "split.csv"), "not the split this run was trained on")
    assert not (copy / "eval" / "metrics.json").exists()
    (copy / "state.pt").unlink()  # a run copied without its resume point: data.json's counts still tell
    with pytest.raises(CheckpointError, match=rf"split\.csv: {len(kept)} images of .* data\.json records {len(rows)} "):
        evaluate_run(copy, progress=False)


def test_evaluate_refuses_a_hand_edited_split_that_puts_a_test_patients_images_in_train(copy):
    """Catches: a split.csv edited to put half of a test patient's images in train, evaluated without the leak
    guard."""
    header, rows = split_rows(copy)
    split, patient = header.index("split"), header.index("patient")
    victim = next(r[patient] for r in rows if r[split] == "test")
    mine = [r for r in rows if r[patient] == victim]
    for r in mine[: len(mine) // 2]:
        r[split] = "train"
    write_rows(copy, header, rows)
    with pytest.raises(LeakageError, match=rf"split\.csv: split leaks: 1 patient\(s\) on both sides: {victim}"):
        evaluate_run(copy, progress=False)


def test_evaluate_refuses_a_split_with_a_patient_moved_whole(copy):
    """Catches: a split.csv edited without leaking (a whole test patient moved to train) read as if it were the
    run's: the fingerprint in state.pt tells."""
    header, rows = split_rows(copy)
    split, patient = header.index("split"), header.index("patient")
    tests = sorted({r[patient] for r in rows if r[split] == "test"})
    for r in rows:
        if r[patient] == tests[0]:
            r[split] = "train"
    write_rows(copy, header, rows)
    with pytest.raises(CheckpointError, match="not the split this run was trained on"):
        evaluate_run(copy, progress=False)


# -- 2. serve --reference checked at load ------------------------------------------------------------------------------


def reference_file(run: Path, path: Path, emb: np.ndarray) -> Path:
    records = [r for r in RunFiles(run).read_split() if r.split != "test"][: len(emb)]
    save_embeddings(path, emb, records, load_model(run).class_map)
    return path


def test_serve_refuses_references_of_another_model_at_load(run, tmp_path, monkeypatch, capsys):
    """Catches: ``serve --reference`` with the .npz of another model (another dimension) starting, then answering
    every /api/predict with a bare 500."""
    from smse.serve import Service

    other = reference_file(run, tmp_path / "other-model.npz", np.random.default_rng(0).normal(size=(10, 7)))
    with pytest.raises(DataError, match=r"other-model\.npz: embeddings of dimension 7, but the model of .* in 16"):
        Service.from_run(run, reference=other)
    code, err = cli(monkeypatch, capsys, "serve", run, "--reference", other, "--port", free_port())
    one_error_line(code, err, str(other), "another model")


@pytest.mark.parametrize("kind", ["text", "no-embeddings", "nan", "one-dimensional", "short-metadata"])
def test_a_reference_npz_that_is_not_one_is_refused_by_name(run, tmp_path, kind, monkeypatch, capsys):
    """Catches: a text file named .npz, or one without ``embeddings``, ending in tracebacks; NaN embeddings taken
    as references."""
    path = tmp_path / f"{kind}.npz"
    if kind == "text":
        path.write_text("these are not embeddings\n")
        expected = "not an embeddings .npz"
    elif kind == "no-embeddings":
        np.savez(path, features=np.zeros((3, 16), np.float32))
        expected = "holds no 'embeddings' array (it holds features)"
    elif kind == "nan":
        emb = np.random.default_rng(0).normal(size=(10, 16))
        emb[3, 5] = np.nan
        reference_file(run, path, emb)
        expected = "1 of 10 rows hold NaN or infinite values (the first is row 3)"
    elif kind == "one-dimensional":
        np.savez(path, embeddings=np.zeros(16, np.float32))
        expected = "expected an [N, d] array"
    else:
        np.savez(path, embeddings=np.zeros((3, 16), np.float32), labels=np.array(["benign"]))
        expected = "labels: 1 values for 3 embeddings"
    with pytest.raises(
        DataError,
        match=rf"^{path}: .*"
        + expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)").replace(".", r"\."),
    ):
        ReferenceIndex.load(path)
    code, err = cli(monkeypatch, capsys, "serve", run, "--reference", path, "--port", free_port())
    one_error_line(code, err, str(path))


def test_reference_index_refuses_non_finite_embeddings():
    """Catches: ``ReferenceIndex`` accepting NaN embeddings and returning neighbours."""
    emb = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    emb[2] = np.inf
    with pytest.raises(ValueError, match=r"embeddings: 1 of 6 rows hold NaN or infinite values \(the first is row 2\)"):
        ReferenceIndex(emb)
    assert len(ReferenceIndex(emb[[0, 1, 3]])) == 3


# -- 2. predict-slide tiles as the model was trained ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tile_run(tmp_path_factory):
    """Four small slides cut into 48x32 tiles at 40X and 100X, and a one-epoch model trained on their manifest."""
    base = tmp_path_factory.mktemp("tile-run")
    root = generate_slides(base / "wsi", patients=4, seed=3, size=(480, 360), mpp=2.0, workers=1)
    spec = TileSpec(magnifications=(40, 100), size=(48, 32), grid=100, max_locations=12)
    result = write_tiles(
        sorted((root / "slides").glob("*.tiff")), base / "tiles", spec, labels=root / "labels.csv", progress=False
    )
    run = train(
        tiny_config(
            result.manifest, base / "run", "train.epochs=1", "model.views=1", f"data.cache_dir={base / 'cache'}"
        ),
        progress=False,
    )
    return root, result, run


def test_the_run_records_the_tiling_it_was_trained_with(tile_run):
    _, result, run = tile_run
    tiling = RunFiles(run).read_tiling()
    assert tiling["magnifications"] == [40, 100] and tiling["size"] == [48, 32] and tiling["grid"] == 100
    assert json.loads((run / "tiling.json").read_text())["source"] == str(result.manifest.parent / "tiles.json")


def test_predict_slide_uses_the_trained_tiling_when_the_tiles_folder_moved_or_was_re_tiled(tile_run, tmp_path):
    """Catches: predict-slide tiling 700x460 at 40X-400X without a word when the training tiles folder was moved or
    re-tiled, instead of the trained 48x32 at 40X-100X."""
    root, result, run = tile_run
    slide = sorted((root / "slides").glob("*.tiff"))[0]
    tiles = result.manifest.parent
    moved = tiles.with_name("tiles-moved")
    tiles.rename(moved)
    try:
        assert tiling_of_run(load_model(run)) == TileSpec(magnifications=(40, 100), size=(48, 32), grid=100)
        score = predict_slide(run, slide, tmp_path / "moved", progress=False)
        assert score["tiling"]["size"] == [48, 32] and score["tiling"]["magnifications"] == [40, 100]
        tiles.mkdir()  # re-tiled in place with another tiling
        (tiles / "manifest.csv").write_text((moved / "manifest.csv").read_text())
        (tiles / "tiles.json").write_text(json.dumps({"tiling": {**TileSpec().to_dict(), "format": "jpg"}}))
        score = predict_slide(run, slide, tmp_path / "re-tiled", progress=False)
        assert score["tiling"]["size"] == [48, 32] and score["tiling"]["magnifications"] == [40, 100]
    finally:
        shutil.rmtree(tiles, ignore_errors=True)
        moved.rename(tiles)


def test_predict_slide_warns_when_the_tiling_asked_for_is_not_the_trained_one(tile_run, tmp_path):
    root, _, run = tile_run
    slide = sorted((root / "slides").glob("*.tiff"))[0]
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("smse.wsi.slide_predict")
    logger.addHandler(handler)
    try:
        predict_slide(
            run, slide, tmp_path / "a", overrides={"size": (64, 48), "magnifications": (40, 200)}, progress=False
        )
    finally:
        logger.removeHandler(handler)
    assert any("--tile 64x48: the model was trained on 48x32 tiles" in s for s in said), said
    assert any("trained on 40X, 100X tiles, not on 200X" in s for s in said), said


def test_a_damaged_tiling_record_is_refused_by_name(tile_run, tmp_path):
    _, _, run = tile_run
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "tiling.json").write_text('{"tiling": {"magnifications": "lots"}}')
    with pytest.raises(CheckpointError, match=r"tiling\.json: not the tiling smse train records"):
        tiling_of_run(load_model(copy))
    (copy / "tiling.json").write_text(
        json.dumps({"tiling": {"magnifications": [40, -3], "size": [48, 32], "grid": None, "min_tissue": 0.5}})
    )
    with pytest.raises(CheckpointError, match=r"tiling\.json: not a valid tiling"):
        tiling_of_run(load_model(copy))


# -- 4. serve options and the port -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_model(monkeypatch):
    """Make loading a model fail loudly: an option error must come before it."""
    import smse.serve.app

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(smse.serve.app, "create_app", refuse)


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--port", "70000", "--port: a port from 1 to 65535, got 70000"),
        ("--port", "-1", "--port: a port from 1 to 65535"),
        ("--port", "0", "--port: a port from 1 to 65535"),
        ("--max-file-mb", "inf", "--max-file-mb: a positive number"),
        ("--max-request-mb", "nan", "--max-request-mb: a positive number"),
        ("--max-megapixels", "-5", "--max-megapixels: a positive number"),
        ("--max-megapixels", "1e300", "--max-megapixels: a positive number"),
        ("--max-files", "0", "--max-files: at least 1"),
        ("--device", "bogus", "--device bogus: not a device"),
        ("--device", "cuda:99", "--device cuda:99: this machine has"),
    ],
)
def test_serve_options_are_checked_before_the_model_loads(
    tmp_path, no_model, monkeypatch, capsys, option, value, needle
):
    """Catches: ``serve`` with inf/nan/out-of-range numbers or ``--device bogus`` ending in a traceback (after the
    model loaded)."""
    code, err = cli(monkeypatch, capsys, "serve", tmp_path / "any-run", option, value)
    one_error_line(code, err, needle)


def test_serve_on_a_port_in_use_is_one_error_line(tmp_path, no_model, run, monkeypatch, capsys):
    """Catches: ``serve`` on a port in use exiting 3 from uvicorn's log, after the model loaded."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, err = cli(monkeypatch, capsys, "serve", tmp_path / "any-run", "--port", port)
    one_error_line(code, err, f"--port {port}: cannot listen there", "another server listens there")


def test_serve_that_uvicorn_cannot_start_is_one_error_line(run, monkeypatch, capsys):
    """Catches: uvicorn's own exit 3 (the port taken between the check and the start) passed on as it is."""
    import uvicorn

    def taken(app, **kwargs):
        sys.exit(3)

    monkeypatch.setattr(uvicorn, "run", taken)
    port = free_port()
    code, err = cli(monkeypatch, capsys, "serve", run, "--port", port)
    one_error_line(code, err, f"--port {port}: the server could not start")


# -- 4. tiles, predict-slide and synth --wsi numbers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return (
        generate_slides(tmp_path_factory.mktemp("one-slide"), patients=1, seed=1, size=(320, 240), mpp=2.0, workers=1)
        / "slides"
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--magnifications", "inf"], "--magnifications: whole magnifications from 1X to 1000X"),
        (["--magnifications", "40X,1e400"], "--magnifications: whole magnifications"),
        (["--magnifications", "40.5"], "--magnifications: whole magnifications"),
        (["--grid", "inf"], "--grid: whole magnifications"),
        (["--grid", "40X,100X"], "--grid: one magnification"),
        (["--seed", "-1"], "--seed: a whole number of at least 0, got -1"),
        (["--tile", "100000x460"], "--tile: from 8x8 to 8192x8192 pixels"),
    ],
)
def test_tiles_options_out_of_range_are_one_error_line(slide, tmp_path, monkeypatch, capsys, args, needle):
    """Catches: ``tiles --magnifications inf`` / ``--grid inf`` (OverflowError) and ``--seed -1`` (numpy's
    ValueError) tracebacks."""
    path = next(slide.glob("*.tiff"))
    # tiles small enough that the slide has more tissue locations than --max-tiles: the seeded sample runs
    small = ["--tile", "48x32", "--magnifications", "40X,100X", "--min-tissue", "0", "--max-tiles", 2]
    code, err = cli(monkeypatch, capsys, "tiles", path, "--out", tmp_path / "tiles", *small, *args)
    one_error_line(code, err, needle)
    assert not (tmp_path / "tiles").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--magnifications", "inf"], "--magnifications: whole magnifications"),
        (["--grid", "inf"], "--grid: whole magnifications"),
    ],
)
def test_predict_slide_options_out_of_range_are_one_error_line(slide, tmp_path, monkeypatch, capsys, args, needle):
    """Catches: ``predict-slide --magnifications inf`` / ``--grid inf`` ending in an OverflowError traceback."""
    code, err = cli(monkeypatch, capsys, "predict-slide", tmp_path / "any-run", next(slide.glob("*.tiff")), *args)
    one_error_line(code, err, needle)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--mpp", "inf"], "--mpp: microns per level-0 pixel from 0.05"),
        (["--mpp", "1e-9"], "--mpp: microns per level-0 pixel from 0.05"),
        (["--mpp", "1000"], "--mpp: microns per level-0 pixel from 0.05"),
        (["--size", "70000x70000"], "--size 70000x70000: a slide is drawn whole in memory"),
    ],
    ids=["mpp-inf", "mpp-1e-9", "mpp-1000", "size-70000x70000"],
)
def test_synth_wsi_numbers_that_cannot_work_are_one_error_line(tmp_path, monkeypatch, capsys, args, needle):
    """Catches: ``synth --wsi --mpp inf`` (OverflowError), ``1e-9`` (array too big), ``1000`` (draws for hours) and
    ``--size 70000x70000`` (a 110 GiB allocation)."""
    code, err = cli(monkeypatch, capsys, "synth", "--wsi", "--out", tmp_path / "wsi", "--patients", 1, *args)
    one_error_line(code, err, needle)
    assert not (tmp_path / "wsi").exists()


# -- 4. broken slides and paths too long -------------------------------------------------------------------------------


@pytest.mark.skipif("tiffslide" not in available_backends(), reason="tiffslide does not import here")
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_tiffslide_on_a_damaged_tiff_names_the_file(slide, tmp_path, monkeypatch, capsys, damage):
    """Catches: ``--backend tiffslide`` on a truncated or corrupt TIFF ending in imagecodecs' DeflateError."""
    import tifffile

    original = next(slide.glob("*.tiff"))
    with tifffile.TiffFile(original) as tiff:  # where level 0's compressed tiles lie
        offsets, counts = tiff.pages[0].dataoffsets, tiff.pages[0].databytecounts
    data = bytearray(original.read_bytes())
    if damage == "truncated":  # cut in the middle of level 0's last tile, as a copy that stopped there
        data = data[: offsets[-1] + counts[-1] // 2]
    else:  # bytes flipped inside every tile of level 0
        for offset, count in zip(offsets, counts):
            for i in range(offset + 16, offset + count, 97):
                data[i] ^= 0x5A
    path = tmp_path / f"{damage}.tiff"
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError, match=rf"{damage}\.tiff: "):
        with open_slide(path, "tiffslide", mpp=2.0) as opened:
            plan_tiles(opened, TileSpec(size=(48, 32), magnifications=(40, 100)))
    code, err = cli(
        monkeypatch,
        capsys,
        "tiles",
        path,
        "--out",
        tmp_path / "tiles",
        "--backend",
        "tiffslide",
        "--tile",
        "48x32",
        "--magnifications",
        "40X,100X",
    )
    one_error_line(code, err, f"{damage}.tiff")


def test_paths_over_the_systems_limit_are_one_error_line(slide, tmp_path, monkeypatch, capsys, run):
    """Catches: a slide, label or manifest path over 4,096 bytes ending in ``OSError: File name too long``."""
    long_slide = tmp_path / f"{LONG}.tiff"
    with pytest.raises(SlideError, match="cannot look up this path of 50.. bytes"):
        open_slide(long_slide)
    code, err = cli(monkeypatch, capsys, "tiles", long_slide, "--out", tmp_path / "t")
    one_error_line(code, err, "cannot look up this path")
    code, err = cli(
        monkeypatch,
        capsys,
        "tiles",
        next(slide.glob("*.tiff")),
        "--out",
        tmp_path / "t",
        "--labels",
        tmp_path / f"{LONG}.csv",
    )
    one_error_line(code, err, "--labels: cannot look up a path of")
    header, rows = split_rows(run)
    manifest = tmp_path / "manifest.csv"
    rows[0][0] = str(tmp_path / f"{LONG}.png")
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([header[:5], *(r[:5] for r in rows)])
    code, err = cli(monkeypatch, capsys, "data", "summary", manifest)
    one_error_line(code, err, "manifest.csv:2: image path cannot be used")  # the row, by file and line
    code, err = cli(monkeypatch, capsys, "data", "summary", manifest, "--skip-bad")  # a bad row: skipped and listed
    assert code == 0 and "Traceback" not in err, err


# -- 4. places that cannot be written ----------------------------------------------------------------------------------


def refuse_writes_under(monkeypatch, folder: Path) -> None:
    """What a read-only folder does to mkdir and to a temporary file in it (chmod cannot stop root)."""
    real_mkdir, real_temp = Path.mkdir, tempfile.TemporaryFile

    def mkdir(self, *args, **kwargs):
        if folder in (self, *self.parents) and not self.exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def temporary(*args, dir=None, **kwargs):
        if dir is not None and folder in (Path(dir), *Path(dir).parents):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_temp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "TemporaryFile", temporary)


def test_evaluate_where_eval_cannot_be_written_names_the_folder(copy, monkeypatch, capsys):
    """Catches: ``evaluate`` on a run folder where a file stands at eval/, or a read-only one, ending in a
    FileExistsError or PermissionError traceback (after minutes of embedding)."""
    (copy / "eval").write_text("not a folder")
    with pytest.raises(OutputError, match=rf"eval folder {copy / 'eval'}: cannot write there .*a file stands where"):
        evaluate_run(copy, progress=False)
    code, err = cli(monkeypatch, capsys, "evaluate", copy)
    one_error_line(code, err, f"eval folder {copy / 'eval'}")
    (copy / "eval").unlink()
    refuse_writes_under(monkeypatch, copy)
    with pytest.raises(OutputError, match=rf"eval folder {copy / 'eval'}: cannot write there \(Permission denied"):
        evaluate_run(copy, progress=False)


def test_report_where_report_cannot_be_written_names_the_folder(copy, monkeypatch, capsys):
    """Catches: ``report`` where a file stands at report/, or on a read-only run folder: a traceback."""
    from smse.report import write_report

    (copy / "eval").mkdir()
    (copy / "eval" / "metrics.json").write_text("{}")
    (copy / "report").write_text("not a folder")
    with pytest.raises(OutputError, match=rf"report folder {copy / 'report'}: cannot write there .*a file stands"):
        write_report(copy)
    code, err = cli(monkeypatch, capsys, "report", copy)
    one_error_line(code, err, f"report folder {copy / 'report'}")
    (copy / "report").unlink()
    refuse_writes_under(monkeypatch, copy)
    with pytest.raises(OutputError, match=r"report folder .*: cannot write there \(Permission denied"):
        write_report(copy)


def test_a_full_disk_while_writing_a_checkpoint_or_state_is_an_output_error(copy, monkeypatch):
    """Catches: a full disk while the checkpoint is written reaching the user as safetensors' SafetensorError (and
    torch's RuntimeError for state.pt) tracebacks; the previous files stay whole and no temporary file is left."""
    import torch

    import smse.checkpoint

    best = copy / "best.safetensors"
    before, state_before = best.read_bytes(), (copy / "state.pt").read_bytes()
    model, cfg, class_map, _ = load_checkpoint(best)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(smse.checkpoint, "save_file", full_disk)
    with pytest.raises(OutputError, match=r"best\.safetensors: cannot write the checkpoint .*the disk is full"):
        save_checkpoint(best, model, cfg, class_map, 1)
    assert best.read_bytes() == before

    def full_disk_torch(obj, path):
        Path(path).write_bytes(b"half a state")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full_disk_torch)
    with pytest.raises(OutputError, match=r"state\.pt: cannot write .*the disk is probably full"):
        RunFiles(copy).write_state({"epoch": 1})
    assert (copy / "state.pt").read_bytes() == state_before
    assert not [p.name for p in copy.iterdir() if p.name.endswith(".tmp")]


# -- 4. one patient per class ------------------------------------------------------------------------------------------


def test_one_patient_per_class_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """Catches: training on one patient per class running on an empty test split, then failing in scikit-learn."""
    root = tmp_path / "data"
    make_tree(root, {("A", "1111"): 2, ("DC", "2222"): 2})
    with pytest.raises(
        DataError,
        match=r"data\.split: every class has a single patient \(benign 1, malignant 1 "
        r".*test split would be empty",
    ):
        load_data(DataConfig(root=str(root)))
    with pytest.raises(DataError, match="test split would be empty"):
        train(tiny_config(root, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()
    code, err = cli(
        monkeypatch,
        capsys,
        "train",
        "--no-evaluate",
        f"data.root={root}",
        f"out={tmp_path / 'run'}",
        "data.image_size=[32, 48]",
        "model.backbone=paper-cnn",
        "model.pretrained=false",
        "model.embedding_dim=16",
        "train.epochs=1",
        "sampler.batch_size=16",
        "train.device=cpu",
    )
    one_error_line(code, err, "test split would be empty")
