"""`visiontune serve RUN|model.onnx`: an HTTP server (FastAPI on uvicorn) and a web page.

    GET  /          a page: pick or drop an image, see the top-k classes and the heatmap
    GET  /health    {"status": "ok"}
    GET  /model     classes, backbone, preprocessing, the run's metrics, the server's settings
    POST /predict   multipart field `file` (repeatable), or JSON {"image": b64} / {"images": [b64, ...]}
                    -> {"predictions": [{"filename", "label", "score", "top_k": [{"label", "score"}]}]}
                    (a multi-label model adds "labels": every class at or above its threshold)
                    ?heatmap=true adds a PNG data URL per image (run folders); ?top_k=N

Images from requests that arrive within `batch_window_ms` of each other are classified as one
batch (at most `max_batch` images) on one model thread: under load this trades a few
milliseconds of latency for far fewer, larger forward passes. An ONNX file is served by
onnxruntime; torch is then never imported. Every bad request gets a 4xx JSON body
{"error": "<one sentence>"} and the server keeps serving.
"""

import asyncio
import base64
import binascii
import csv
import html
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .config import DEFAULT_TOP_K
from .errors import UsageError
from .predict import Predictor, load


class BodyTooLarge(Exception):
    pass


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes`, from its Content-Length before
    reading it, or while reading a body sent without one."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> str:
        return (f"the request body is over the server's {self.max_bytes / 1e6:g} MB limit; send a smaller "
                "image (or start the server with a larger --max-upload-mb).")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # Said before any of the body is read; the connection is closed rather than drained.
            response = JSONResponse({"error": self.too_large()}, status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.too_large())
            return message

        return await self.app(scope, limited_receive, send)


class Batcher:
    """Collects images from concurrent requests into batches for one model thread."""

    def __init__(self, predictor: Predictor, window_ms: float, max_batch: int):
        self.predictor = predictor
        self.window_s = max(0.0, window_ms) / 1000.0
        self.max_batch = max(1, max_batch)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="visiontune-model")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # forward passes run, for /model and the load benchmark
        self.images = 0

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        self.batches += 1
        self.images += len(batch)
        return self.predictor.probabilities(batch)

    async def start(self) -> None:
        if self.window_s > 0:
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.model_thread.shutdown(wait=False)

    async def classify(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        if self.queue is None:  # no batching across requests: this request's images only
            out: list[np.ndarray] = []
            for start in range(0, len(arrays), self.max_batch):
                out += list(await loop.run_in_executor(self.model_thread, self._forward,
                                                       np.stack(arrays[start : start + self.max_batch])))
            return out
        futures = []
        for array in arrays:
            future = loop.create_future()
            self.queue.put_nowait((array, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            try:
                probs = await loop.run_in_executor(self.model_thread, self._forward, np.stack([a for a, _ in batch]))
            except Exception as exc:  # the requests in this batch fail; the server goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), p in zip(batch, probs):
                if not future.done():
                    future.set_result(p)


def _run_metrics(run: Path) -> dict:
    """The best epoch's row of a run's metrics.csv (val accuracy and loss), or {}."""
    from .runfolder import RunFolder

    folder = RunFolder(run)
    if not folder.metrics_file.is_file():
        return {}
    with folder.metrics_file.open(newline="") as f:
        rows = list(csv.DictReader(f))
    meta = folder.read_model_json()
    best = [r for r in rows if int(r["epoch"]) == int(meta.get("best_epoch", -1))] or rows[-1:]
    return {k: float(best[0][k]) for k in ("val_acc", "val_loss")} | {"best_epoch": int(best[0]["epoch"])} if best else {}


def create_app(model: str | Path, device: str = "auto", tta: bool = False, top_k: int = DEFAULT_TOP_K,
               batch_window_ms: float = 5.0, max_batch: int = 32, max_upload_mb: float = 20.0):
    """The ASGI app for a run folder or an exported model (uvicorn serves it; tests call it in-process)."""
    from contextlib import asynccontextmanager

    if max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb {max_upload_mb:g}: must be above 0.")
    if max_batch < 1:
        raise UsageError(f"--max-batch {max_batch}: must be 1 or more.")
    model = Path(model)
    predictor = load(model, device=device, tta=tta)
    batcher = Batcher(predictor, batch_window_ms, max_batch)
    explainer_box: dict = {}  # built on the first heatmap request: grad-cam's import costs a second
    heatmap_thread = ThreadPoolExecutor(1, thread_name_prefix="visiontune-heatmap")
    can_explain = model.is_dir()
    meta = predictor.meta
    info = {
        "classes": predictor.classes,
        "backbone": meta.get("backbone", meta.get("architecture")),
        "architecture": meta.get("architecture"),
        "preprocessing": predictor.preprocessing,
        "source": predictor.source,
        "metrics": _run_metrics(model) if model.is_dir() else {},
        "heatmaps": can_explain,
        "tta": tta,
        "top_k": top_k,
        "batch_window_ms": batch_window_ms,
        "max_batch": max_batch,
        "max_upload_mb": max_upload_mb,
    }

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()
        heatmap_thread.shutdown(wait=False)

    app = FastAPI(title="visiontune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return error(exc.status, exc.message)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request, exc: BodyTooLarge):
        return error(413, str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return error(404, f"no such route: {request.method} {request.url.path}; the API is GET /, GET /health, "
                              "GET /model and POST /predict.")
        if exc.status_code == 405:
            return error(405, f"{request.method} {request.url.path} is not allowed; see GET /, GET /health, "
                              "GET /model and POST /predict.")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "query")
        return error(422, f"{where}: {first.get('msg', 'invalid value')}; see GET / for the API.")

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        return error(500, f"the server failed on this request ({type(exc).__name__}); it is still serving.")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": predictor.source}

    @app.get("/model")
    async def model_info():
        return info | {"batches_run": batcher.batches, "images_classified": batcher.images}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.replace("__TITLE__", html.escape(Path(predictor.source.split(":", 1)[1]).name))
                            .replace("__CLASSES__", html.escape(", ".join(predictor.classes))))

    async def uploaded_images(request: Request) -> list[tuple[str, bytes]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=max(256, max_batch * 8))
            except BodyTooLarge:
                raise
            except Exception:
                raise RequestError(400, "the multipart body could not be parsed; send images as form field "
                                        "`file` (curl -F file=@image.jpg).") from None
            files = [(getattr(v, "filename", None) or f"file {i + 1}", v) for i, v in enumerate(form.getlist("file"))]
            if not files:
                raise RequestError(400, "no form field `file` in the request; send images as `file` "
                                        "(curl -F file=@image.jpg, repeatable).")
            out = []
            for name, value in files:
                if isinstance(value, str):
                    raise RequestError(400, f"form field `file` ({name}) holds text, not a file; attach the image "
                                            "as a file (curl -F file=@image.jpg).")
                out.append((name, await value.read()))
            return out
        if kind == "application/json":
            try:
                body = await request.json()
            except BodyTooLarge:
                raise
            except Exception:
                raise RequestError(400, "the JSON body could not be parsed; send {\"image\": \"<base64>\"} or "
                                        "{\"images\": [\"<base64>\", ...]}.") from None
            encoded = body.get("images", [body["image"]] if "image" in body else None) if isinstance(body, dict) else None
            if not isinstance(encoded, list) or not encoded or not all(isinstance(e, str) for e in encoded):
                raise RequestError(400, "the JSON body needs \"image\": \"<base64>\" or \"images\": "
                                        "[\"<base64>\", ...].")
            out = []
            for i, text in enumerate(encoded):
                if text.startswith("data:") and "," in text:  # a data URL, as a browser's FileReader makes it
                    text = text.split(",", 1)[1]
                try:
                    out.append((f"image {i + 1}", base64.b64decode(text, validate=True)))
                except (binascii.Error, ValueError):
                    raise RequestError(400, f"image {i + 1}: is not valid base64; encode the image file's bytes "
                                            "with base64.") from None
            return out
        if not kind and not await request.body():
            raise RequestError(400, "the request body is empty; send an image as form field `file` "
                                    "(curl -F file=@image.jpg).")
        raise RequestError(415, f"content type {kind or '(none)'!r} is not accepted; send multipart/form-data "
                                "(field `file`) or application/json with base64 images.")

    def decode(name: str, data: bytes) -> np.ndarray:
        if not data:
            raise RequestError(400, f"{name}: is empty (0 bytes); send the image file's contents.")
        try:
            return predictor.preprocess(data)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RequestError(422, f"{name}: cannot be read as an image ({reason}); send a JPEG, PNG, WebP, "
                                    "BMP, GIF or TIFF file.") from None

    def heatmap_url(data: bytes) -> str:
        from .explain import Explainer, png_data_url

        if "explainer" not in explainer_box:
            explainer_box["explainer"] = Explainer.from_run(model, device=device)
        return png_data_url(explainer_box["explainer"].explain(data).overlay())

    @app.post("/predict")
    async def predict(request: Request, heatmap: bool = False, top_k: int = top_k):
        if top_k < 1:
            raise RequestError(422, f"top_k={top_k}: must be 1 or more.")
        images = await uploaded_images(request)
        arrays = [await run_in_threadpool(decode, name, data) for name, data in images]
        probs = await batcher.classify(arrays)
        predictions = []
        for (name, data), p in zip(images, probs):
            answer = predictor.describe(p, top_k)
            answer.pop("probs")
            row = {"filename": name, **answer}
            if heatmap:
                if not can_explain:
                    row["heatmap_error"] = "heatmaps need a run folder (served from an exported file: no gradients)."
                else:
                    loop = asyncio.get_running_loop()
                    row["heatmap"] = await loop.run_in_executor(heatmap_thread, heatmap_url, data)
            predictions.append(row)
        return {"predictions": predictions}

    return BodyLimit(app, int(max_upload_mb * 1e6))


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False, **settings) -> None:
    """Serve until interrupted."""
    import uvicorn

    try:  # a port in use is one sentence here, not uvicorn's log and exit
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another "
                         "--port.") from None
    app = create_app(model, **settings)
    if not quiet:
        print(f"visiontune: serving {model} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>visiontune: __TITLE__</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:820px;margin:2rem auto;padding:0 1rem;color:#222}
#drop{border:2px dashed #99a;border-radius:10px;padding:2rem;text-align:center;cursor:pointer;background:#f7f8fb}
#drop.over{background:#e6ecff}.muted{color:#777;font-size:.9em}#error{color:#b00020}
#result{display:flex;gap:1.5rem;flex-wrap:wrap;margin-top:1.5rem}#result img{max-width:300px;border-radius:6px}
table{border-collapse:collapse}td{padding:.25rem .8rem;border-bottom:1px solid #eee}td.score{text-align:right}
#label{font-size:1.6em;font-weight:600;margin:.2rem 0}
</style></head><body>
<h1>visiontune</h1>
<p class="muted">Model __TITLE__, classes: __CLASSES__</p>
<label id="drop" for="file">Drop an image here, or click to pick one
<input id="file" type="file" accept="image/*" hidden></label>
<p id="error" role="alert"></p>
<div id="result" hidden>
<div><div class="muted">prediction</div><div id="label"></div><table id="topk"></table></div>
<div><img id="preview" alt="the image sent"></div>
<div><img id="heatmap" alt="heatmap of the predicted class"><div id="heatnote" class="muted"></div></div>
</div>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
async function classify(file) {
  document.getElementById("error").textContent = "";
  const form = new FormData();
  form.append("file", file, file.name);
  let body;
  try {
    const response = await fetch("predict?heatmap=true", {method: "POST", body: form});
    body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
  } catch (e) {
    document.getElementById("error").textContent = e.message;
    document.getElementById("result").hidden = true;
    return;
  }
  const p = body.predictions[0];
  const rows = p.top_k.map(t => `<tr><td>${escape(t.label)}</td><td class="score">${(100 * t.score).toFixed(1)}%</td></tr>`);
  document.getElementById("topk").innerHTML = rows.join("");
  document.getElementById("preview").src = URL.createObjectURL(file);
  const heat = document.getElementById("heatmap");
  heat.hidden = !p.heatmap;
  if (p.heatmap) heat.src = p.heatmap;
  document.getElementById("heatnote").textContent = p.heatmap ? "where the model looked (red = most)" : (p.heatmap_error || "");
  document.getElementById("result").hidden = false;
  document.getElementById("label").textContent = p.label;
}
function escape(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
input.addEventListener("change", () => input.files.length && classify(input.files[0]));
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]); });
</script></body></html>
"""
