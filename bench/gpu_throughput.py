"""Fine-tuning and feature-extraction throughput of EfficientNet-Lite0 at 224 px on one GPU.

Rows: fp32, bf16, bf16 + channels_last, bf16 + channels_last + torch.compile. Train = forward,
backward and an SGD step through visiontune's `train_one_epoch`; eval = its `evaluate` on a
BatchNorm-folded copy; both on synthetic batches already on the GPU (the model's speed, not the
input pipeline's). Feature extraction = `extract_features` end to end on generated JPEGs (decode,
crop, copy to the GPU, forward), the fixed-mode path. Prints one markdown table.

usage: python bench/gpu_throughput.py [--batch 128] [--steps 30] [--smoke] [--eager-only] [--deterministic]
(--smoke: tiny sizes on whatever device there is, to check the script itself on a CPU;
--eager-only: the rows without compile and no feature extraction; --deterministic: those rows with
`--deterministic`'s settings, which stay on for the whole process, so compare with an --eager-only run.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(rt, precision: str, channels_last: bool, compile_model: bool, batch: int, size: int, steps: int,
            model_name: str) -> dict:
    from visiontune.backbones import build_classifier
    from visiontune.engine import evaluate, train_one_epoch
    from visiontune.folding import fold_batchnorm
    from visiontune.recipes import param_groups

    rt.precision = precision
    model, _ = build_classifier(model_name, 2)
    model = model.to(rt.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(param_groups(list(model.named_parameters()), 1e-4), lr=1e-3, momentum=0.9)
    trainable = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, size, size, device=rt.device).contiguous(memory_format=memory_format)
    y = torch.randint(2, (batch,), device=rt.device)
    warmup = 10 if compile_model else 3
    train_one_epoch(trainable, [(x, y)] * warmup, optimizer, device=rt.device, autocast=rt.autocast,
                    scaler=rt.grad_scaler())
    sync(rt.device)
    start = time.perf_counter()
    train_one_epoch(trainable, [(x, y)] * steps, optimizer, device=rt.device, autocast=rt.autocast,
                    scaler=rt.grad_scaler())
    sync(rt.device)
    train_ips = batch * steps / (time.perf_counter() - start)
    folded = fold_batchnorm(model, size)
    evaluator = torch.compile(folded) if compile_model else folded
    evaluate(evaluator, [(x, y)] * warmup, device=rt.device, autocast=rt.autocast)
    sync(rt.device)
    start = time.perf_counter()
    evaluate(evaluator, [(x, y)] * steps, device=rt.device, autocast=rt.autocast)
    sync(rt.device)
    eval_ips = batch * steps / (time.perf_counter() - start)
    return {"train": train_ips, "eval": eval_ips}


def feature_throughput(rt, images: int, batch: int, model_name: str) -> float:
    from PIL import Image

    from visiontune.backbones import build_classifier, data_config
    from visiontune.features import extract_features
    from visiontune.images import DecodeCache
    from visiontune.preprocess import Preprocessing

    rt.precision = "bf16" if rt.device.type == "cuda" else "fp32"
    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(images):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    model, _ = build_classifier(model_name, 2)
    model = model.to(rt.device).to(memory_format=torch.channels_last)
    pre = Preprocessing.from_data_config(data_config(model))
    decode = DecodeCache(pre.resize, pre.interpolation, folder / "cache")
    for p in paths:  # decoded once, as a second run finds them
        decode(p)
    extract_features(model, paths[:batch], decode, pre, 1, 0, None, batch, True, runtime=rt)  # warm-up
    sync(rt.device)
    start = time.perf_counter()
    extract_features(model, paths, decode, pre, 1, 0, None, batch, True, runtime=rt)
    sync(rt.device)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--eager-only", action="store_true")
    parser.add_argument("--deterministic", action="store_true")
    args = parser.parse_args()
    from visiontune import runtime

    rt = runtime.start("auto", "fp32", deterministic=args.deterministic)
    eager_only = args.eager_only or args.deterministic
    model_name, size = "efficientnet_lite0", 224
    if args.smoke:
        args.batch, args.steps, args.images, size = 4, 2, 8, 64
    on_gpu = rt.device.type == "cuda"
    name = torch.cuda.get_device_name(rt.device) if on_gpu else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {model_name} at {size} px, batch {args.batch}, "
          f"{args.steps} timed steps{', deterministic' if args.deterministic else ''}")
    # Feature extraction first and compile last: if the device call runs out of time while compiling,
    # every other number has already been printed.
    try:
        if eager_only:
            print("feature extraction: skipped (--eager-only)\n")
        else:
            ips = feature_throughput(rt, args.images, args.batch, model_name)
            print(f"feature extraction (decode cache warm, crop, to device, folded forward, "
                  f"{'bf16' if on_gpu else 'fp32'}): {ips:.0f} images/s over {args.images} images\n", flush=True)
    except Exception as exc:
        print(f"feature extraction failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}\n", flush=True)
    rows = [("fp32", "fp32", False, False), ("bf16", "bf16", False, False),
            ("bf16 + channels_last", "bf16", True, False), ("bf16 + channels_last + compile", "bf16", True, True)]
    if not on_gpu:
        rows = [r for r in rows if r[1] == "fp32"]
    if eager_only:
        rows = [r for r in rows if not r[3]]
    print("| precision / layout | train images/s | eval images/s |")
    print("|---|---|---|", flush=True)
    for label, precision, channels_last, compile_model in rows:
        try:
            result = measure(rt, precision, channels_last, compile_model, args.batch, size, args.steps, model_name)
            print(f"| {label} | {result['train']:.0f} | {result['eval']:.0f} |", flush=True)
        except Exception as exc:  # one failing row (e.g. compile) must not hide the others
            print(f"| {label} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | |", flush=True)


if __name__ == "__main__":
    main()
