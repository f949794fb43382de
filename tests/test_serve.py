"""``smse serve``: the JSON API on a tiny trained run, every bad input, the token rule, the command line."""

import io
import os
import re
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import smse
from smse.serve import Limits, Service, create_app
from smse.serve.service import ReferenceMap
from tests.conftest import SAMPLE, png_bomb, tiny_config

LIMITS = Limits(max_files=4, max_file_bytes=300_000, max_request_bytes=600_000, max_pixels=2_000_000, max_k=10)


@pytest.fixture(scope="module")
def run(synth_data, tmp_path_factory):
    return smse.train(tiny_config(synth_data, tmp_path_factory.mktemp("serve") / "run"), evaluate=False)


@pytest.fixture(scope="module")
def service(run):
    return Service.from_run(run.path, limits=LIMITS)


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service=service), base_url="http://127.0.0.1")


def split_paths(run, split: str) -> list[Path]:
    rows = [line.split(",") for line in (run.path / "split.csv").read_text().splitlines()[1:]]
    return sorted(Path(r[0]) for r in rows if r[-1] == split)


def png_bytes(size=(60, 40), seed=0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def post(client, files, **data):
    """POST /api/predict with ``files`` = [(name, bytes), ...]."""
    return client.post(
        "/api/predict", files=[("images", (name, content, "image/png")) for name, content in files], data=data
    )


def test_health_names_model_reference_and_limits(client, run, service):
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["version"] == smse.__version__
    assert body["model"]["classes"] == ["benign", "malignant"] and body["model"]["backbone"] == "paper-cnn"
    assert body["reference"]["size"] == len(split_paths(run, "train") + split_paths(run, "val")) == len(service.index)
    guide = body["distance_guide"]
    assert guide["references"] == len(service.index) and guide["ood_threshold"] > 0
    assert guide["same_type"]["pairs"] + guide["same_class"]["pairs"] + guide["other_class"]["pairs"] > 0
    assert set(body["reference"]["magnifications"]) == {"40", "100", "200", "400"}
    assert body["limits"]["max_files"] == 4 and body["map"]["method"] == "PCA"


def test_a_reference_image_finds_itself_at_every_level(client, run, service):
    path = split_paths(run, "train")[5]
    response = post(client, [(path.name, path.read_bytes())], k="3")
    assert response.status_code == 200, response.text
    body = response.json()
    image = body["images"][0]
    own = int(np.flatnonzero(service.index.metadata["paths"] == str(path))[0])
    mag = int(path.parent.name.removesuffix("X"))
    assert image["magnification"] == mag and image["magnification_source"] == "name"
    assert image["predicted"] in body["classes"] and sum(image["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert [n["rank"] for n in image["neighbours"]] == [1, 2, 3]
    assert image["neighbours"][0]["id"] == own and image["neighbours"][0]["distance"] == pytest.approx(0, abs=1e-3)
    assert image["neighbours"][0]["file"] == path.name and "/" not in image["neighbours"][0]["file"]
    groups = {g["magnification"]: g["neighbours"] for g in image["by_magnification"]}
    assert list(groups) == [40, 100, 200, 400]
    for m, hits in groups.items():
        assert len(hits) == 3 and all(n["magnification"] == m for n in hits)
        assert np.all(np.diff([n["distance"] for n in hits]) >= 0)
        # an overall top-k hit at this magnification is always among this magnification's top k
        assert {n["id"] for n in hits if n["in_top_k"]} == {
            n["id"] for n in image["neighbours"] if n["magnification"] == m
        }
    assert groups[mag][0]["id"] == own
    # the query lands on the map exactly where its own reference point is
    ref_map = client.get("/api/reference/map").json()
    assert len(ref_map["x"]) == len(service.index)
    assert image["map"] == pytest.approx([ref_map["x"][own], ref_map["y"][own]], abs=1e-3)
    thumb = client.get(f"/api/reference/{own}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == Image.open(path).size  # smaller than 256: kept as is


def test_the_case_is_the_mean_of_its_images_and_given_magnifications_win(client, run):
    paths = split_paths(run, "test")[:3]
    response = post(client, [(p.name, p.read_bytes()) for p in paths], k="2", magnification=["auto", "100X", "400"])
    assert response.status_code == 200, response.text
    body = response.json()
    probs = np.array([[im["probabilities"][c] for c in body["classes"]] for im in body["images"]])
    case = body["case"]
    assert case["images"] == 3
    np.testing.assert_allclose([case["probabilities"][c] for c in body["classes"]], probs.mean(0), atol=1e-6)
    assert case["predicted"] == body["classes"][int(probs.mean(0).argmax())]
    assert sum(case["neighbour_vote"].values()) == 3 * 2
    assert [(im["magnification"], im["magnification_source"]) for im in body["images"]][1:] == [
        (100, "given"),
        (400, "given"),
    ]
    assert body["images"][0]["magnification_source"] == "name"
    refused = post(client, [(paths[0].name, paths[0].read_bytes())], magnification=["50X"])
    assert refused.status_code == 422 and "50X is not one of the references' (40X, 100X, 200X, 400X)" in refused.text


def flat_png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 180)).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_png() -> bytes:
    data = png_bytes((200, 100))
    return data[: len(data) // 2]


BAD = {
    "not an image": (b"just some text, not pixels\n" * 20, "notes.png", "not an image file"),
    "truncated": (truncated_png(), "cut.png", "corrupt or truncated"),
    "zero bytes": (b"", "empty.png", "file is empty"),
    "huge image": (
        flat_png((2000, 1001)),
        "huge.png",
        "image is 2000x1001 = 2,002,000 pixels, over the limit of 2,000,000",
    ),
    "decompression bomb": (
        png_bomb(5000, 5000),
        "bomb.png",
        "image is 5000x5000 = 25,000,000 pixels, over the limit of 2,000,000",
    ),
    "too small": (png_bytes((4, 4)), "tiny.png", "only 4x4 pixels"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_image_gets_a_clear_json_error_and_the_server_goes_on(client, run, case):
    content, name, message = BAD[case]
    response = post(client, [(name, content)])
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "bad_image" and body["error"].startswith(f"{name}: ") and message in body["error"]
    # with a good image beside it, the good one is answered and the bad one named
    good = split_paths(run, "test")[0]
    response = post(client, [(name, content), (good.name, good.read_bytes())])
    assert response.status_code == 200
    bad, ok = response.json()["images"]
    assert (
        message in bad["error"]
        and bad["predicted"] is None
        and ok["predicted"]
        and response.json()["case"]["images"] == 1
    )
    assert client.get("/api/health").status_code == 200


def test_upload_limits(client):
    small = png_bytes()
    response = post(client, [(f"x{i}.png", small) for i in range(5)])  # limit 4
    assert response.status_code == 400 and response.json()["code"] == "bad_form"
    assert "Too many files" in response.json()["error"] and "4" in response.json()["error"]
    big = png_bytes((400, 300), seed=1)  # ~360 kB of noise, over 300 kB per file
    assert 300_000 < len(big) < 600_000
    response = post(client, [("big.png", big)])
    assert response.status_code == 413 and response.json()["code"] == "file_too_large"
    assert response.json()["error"].startswith("big.png: ")
    response = post(client, [("a.png", big), ("b.png", big)])  # over 600 kB per request
    assert response.status_code == 413 and response.json()["code"] == "upload_too_large"
    chunked = client.post(
        "/api/predict", content=iter([b"--x\r\n"]), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert chunked.status_code == 411 and chunked.json()["code"] == "length_required"
    assert client.get("/api/health").status_code == 200


@pytest.mark.parametrize(
    "form, message",
    [
        ({}, "images: no image uploaded"),
        ({"k": "0"}, "k: expected 1 to 10"),
        ({"k": "many"}, "k: expected an integer"),
        ({"k": ("k.png", b"1")}, "k: expected an integer"),
        ({"magnification": "banana"}, "magnification: expected a magnification"),
        ({"magnification": ["40", "100"]}, "magnification: 2 values for 1 images"),
    ],
)
def test_bad_fields_are_named(client, form, message):
    files = [("images", ("x.png", png_bytes()))] if form else []
    files += [(key, value) for key, value in form.items() if isinstance(value, tuple)]  # a file where text belongs
    data = {key: value for key, value in form.items() if not isinstance(value, tuple)}
    response = client.post("/api/predict", files=files or None, data=data or {"k": "5"})
    assert response.status_code == 422 and message in response.json()["error"], response.text


@pytest.mark.parametrize(
    "ref_id",
    ["999999", "-1", "1.png", "0x1", "%2E%2E", "..%2F..%2Fetc%2Fpasswd", "%EF%BC%91", "%2Fetc%2Fpasswd", "1%00"],
)
def test_thumbnails_only_by_known_id(client, service, monkeypatch, ref_id):
    monkeypatch.setattr(service, "thumbnail", lambda i: pytest.fail(f"thumbnail({i!r}) reached the service"))
    response = client.get(f"/api/reference/{ref_id}/thumbnail")
    assert response.status_code == 404 and response.json()["error"], response.text


def test_a_reference_that_left_the_disk_is_a_clear_404(run, service, tmp_path):
    index = smse.ReferenceIndex(service.index.embeddings[:3], paths=np.array([str(tmp_path / "gone.png")] * 3))
    client = TestClient(create_app(service=Service(service.model, index, "test")), base_url="http://127.0.0.1")
    response = client.get("/api/reference/1/thumbnail")
    assert response.status_code == 404 and response.json()["error"] == "reference id 1 (gone.png): file not found"


def test_token_guards_every_api_call_but_not_the_page(service, run):
    client = TestClient(create_app(service=service, token="s3cret"), base_url="http://any.example")
    good = split_paths(run, "test")[0]
    for method, url in [
        ("get", "/api/health"),
        ("get", "/api/reference/map"),
        ("get", "/api/reference/0/thumbnail"),
        ("post", "/api/predict"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = getattr(client, method)(url, headers=headers)
            assert response.status_code == 401 and response.json()["code"] == "unauthorized", (url, headers)
            assert response.headers["www-authenticate"] == "Bearer"
    auth = {"Authorization": "Bearer s3cret"}
    assert client.get("/api/health", headers=auth).status_code == 200
    assert client.get("/api/reference/0/thumbnail", headers=auth).status_code == 200
    response = client.post(
        "/api/predict", headers=auth, files=[("images", (good.name, good.read_bytes(), "image/png"))]
    )
    assert response.status_code == 200 and response.json()["case"]["images"] == 1
    page = client.get("/")  # the page holds no data; it asks for the token
    assert page.status_code == 200 and 'id="token-box"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_without_a_token_only_local_host_names_are_answered(client):
    for host in ("localhost:8000", "127.0.0.1", "127.0.0.2:80", "[::1]:8000", "LOCALHOST"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
    for host in ("rebound.example", "rebound.example:8000", "10.0.0.1:8000", "[::2]:8000", "localhost.example"):
        for url in ("/api/health", "/"):  # DNS rebinding: a foreign page that resolves its name to 127.0.0.1
            response = client.get(url, headers={"Host": host})
            assert response.status_code == 400 and response.json()["code"] == "host_not_local", host


def test_page_and_static_files_are_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200
    assert "http://" not in page.text and "https://" not in page.text
    for name in ("app.js", "style.css"):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200
        assert set(re.findall(r"https?://[^\s\"']*", response.text)) <= {
            "http://www.w3.org/2000/svg"
        }  # a name, not a link
    schema = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/health", "/api/reference/map", "/api/reference/{ref_id}/thumbnail"} <= set(
        schema["paths"]
    )
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["images"]


def test_concurrent_requests_get_the_answers_of_sequential_ones(client, run):
    paths = split_paths(run, "test")[:4]
    expected = [post(client, [(p.name, p.read_bytes())]).json()["images"][0]["probabilities"] for p in paths]
    got = [None] * 8

    def worker(i):
        p = paths[i % 4]
        got[i] = post(client, [(p.name, p.read_bytes())]).json()["images"][0]["probabilities"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, probs in enumerate(got):
        assert probs == pytest.approx(expected[i % 4], abs=1e-6)


def test_reference_data_is_embedded_once_and_cached_in_the_run(run, service, synth_data, monkeypatch):
    import smse.evaluate

    first = Service.from_run(run.path, reference=synth_data)
    cached = list((run.path / "references").glob("*.npz"))
    assert len(cached) == 1 and len(first.index) == 120 and first.source == str(synth_data)
    assert set(first.index.metadata["magnifications"].tolist()) == {40, 100, 200, 400}
    monkeypatch.setattr(smse.evaluate, "embed_folder", lambda *a, **k: pytest.fail("embedded twice"))
    again = Service.from_run(run.path, reference=synth_data)
    np.testing.assert_array_equal(again.index.embeddings, first.index.embeddings)
    from_npz = Service.from_run(run.path, reference=cached[0])
    assert len(from_npz.index) == 120
    with pytest.raises(smse.errors.DataError, match="nowhere: no such file or folder"):
        Service.from_run(run.path, reference=Path("nowhere"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_map_is_pca(dtype):
    from sklearn.decomposition import PCA

    emb = np.random.default_rng(0).normal(size=(50, 6)).astype(dtype) * np.array([5, 3, 1, 1, 0.5, 0.1], dtype)
    ref = ReferenceMap(emb)
    pca = PCA(2).fit(emb.astype(np.float64))
    expected = pca.transform(emb.astype(np.float64))
    signs = np.sign((ref.points * expected).sum(0))
    np.testing.assert_allclose(ref.points, expected * signs, atol=1e-6 if dtype == np.float64 else 1e-4)
    np.testing.assert_allclose(ref.explained, pca.explained_variance_ratio_, atol=1e-6)
    np.testing.assert_allclose(ref.transform(emb[:3]), ref.points[:3])


def test_cli_refuses_a_public_bind_without_token(run, monkeypatch, capsys):
    import uvicorn

    from smse import cli

    monkeypatch.delenv("SMSE_TOKEN", raising=False)
    monkeypatch.setattr(sys, "argv", ["smse", "serve", str(run.path), "--host", "0.0.0.0"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2 and "--host 0.0.0.0: not a loopback address" in capsys.readouterr().err
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.setenv("SMSE_TOKEN", "from-env")
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0
    assert started["host"] == "0.0.0.0" and started["port"] == 8000
    guarded = TestClient(started["app"])
    assert guarded.get("/api/health").status_code == 401
    assert guarded.get("/api/health", headers={"Authorization": "Bearer from-env"}).status_code == 200
    monkeypatch.delenv("SMSE_TOKEN")
    monkeypatch.setattr(sys, "argv", ["smse", "serve", str(run.path), "--host", "::1", "--port", "8123"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0
    assert started["host"] == "::1" and started["port"] == 8123


def page_image(run) -> Path:
    """A real BreakHis image when the sample is here (a 100X malignant one), else a synthetic test image."""
    real = sorted(SAMPLE.glob("BreaKHis_v1/histology_slides/breast/malignant/SOB/*/*/100X/*.png"))
    return real[0] if real else split_paths(run, "test")[0]


@contextmanager
def serving(app):
    """The app on a free localhost port, served by uvicorn in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.mark.slow
def test_page_in_chromium_classifies_an_upload_and_shows_neighbours(service, run, tmp_path):
    from tests.cdp import Chromium
    from tests.test_report import chromium

    browser = chromium()
    image = page_image(run)
    service = Service(service.model, service.index, service.source)  # default limits: a real image is 0.5 MiB
    with serving(create_app(service=service)) as url, Chromium(browser, url + "/", tmp_path / "profile") as page:
        page.wait_for("document.body?.dataset.state === 'ready'")
        assert page.evaluate("document.querySelectorAll('#map .dots circle').length") == len(service.index)
        assert "null" not in page.evaluate("document.getElementById('map-legend').textContent")  # before any query
        page.set_files("#file-input", [image])  # the same path as a drop: addFiles -> POST /api/predict
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "done", page.evaluate("document.getElementById('status').textContent")
        seen = page.evaluate("""({
            predicted: [...document.querySelectorAll('.result .query-text .chip.big')].map(e => e.textContent),
            classes: [...document.querySelectorAll('.result .bar-name')].map(e => e.textContent),
            rows: [...document.querySelectorAll('.result .mag-label b')].map(e => e.textContent),
            thumbs: [...document.querySelectorAll('.neighbour img')].map(i => i.complete && i.naturalWidth > 0),
            ranked: document.querySelectorAll('.neighbour .rank').length,
            case: document.querySelector('#case-body .chip').textContent,
            marks: document.querySelectorAll('#map .query-mark').length,
            painted: [...document.querySelectorAll('.chip, .track .fill, .legend i')]
                .every(e => getComputedStyle(e).backgroundColor !== 'rgba(0, 0, 0, 0)'),
            vote: document.querySelector('#case-body .vote').textContent,
            guide: document.querySelector('.result .guide')?.textContent || '',
            status: document.getElementById('status').textContent})""")
        shot = page.screenshot(tmp_path / "serve-page.png")
        broken = tmp_path / "broken.png"
        broken.write_bytes(image.read_bytes()[:2000])
        page.evaluate("document.body.dataset.state = 'busy'")
        page.set_files("#file-input", [broken])  # joins the queue: the case is sent again with both images
        page.wait_for("document.body.dataset.state === 'done'")
        after = page.evaluate("""({
            failed: [...document.querySelectorAll('.result.failed .error')].map(e => e.textContent),
            predicted: document.querySelectorAll('.result .query-text .chip.big').length,
            status: document.getElementById('status').textContent})""")
        errors = page.errors()
    assert errors == []
    assert len(seen["predicted"]) == 1 and seen["predicted"][0] in service.model.classes, seen
    assert seen["classes"] == list(service.model.classes) and seen["case"] == seen["predicted"][0]
    assert seen["rows"] == ["40X", "100X", "200X", "400X"]
    assert len(seen["thumbs"]) == 4 * 5 and all(seen["thumbs"]), seen  # k=5 per magnification, every one loaded
    assert seen["ranked"] == 5 and seen["marks"] == 1 and "1 image analysed" in seen["status"]
    assert (
        seen["painted"] and "(5 neighbours): " in seen["vote"] and "object" not in seen["vote"]
    )  # styles pass the CSP
    assert seen["guide"].startswith("Reading d (median between references of other patients): same type"), seen
    assert len(after["failed"]) == 1 and after["failed"][0].startswith("broken.png: corrupt or truncated image"), after
    assert after["predicted"] == 1 and after["status"].endswith("1 unreadable")
    assert shot.stat().st_size > 30_000
    keep = os.environ.get("SMSE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "serve-page.png")
