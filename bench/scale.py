"""How visiontune scales with the number of images: synthetic JPEG sets of 2 000, 10 000 and 50 000.

usage: python bench/scale.py [--sizes 2000 10000 50000] [--modes fixed finetune] [--root DIR] [--image-size 96]
                             [--train-size 64]

Each set is DIR/<N>/<class>/*.jpg: 4 classes, JPEGs of random sizes (48-400 px a side) and a few
bad files (empty, truncated, HTML named .jpg: 1 in 1000, at least 3); generated once and kept.
For every N, in fresh processes with a fresh cache folder:
  - fixed mode, 1 epoch: the full pass over the images (screening, feature extraction), then the head;
  - fine-tune, 1 epoch with --head-init random (no probe): image batches through the whole model.
Measured per run: seconds from train() to the first image batch through the backbone and to the first
optimizer step, where those seconds went (listing, screening, features), images/s of the image pass,
peak RSS of the process, the cache size on disk, and the number of excluded files.
Small inputs (--image-size 96, fine-tune crops of 64) keep 50 000 images within minutes on a CPU;
the targets are about growth with N, not about speed at 224 px.

Targets (issue 13), PASS/FAIL per mode:
  - time to the first batch through the model, less listing, at the largest N <= 1.5x at 2 000;
  - peak RSS at the largest N within 20% of 2 000's;
  - images/s at the largest N within 10% of 2 000's;
  - every bad file excluded and listed in excluded.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CLASSES = ("circles", "stripes", "checks", "noise")


def _make_image(args: tuple[str, int, int]) -> None:
    import numpy as np
    from PIL import Image

    path, label, seed = args
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(48, 401, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    if label == 0:
        base = np.sin(np.hypot(xx - w / 2, yy - h / 2) / 6.0)
    elif label == 1:
        base = np.sin(xx / 5.0)
    elif label == 2:
        base = np.sign(np.sin(xx / 8.0) * np.sin(yy / 8.0))
    else:
        base = rng.normal(0, 1, (h, w))
    colour = rng.uniform(0.3, 1.0, 3)
    pixels = (127 + 100 * base[..., None] * colour[None, None, :] + rng.normal(0, 10, (h, w, 3))).clip(0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=85)


def generate(root: Path, n: int) -> Path:
    folder = root / str(n)
    done = folder / ".complete"
    if done.is_file():
        return folder
    for c in CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / CLASSES[i % 4] / f"img_{i:06d}.jpg"), i % 4, i) for i in range(n)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_make_image, jobs, chunksize=256))
    bad = max(3, n // 1000)
    for k in range(bad):
        path = folder / CLASSES[k % 4] / f"bad_{k:04d}.jpg"
        if k % 3 == 0:
            path.write_bytes(b"")
        elif k % 3 == 1:
            path.write_bytes(Path(jobs[k][0]).read_bytes()[:200])  # truncated JPEG
        else:
            path.write_bytes(b"<html><body>404 Not Found</body></html>")
    done.write_text(json.dumps({"images": n, "bad": bad}))
    return folder


def child(args: argparse.Namespace) -> None:
    """One run in this process; prints a JSON line of measurements."""
    import torch  # noqa: F401  (imported before the clock starts, as a long-lived process would have it)

    import visiontune.data as data
    import visiontune.folding as folding
    import visiontune.pipeline as pipeline
    from visiontune.training import train

    marks: dict[str, float] = {}
    started = time.perf_counter()

    def timed(module, name, label):
        original = getattr(module, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                marks[label] = marks.get(label, 0.0) + time.perf_counter() - t

        setattr(module, name, wrapper)

    timed(pipeline, "resolve_data", "listing")
    timed(pipeline, "screen_images", "screening")
    original_pooled = folding.pooled_features

    def first_forward(*a, **k):
        marks.setdefault("first_forward", time.perf_counter() - started)
        return original_pooled(*a, **k)

    folding.pooled_features = first_forward
    import visiontune.features as features

    features.pooled_features = first_forward

    class FirstStep:
        def on_step_end(self, step):
            marks.setdefault("first_step", time.perf_counter() - started)

    settings = json.loads(args.settings)
    run = train(args.data, quiet=True, callbacks=[FirstStep()], **settings)
    wall = time.perf_counter() - started
    excluded = (run.path / "excluded.csv").read_text().count("\n") - 1 if (run.path / "excluded.csv").is_file() else 0
    cache = sum(f.stat().st_size for f in Path(settings["cache_dir"]).rglob("*") if f.is_file())
    rows = [r for r in run.metrics if r["stage"] != "probe"]
    print(json.dumps({"wall": wall, "marks": marks, "epoch_seconds": rows[0]["seconds"], "excluded": excluded,
                      "cache_bytes": cache, "train_images": len(data.discover(args.data).samples["train"]),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_child(data: Path, settings: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", "--data", str(data), "--settings", json.dumps(settings)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    parser.add_argument("--modes", nargs="+", choices=["fixed", "finetune"], default=["fixed", "finetune"])
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "visiontune-scale"))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    root = Path(args.root)
    results: dict[str, dict[int, dict]] = {mode: {} for mode in args.modes}
    for n in args.sizes:
        t = time.perf_counter()
        folder = generate(root, n)
        print(f"N={n}: data in {folder} ({time.perf_counter() - t:.0f}s to generate or find)", flush=True)
        for mode in results:
            with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
                settings = {"mode": mode, "epochs": 1, "image_size": args.image_size, "out": f"{tmp}/run",
                            "cache_dir": f"{tmp}/cache", "log": "none"}
                if mode == "finetune":
                    settings |= {"head_init": "random", "train_size": args.train_size}
                r = run_child(folder, settings)
            marks = r["marks"]
            first = marks.get("first_forward") if mode == "fixed" else marks.get("first_step")
            if mode == "fixed":  # the image pass: features of train + val
                seconds = (marks.get("first_step", r["wall"]) - first) or 1e-9
                images = n * 1.0
            else:
                seconds, images = r["epoch_seconds"], r["train_images"]
            r |= {"first": first, "after_listing": first - marks.get("listing", 0.0), "images_per_s": images / seconds}
            results[mode][n] = r
            print(f"  {mode:8} first batch {first:7.1f}s (listing {marks.get('listing', 0):5.1f}s, screening "
                  f"{marks.get('screening', 0):6.1f}s)  {r['images_per_s']:7.1f} images/s  peak RSS "
                  f"{r['peak_rss'] / 2**30:5.2f} GB  cache {r['cache_bytes'] / 2**20:7.1f} MB  excluded "
                  f"{r['excluded']}", flush=True)

    small, large = min(args.sizes), max(args.sizes)
    expected_bad = {n: json.loads((root / str(n) / ".complete").read_text())["bad"] for n in args.sizes}
    failures = 0
    print()
    for mode, by_n in results.items():
        a, b = by_n[small], by_n[large]
        checks = [
            (f"{mode}: time to the first batch less listing, N={large} vs {small}: {b['after_listing']:.1f}s vs "
             f"{a['after_listing']:.1f}s ({b['after_listing'] / a['after_listing']:.2f}x, target <= 1.5x)",
             b["after_listing"] <= 1.5 * a["after_listing"]),
            (f"{mode}: peak RSS N={large} vs {small}: {b['peak_rss'] / 2**30:.2f} vs {a['peak_rss'] / 2**30:.2f} GB "
             f"({b['peak_rss'] / a['peak_rss']:.2f}x, target <= 1.2x)", b["peak_rss"] <= 1.2 * a["peak_rss"]),
            (f"{mode}: images/s N={large} vs {small}: {b['images_per_s']:.1f} vs {a['images_per_s']:.1f} "
             f"({b['images_per_s'] / a['images_per_s']:.2f}x, target >= 0.9x)",
             b["images_per_s"] >= 0.9 * a["images_per_s"]),
            (f"{mode}: every bad file excluded and listed ({', '.join(str(by_n[n]['excluded']) for n in args.sizes)} "
             f"of {', '.join(str(expected_bad[n]) for n in args.sizes)})",
             all(by_n[n]["excluded"] == expected_bad[n] for n in args.sizes)),
        ]
        for text, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
            failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
