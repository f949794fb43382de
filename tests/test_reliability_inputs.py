"""Issue 24, sections 1, 3 and 5: nothing the user points at is left out without a word, the same image gives the
same answer whatever form it comes in, and the smaller promises (pixel limit, advice, resume, cv) hold."""

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smse.api import Model, ReferenceIndex
from smse.checkpoint import build_model
from smse.config import DataConfig
from smse.cv import cross_validate
from smse.data.breakhis import TYPE_FOLDERS, scan_breakhis
from smse.data.images import read_image
from smse.data.loading import load_data
from smse.data.records import ClassMap
from smse.engine import train
from smse.errors import ConfigError, DataError, ImageError
from tests.conftest import breakhis_path, subprocess_env, tiny_config, write_png


def breast(tree: Path) -> Path:
    return tree / "BreaKHis_v1" / "histology_slides" / "breast"


def fold_file(path: Path, records, omit=()) -> Path:
    """A dsfoldN.txt listing ``records`` (minus the file names in ``omit``): slide 9133 and 16184CD in test."""
    lines = []
    for r in records:
        name = Path(r.path).name
        if name not in omit:
            grp = "test" if any(f"-{s}-" in name for s in ("9133", "16184CD")) else "train"
            lines.append(f"{name}|{r.magnification}|1|{grp}\n")
    path.write_text("".join(lines))
    return path


# -- 1. data silently left out -------------------------------------------------------------------


def test_a_tumour_type_folder_that_is_a_symbolic_link_is_followed(tiny_tree, tmp_path):
    """Catches: os.walk not following a linked type folder, so a whole tumour type (here adenosis, 2 patients)
    vanished from the scan with exit 0; record paths are canonical (the link resolved) as the README says."""
    before, _ = scan_breakhis(tiny_tree)
    adenosis = breast(tiny_tree) / "benign" / "SOB" / TYPE_FOLDERS["A"]
    elsewhere = tmp_path / "elsewhere" / "adenosis-copy"
    elsewhere.parent.mkdir()
    shutil.move(adenosis, elsewhere)
    adenosis.symlink_to(elsewhere, target_is_directory=True)
    after, skipped = scan_breakhis(tiny_tree)
    assert len(after) == len(before) == 64 and not skipped
    assert {r.patient for r in after} == {r.patient for r in before}
    linked = [r for r in after if r.tumor_type == "A"]
    assert len(linked) == 16 and all(r.path.startswith(str(elsewhere.resolve()) + os.sep) for r in linked)


def test_a_link_loop_a_second_link_and_a_link_to_nothing_are_refused_by_name(tiny_tree, tmp_path):
    """Catches: links that were silently not followed: a loop (followed, it would never end), a second link to
    a folder already scanned (its images would count twice) and a type folder linked to a missing folder."""
    slide = breakhis_path(tiny_tree, "F", "9133", 40, 1).parent.parent.resolve()  # as the scan names folders
    loop = slide / "40X" / "again"
    loop.symlink_to(slide, target_is_directory=True)
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(f'{loop}: leads to {slide}, already reached as {slide}')}"
        r" \(a symbolic link loop",
    ):
        scan_breakhis(tiny_tree)
    loop.unlink()
    twice = slide.parent / "SOB_B_F_14-9133-copy"
    twice.symlink_to(slide, target_is_directory=True)
    with pytest.raises(DataError, match="two links to one folder"):
        scan_breakhis(tiny_tree)
    twice.unlink()
    lobular = breast(tiny_tree).resolve() / "malignant" / "SOB" / TYPE_FOLDERS["LC"]
    shutil.rmtree(lobular)
    gone = tmp_path / "gone"
    lobular.symlink_to(gone, target_is_directory=True)
    with pytest.raises(DataError, match=f"^{re.escape(f'{lobular}: a symbolic link to {gone}, which does not exist')}"):
        scan_breakhis(tiny_tree)


def test_a_fold_file_that_omits_images_counts_and_names_them(tiny_tree, tmp_path, caplog, monkeypatch):
    """Catches: images of the tree missing from the fold file being dropped without a word (297 of 315 trained,
    nothing printed): they are now counted in the summary line, named with the reason in ``data.json``'s
    ``skipped``, and logged."""
    monkeypatch.setattr(logging.getLogger("smse"), "propagate", True)  # an in-process CLI run may have cut it
    records = load_data(DataConfig(root=str(tiny_tree)), split=False).records
    omitted = sorted(Path(r.path).name for r in records if "-21998CD-" in Path(r.path).name)[:3]
    fold = fold_file(tmp_path / "dsfold1.txt", records, omit=omitted)
    cfg = tiny_config(
        tiny_tree, tmp_path / "run", "train.epochs=1", "data.split.method=fold-file", f"data.split.fold_file={fold}"
    )
    with caplog.at_level(logging.WARNING, logger="smse"):
        data = load_data(cfg.data)
    assert len(data.records) == 61 and sorted(Path(p).name for p, _ in data.left_out) == omitted
    assert f"3 of 64 images left out: 3 not listed in the fold file {fold}" in data.summary_line()
    assert "bad file" not in data.summary_line()
    assert f"3 of the 64 images found there are not listed in the fold file {fold}" in caplog.text
    assert omitted[0] in caplog.text
    run = train(cfg, progress=False)
    written = json.loads((run / "data.json").read_text())
    assert "3 of 64 images left out" in written["summary"]
    assert (
        sorted(Path(p).name for p, why in written["skipped"] if why.startswith("not listed in the fold file"))
        == omitted
    )


def test_fold_file_entries_not_under_the_root_are_counted(tiny_tree, tmp_path):
    """Catches: a fold file naming images the data root does not hold (a subset of the archive, a wrong root)
    without a word: they are counted, with an example, in the summary line that data.json keeps."""
    records = load_data(DataConfig(root=str(tiny_tree)), split=False).records
    fold = fold_file(tmp_path / "dsfold1.txt", records)
    with open(fold, "a") as handle:
        handle.write("SOB_B_A-14-99999-40-001.png|40|1|train\nSOB_B_A-14-99999-40-002.png|40|1|test\n")
    cfg = tiny_config(tiny_tree, tmp_path / "run", "data.split.method=fold-file", f"data.split.fold_file={fold}")
    data = load_data(cfg.data)
    assert data.not_found == ["SOB_B_A-14-99999-40-001.png", "SOB_B_A-14-99999-40-002.png"]
    assert "the fold file lists 2 images not found here (e.g. SOB_B_A-14-99999-40-001.png)" in data.summary_line()
    assert len(data.records) == len(records)  # nothing of the tree is lost


# -- 3. the same image, the same answer ------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Model:
    """A model with random weights (no training): the question is only whether its inputs agree."""
    torch.manual_seed(0)
    cfg = tiny_config(Path("unused"), Path("unused"))
    module, _ = build_model(cfg, 2, pretrained=False)
    return Model(module, cfg, ClassMap("binary", ("benign", "malignant")))


def _modes():
    rng = np.random.default_rng(0)
    h, w = 23, 35
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    return {
        "RGB.png": (rgb, {}),
        "RGBA.png": (Image.merge("RGBA", (*rgb.split(), alpha)), {}),
        "RGBA.tiff": (Image.merge("RGBA", (*rgb.split(), alpha)), {}),
        "LA.png": (Image.merge("LA", (rgb.convert("L"), alpha)), {}),
        "P.png": (rgb.convert("P"), {}),
        "P-transparent.png": (rgb.convert("P"), {"transparency": 0}),
        "L.png": (rgb.convert("L"), {}),
        "1.png": (rgb.convert("1"), {}),
        "I;16.png": (Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)), {}),
        "I.tiff": (Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32)), {}),
        "F.tiff": (Image.fromarray(rng.random((h, w)).astype(np.float32) * 255), {}),
        "CMYK.jpg": (rgb.convert("CMYK"), {}),
        "CMYK.tiff": (rgb.convert("CMYK"), {}),
        "LAB.tiff": (rgb.convert("LAB"), {}),
        "YCbCr.tiff": (rgb.convert("YCbCr"), {}),
    }


@pytest.mark.parametrize("name", list(_modes()))
def test_a_path_and_pil_image_open_of_it_give_the_same_answer_in_every_mode(model, tmp_path, name):
    """Catches: a PIL image taking its own conversion (``convert("RGB")``) while a path took ``to_rgb8``: RGBA
    dropped its alpha instead of compositing on white (33.7/255 apart), 16-bit grey was clipped instead of scaled
    (73.8/255 apart), so ``predict_proba(path)`` and ``predict_proba(Image.open(path))`` disagreed."""
    image, options = _modes()[name]
    path = tmp_path / name.replace(";", "")
    image.save(path, **options)
    with Image.open(path) as opened:
        assert opened.mode == image.mode  # the file holds the mode under test
        from_pil = model.transform(opened)
        probs_pil = model.predict_proba(opened)
    torch.testing.assert_close(from_pil, model.transform(path), rtol=0, atol=0)
    np.testing.assert_array_equal(probs_pil, model.predict_proba(str(path)))


def test_arrays_and_tensors_of_the_same_pixels_give_the_same_answer(model, tmp_path):
    """Catches: a uint8 tensor resized by torch (always bilinear) while the same pixels as an array or a file were
    resized by PIL with the backbone's filter; a float tensor now differs from them by rounding only."""
    path = write_png(tmp_path / "a.png", 3, size=(70, 45))
    array = np.asarray(Image.open(path).convert("RGB"))
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1)
    expected = model.transform(path)
    torch.testing.assert_close(model.transform(array), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.transform(chw), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.transform(chw.float() / 255), expected, rtol=0, atol=1.5 / 255)


@pytest.mark.parametrize("side", [0, 1, 7])
def test_tiny_arrays_tensors_and_pil_images_are_refused_like_tiny_files(model, tmp_path, side):
    """Catches: 0x0 and 1x1 arrays, tensors and PIL images being classified while files under 8 px are refused."""
    expected = f"image is only {side}x{side} pixels"
    if side:
        path = write_png(tmp_path / "tiny.png", 1, size=(side, side))
        with pytest.raises(ImageError, match=rf"tiny.png: {expected}$"):
            model.predict_proba(path)
    for image, name in [
        (np.zeros((side, side, 3), np.uint8), "<array>"),
        (torch.zeros(3, side, side), "<tensor>"),
        (torch.zeros(3, side, side, dtype=torch.uint8), "<tensor>"),
        (Image.new("RGB", (side, side)), "<PIL image>"),
    ]:
        with pytest.raises(ImageError, match=rf"^{name}: {expected}$"):
            model.predict_proba(image)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_batch_size_below_one_is_refused(model, tmp_path, batch_size):
    """Catches: ``batch_size=-1`` (or 0) returning no rows at all for the images given."""
    path = write_png(tmp_path / "a.png", 1)
    with pytest.raises(ValueError, match=rf"batch_size: .* at least 1, got {batch_size!r}"):
        model.predict_proba([path, path], batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        model.embed(path, batch_size=batch_size)
    assert model.predict_proba([path, path], batch_size=1).shape == (2, 2)


# -- 5. smaller ------------------------------------------------------------------------------------


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_pixel_limit_is_pils_error_threshold_and_the_option_sets_it(monkeypatch):
    """Catches: images over PIL's warning threshold (``Image.MAX_IMAGE_PIXELS``, 89.5 Mpx) refused though the README
    promises PIL's error threshold (twice that, ~179 Mpx), and a larger ``max_pixels`` (``serve --max-megapixels
    150``) having no effect above 89.5 Mpx. PIL's thresholds are scaled down here: 2,500 and 5,000 pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)
    assert read_image(io.BytesIO(png_bytes(60, 60))).size == (60, 60)  # over 2,500, under 5,000: decoded
    with pytest.raises(ImageError, match=r"^big.png: too large to decode safely"):  # over 5,000: PIL's ceiling
        read_image(io.BytesIO(png_bytes(80, 80)), name="big.png")
    assert read_image(io.BytesIO(png_bytes(65, 65)), max_pixels=4500).size == (65, 65)  # the option decides
    with pytest.raises(ImageError, match=r"^up.png: image is 70x70 = 4,900 pixels, over the limit of 4,500$"):
        read_image(io.BytesIO(png_bytes(70, 70)), max_pixels=4500, name="up.png")


def test_serve_max_megapixels_above_pils_warning_is_the_limit(model, monkeypatch):
    """Catches: ``serve --max-megapixels 200`` having no effect above 89.5 Mpx (PIL's warning, made an error)."""
    from smse.serve.service import Limits, Service, Upload

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)  # PIL's thresholds scaled down: 2,500 and 5,000 pixels
    rng = np.random.default_rng(0)
    index = ReferenceIndex(
        rng.normal(size=(12, 16)).astype(np.float32),
        labels=np.array(["benign", "malignant"] * 6),
        tumor_types=np.array(["A", "DC"] * 6),
        magnifications=np.full(12, 40),
        patients=np.array([f"p{i // 2}" for i in range(12)]),
        paths=np.array([f"/x/{i}.png" for i in range(12)]),
    )
    service = Service(model, index, "test", Limits(max_pixels=4500))
    answer = service.predict([Upload("big.png", png_bytes(65, 65)), Upload("huge.png", png_bytes(70, 70))], k=3)
    assert "error" not in answer["images"][0], answer["images"][0]
    assert "over the limit of 4,500" in answer["images"][1]["error"]


@pytest.fixture(scope="module")
def short_run(synth_data, tmp_path_factory) -> Path:
    """A one-epoch run (an unfinished run for a two-epoch config), copied by each test that changes it."""
    return train(tiny_config(synth_data, tmp_path_factory.mktemp("short") / "run", "train.epochs=1"), progress=False)


def test_embed_advises_only_what_it_accepts(short_run, tiny_tree, tmp_path):
    """Catches: ``smse embed`` (and ``serve --reference``, which embeds the same way) answering a bad image with
    "data.skip_bad=true or --skip-bad skips bad files": options neither command accepts."""
    victim = breakhis_path(tiny_tree, "F", "9133", 200, 1)
    victim.write_bytes(victim.read_bytes()[:60])
    proc = subprocess.run(
        [sys.executable, "-m", "smse.cli", "embed", str(short_run), str(tiny_tree), "--out", str(tmp_path / "e.npz")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = [text for text in proc.stderr.splitlines() if text.startswith("error:")]  # progress lines aside
    assert line.startswith(f"error: {victim}: corrupt or truncated") and "fix or remove the file" in line
    assert "--skip-bad skips" not in line and "smse data summary with --skip-bad" in line
    help_text = subprocess.run(
        [sys.executable, "-m", "smse.cli", "embed", "--help"], capture_output=True, text=True, env=subprocess_env()
    ).stdout
    assert "--skip-bad" not in help_text  # so the advice must not send the user there


def test_a_refused_resume_names_the_fields_that_differ(short_run, synth_data, tmp_path):
    """Catches: "holds a run with another config" without a word on which setting differs."""
    run = shutil.copytree(short_run, tmp_path / "run")
    with pytest.raises(
        ConfigError,
        match=r"state.pt: this run folder holds a run with another config: "
        r"loss.gamma \(\S+ there, 2.5 now\); model.embedding_dim \(16 there, "
        r"32 now\); resume with the same values",
    ):
        train(
            tiny_config(synth_data, run, "train.epochs=2", "loss.gamma=2.5", "model.embedding_dim=32"), progress=False
        )


def test_a_run_from_before_zooms_resumes_with_the_plain_features_it_had(short_run, synth_data, tmp_path):
    """Catches: a state saved before ``model.zooms`` existed refused whatever the zooms ("unset there"), or an
    ``auto`` run refused when resumed with the list auto stands for."""
    from smse.runfiles import RunFiles

    run = shutil.copytree(short_run, tmp_path / "run")
    files = RunFiles(run)
    state = files.read_state()
    assert state["config"]["model"]["zooms"] == [1]  # saved resolved: auto with class positives
    del state["config"]["model"]["zooms"]
    files.write_state(state)
    train(tiny_config(synth_data, run, "train.epochs=2", "model.zooms=[1]"), progress=False)  # auto, said as a list
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2]
    other = shutil.copytree(short_run, tmp_path / "other")
    with pytest.raises(ConfigError, match=r"model.zooms \(\[1\] there, \[1, 2\] now\)"):
        train(tiny_config(synth_data, other, "train.epochs=2", "model.zooms=[1, 2]"), progress=False)


def test_a_renamed_run_folder_resumes(short_run, synth_data, tmp_path):
    """Catches: the run folder's own path (``out``) in the resume key, so a moved or renamed run could never be
    extended ("holds a run with another config")."""
    moved = shutil.copytree(short_run, tmp_path / "renamed")
    train(tiny_config(synth_data, moved, "train.epochs=2"), progress=False)
    assert [h["epoch"] for h in json.loads((moved / "history.json").read_text())] == [1, 2]


def test_cv_checks_every_fold_file_before_the_first_fold_trains(tiny_tree, tmp_path):
    """Catches: ``smse cv`` training folds 1 and 2 before finding that the fold file of fold 3 is missing (or
    lists none of the images)."""
    records = load_data(DataConfig(root=str(tiny_tree)), split=False).records
    for k in (1, 2):
        fold_file(tmp_path / f"dsfold{k}.txt", records)
    out = tmp_path / "cv"
    cfg = tiny_config(
        tiny_tree,
        out,
        "train.epochs=1",
        "data.split.method=fold-file",
        f"data.split.fold_file={tmp_path / 'dsfold{fold}.txt'}",
    )
    with pytest.raises(DataError, match=r"dsfold3.txt: fold file not found"):
        cross_validate(cfg, 3)
    assert not out.exists()  # no fold trained
    (tmp_path / "dsfold3.txt").write_text("SOB_B_A-14-99999-40-001.png|40|3|train\n")
    with pytest.raises(DataError, match=r"dsfold3.txt: fold 3 lists none of the 64 images found under"):
        cross_validate(cfg, 3)
    (tmp_path / "dsfold3.txt").write_text("a|b|c\n")
    with pytest.raises(DataError, match=r"dsfold3.txt:1: expected filename\|mag\|fold\|grp"):
        cross_validate(cfg, 3)
    assert not out.exists()


def test_resume_after_image_files_were_deleted_names_them_as_gone(synth_data, tmp_path):
    """Catches: the saved split read with its files checked, so a deleted image stops the resume with
    "split.csv:N: image not found" instead of the list of what changed."""
    import shutil

    from smse.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    run = train(tiny_config(data, tmp_path / "run", "train.epochs=1"), progress=False)
    victim = sorted(data.rglob("*.png"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=r"the data changed since this run started \(1 image\(s\) gone, e\.g\. "):
        train(tiny_config(data, run, "train.epochs=2"), progress=False)
