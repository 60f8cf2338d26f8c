"""Load on `visiontune serve`: N concurrent clients on 127.0.0.1, batch window on and off.

usage: python bench/serve_load.py [--run RUN] [--data DIR] [--clients 8] [--seconds 20] [--window-ms 5]

Without --run it first trains a fixed-mode run on DATA (hymenoptera by default, 5 epochs) into a
temporary folder. The reference answer of every image is `visiontune.load(RUN).predict(path)` in
this process. For each setting (batch window on, then off) a fresh server process is started
(`visiontune serve RUN --device cpu`), warmed up with a few requests, then CLIENTS threads each
POST one val image at a time (multipart, keep-alive) for SECONDS. Every answer is checked: its
label must equal the reference label and its score be within 1e-4 of it (a batch of other
images changes the float rounding, not the answer). Prints requests/s, p50/p95/p99 latency,
the mean batch the server ran, and PASS/FAIL per target:
  - no request lost (every request got a 200), in both settings;
  - no request answered wrongly, in both settings;
  - under load the batch window does not lower throughput (with / without >= 1.0x): the window's
    few milliseconds of waiting must be paid back by larger forward passes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hymenoptera_data"


def multipart(name: str, data: bytes, boundary: str = "visiontunebench") -> tuple[bytes, str]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, window_ms: float, max_batch: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "visiontune", "serve", str(run), "--port", str(port),
                                "--device", "cpu", "--batch-window-ms", str(window_ms), "--max-batch", str(max_batch)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"the server exited: {process.stderr.read()}")
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not answer /health within 120 s")


def load(port: int, bodies: list[tuple[str, bytes, str]], reference: dict[str, dict], clients: int,
         seconds: float) -> dict:
    latencies: list[float] = []
    lost, wrong = [], []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = number
        while time.monotonic() < deadline:
            name, body, kind = bodies[i % len(bodies)]
            i += clients
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
                response = connection.getresponse()
                payload = response.read()
                status = response.status
            except OSError as exc:
                with lock:
                    lost.append(f"{name}: {exc}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            elapsed = time.perf_counter() - started
            with lock:
                if status != 200:
                    lost.append(f"{name}: HTTP {status} {payload[:200]!r}")
                    continue
                latencies.append(elapsed)
                answer = json.loads(payload)["predictions"][0]
                expected = reference[name]
                if answer["label"] != expected["label"] or abs(answer["score"] - expected["score"]) > 1e-4:
                    wrong.append(f"{name}: {answer['label']} {answer['score']:.6f} != {expected['label']} "
                                 f"{expected['score']:.6f}")
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/model")
    info = json.loads(connection.getresponse().read())
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies), "per_second": len(latencies) / wall, "p50": q[49] * 1e3, "p95": q[94] * 1e3,
            "p99": q[98] * 1e3, "lost": lost, "wrong": wrong,
            "mean_batch": info["images_classified"] / max(1, info["batches_run"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder (default: train a fixed-mode run on --data first)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--window-ms", type=float, default=5.0, help="the batch window of the 'on' setting")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="val images cycled through by the clients")
    args = parser.parse_args()

    import visiontune
    from visiontune.runfolder import RunFolder

    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    run = Path(args.run) if args.run else None
    if run is None:
        print(f"training a fixed-mode run on {args.data} (5 epochs)...", flush=True)
        run = visiontune.train(args.data, mode="fixed", epochs=5, out=str(Path(tmp.name) / "run"),
                               cache_dir=str(Path(tmp.name) / "cache"), quiet=True).path
    meta = RunFolder(run).read_model_json()
    paths = [p for p, _ in RunFolder(run).read_split("val", meta["classes"])][: args.images]
    predictor = visiontune.load(run, device="cpu")
    # Names made unique by their index: two val images may share a file name in different folders.
    names = [f"{i:04d}_{p.name}" for i, p in enumerate(paths)]
    reference = {n: r for n, r in zip(names, predictor.predict(paths))}
    bodies = [(n, *multipart(n, p.read_bytes())) for n, p in zip(names, paths)]
    print(f"{len(paths)} val images of {run}; {args.clients} clients for {args.seconds:g} s per setting", flush=True)

    results = {}
    for label, window in ((f"window {args.window_ms:g} ms", args.window_ms), ("window off", 0.0)):
        process, port = start_server(run, window, args.max_batch)
        try:
            load(port, bodies, reference, 2, 2.0)  # warm-up: first requests pay lazy set-up
            results[label] = load(port, bodies, reference, args.clients, args.seconds)
        finally:
            process.terminate()
            process.wait(timeout=30)

    print(f"\n{'setting':16} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'mean batch':>10} {'lost':>5} {'wrong':>6}")
    for label, r in results.items():
        print(f"{label:16} {r['requests']:9d} {r['per_second']:8.1f} {r['p50']:8.1f} {r['p95']:8.1f} {r['p99']:8.1f} "
              f"{r['mean_batch']:10.2f} {len(r['lost']):5d} {len(r['wrong']):6d}")
    on, off = results.values()
    print(f"\nthroughput with the window / without: {on['per_second'] / off['per_second']:.2f}x; "
          f"p50 latency {on['p50'] / off['p50']:.2f}x")
    failures = 0
    for target, ok in (("no request lost (all HTTP 200), both settings", not on["lost"] and not off["lost"]),
                       ("every answer equals predict's (label, score to 1e-4), both settings",
                        not on["wrong"] and not off["wrong"]),
                       ("the window does not lower throughput under load (>= 1.0x)",
                        on["per_second"] >= off["per_second"])):
        print(f"{'PASS' if ok else 'FAIL'}  {target}")
        failures += not ok
    for problem in (on["lost"] + off["lost"] + on["wrong"] + off["wrong"])[:10]:
        print(f"  {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
