"""serve: the HTTP API in-process (fast), bad input, batching, ONNX without torch, and the page in a real browser."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visiontune
from visiontune.cli import main

from .conftest import WITHOUT_TORCH, make_image


def client_for(model, **settings):
    from fastapi.testclient import TestClient

    from visiontune.serve import create_app

    return TestClient(create_app(model, device="cpu", **settings))


def val_images(data: Path) -> list[Path]:
    return sorted((data / "val").rglob("*.png"))


def test_predict_health_model_and_json(tiny_run, tiny_data):
    images = val_images(tiny_data)
    expected = visiontune.load(tiny_run.path).predict(images)
    with client_for(tiny_run.path) as client:
        assert client.get("/health").json()["status"] == "ok"
        info = client.get("/model").json()
        assert info["classes"] == ["ants", "bees"] and info["architecture"] == "test_efficientnet"
        assert info["preprocessing"]["size"] == 48 and info["metrics"]["val_acc"] == tiny_run.best_val_acc
        files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images]
        got = client.post("/predict", files=files).json()["predictions"]
        assert [g["filename"] for g in got] == [p.name for p in images]
        for g, e in zip(got, expected):
            assert g["label"] == e["label"] and abs(g["score"] - e["score"]) <= 1e-5
            assert [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]]
        single = client.post("/predict?top_k=1", json={"image": base64.b64encode(images[0].read_bytes()).decode()})
        assert single.status_code == 200
        (row,) = single.json()["predictions"]
        assert row["label"] == expected[0]["label"] and len(row["top_k"]) == 1
        data_url = "data:image/png;base64," + base64.b64encode(images[1].read_bytes()).decode()
        rows = client.post("/predict", json={"images": [data_url]}).json()["predictions"]
        assert rows[0]["label"] == expected[1]["label"]
        with_heat = client.post("/predict?heatmap=true", files=files[:1]).json()["predictions"][0]
        heat = Image.open(io.BytesIO(base64.b64decode(with_heat["heatmap"].split(",", 1)[1])))
        assert heat.size == (48, 48)


def test_bad_requests_get_one_sentence_and_the_server_keeps_serving(tiny_run, tiny_data, tmp_path):
    good = val_images(tiny_data)[0].read_bytes()
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 144 megapixels in a few kB
    cases = {
        "not an image": (dict(files={"file": ("notes.txt", b"hello, not a picture", "text/plain")}), 422, "notes.txt"),
        "empty file": (dict(files={"file": ("empty.jpg", b"", "image/jpeg")}), 400, "empty"),
        "empty body": (dict(content=b""), 400, "empty"),
        "truncated JPEG": (dict(files={"file": ("cut.jpg", jpeg.getvalue()[:3000], "image/jpeg")}), 422, "cut.jpg"),
        "decompression bomb": (dict(files={"file": ("bomb.png", bomb.getvalue(), "image/png")}), 422, "decompression bomb"),
        "50 MB upload": (dict(files={"file": ("big.jpg", b"\xff" * 50_000_000, "image/jpeg")}), 413, "2 MB limit"),
        "wrong content type": (dict(content=good, headers={"content-type": "image/png"}), 415, "content type"),
        "no file field": (dict(files={"picture": ("a.png", good, "image/png")}), 400, "`file`"),
        "bad base64": (dict(json={"image": "%%%not base64"}), 400, "base64"),
        "bad JSON": (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        "bad top_k": (dict(params={"top_k": "many"}, files={"file": ("a.png", good, "image/png")}), 422, "top_k"),
    }
    with client_for(tiny_run.path, max_upload_mb=2) as client:
        for name, (request, status, phrase) in cases.items():
            response = client.post("/predict", **request)
            assert response.status_code == status, (name, response.text)
            message = response.json()["error"]
            assert phrase in message and message.count(". ") == 0 and message.endswith("."), (name, message)
            assert client.post("/predict", files={"file": ("a.png", good, "image/png")}).status_code == 200, name
        for method, path, status in (("GET", "/nothing", 404), ("GET", "/predict", 405), ("DELETE", "/model", 405)):
            response = client.request(method, path)
            assert response.status_code == status and "GET /health" in response.json()["error"]


@pytest.mark.parametrize("window_ms", [50.0, 0.0])
def test_concurrent_requests_are_batched_only_with_a_window(tiny_run, tiny_data, window_ms):
    from concurrent.futures import ThreadPoolExecutor

    images = val_images(tiny_data)
    expected = {p.name: r["label"] for p, r in zip(images, visiontune.load(tiny_run.path).predict(images))}
    with client_for(tiny_run.path, batch_window_ms=window_ms, max_batch=4) as client:
        def ask(path):
            response = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
            return response.json()["predictions"][0]

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, images * 4))
        info = client.get("/model").json()
    assert all(a["label"] == expected[a["filename"]] for a in answers)  # none lost, none answered wrongly
    assert info["images_classified"] == 24
    if window_ms:
        assert info["batches_run"] < 24 and info["batches_run"] >= 6  # batches of at most 4
    else:
        assert info["batches_run"] == 24


def test_onnx_is_served_without_torch(tiny_run, tiny_data, tmp_path):
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", str(tiny_run.path), "--out", str(onnx_file)]) == 0
    image = val_images(tiny_data)[0]
    expected = visiontune.load(onnx_file).predict(image)["label"]
    script = (
        WITHOUT_TORCH +
        "from fastapi.testclient import TestClient\n"
        "from visiontune.serve import create_app\n"
        f"with TestClient(create_app({str(onnx_file)!r})) as c:\n"
        f"    r = c.post('/predict?heatmap=true', files={{'file': ('a.png', open({str(image)!r}, 'rb').read(), 'image/png')}})\n"
        "    print(r.status_code, r.json()['predictions'][0]['label'], r.json()['predictions'][0]['heatmap_error'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"200 {expected} heatmaps need a run folder")


def test_serve_refuses_a_port_in_use(tiny_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_run.path), "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


# --- the page, in a real browser ------------------------------------------------


def find_chromium() -> str | None:
    for name in (os.environ.get("VISIONTUNE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_run):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "visiontune", "serve", str(tiny_run.path), "--port", str(port),
                                "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read()}")
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("the server did not answer /health within 90 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.skipif(find_chromium() is None, reason="no chromium: `make test` installs Debian's chromium with apt-get "
                                                    "as root; install it, or set VISIONTUNE_CHROMIUM to a Chrome binary")
def test_page_in_a_real_browser_shows_predicts_class(server, tiny_run, tiny_data, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    # A bee, by colour, that the command line also classifies: the page must say the same class.
    image = tmp_path / "upload.png"
    make_image(image, 1, np.random.default_rng(11))
    assert main(["predict", str(tiny_run.path), str(image), "--format", "jsonl"]) == 0
    expected = json.loads(capsys.readouterr().out)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server)
        assert "ants, bees" in page.inner_text("body")
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=60_000)
        shown = page.inner_text("#label")
        rows = page.inner_text("#topk")
        heat_width = page.eval_on_selector("#heatmap", "img => img.complete ? img.naturalWidth : 0")
        # A file that is not an image: the page shows the server's sentence.
        bad = tmp_path / "notes.txt"
        bad.write_text("not a picture")
        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        error = page.inner_text("#error")
        browser.close()
    assert shown == expected["label"]
    assert rows.splitlines()[0].split("\t")[0] == expected["label"] and "%" in rows
    assert heat_width == 48
    assert "notes.txt" in error and "cannot be read as an image" in error
