"""Speed and memory of visiontune against the tutorial's loop, same machine, one invocation.

usage: python bench/speed.py [--data DIR] [--ref-epochs N]

Runs, one after another in fresh processes so each has the machine to itself:
- the reference (`../shared/bench/tutorial_baseline.py`: batch 4, 4 workers,
  full JPEG decode every epoch) for N fine-tune and N fixed epochs; its
  25-epoch walls are extrapolated from the mean measured epoch (said so in
  the output), and its best val accuracies are the ones of its full 25-epoch
  runs documented in docs/performance.md (the reference is deterministic only
  up to worker scheduling, and 25 fine-tune epochs take 20 minutes);
- visiontune fixed mode, 25 epochs, cold cache, then again warm;
- visiontune fine-tune, the default recipe (wall to its best epoch, per-epoch time);
- the backbone's forward-only time over the same images (the floor of fixed mode);
and prints one table of ratios with PASS/FAIL per target.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hymenoptera_data"
REFERENCE = REPO.parent / "shared" / "bench" / "tutorial_baseline.py"
# Full 25-epoch reference runs on this machine, 2026-11-27 (issue 3 and docs/performance.md).
REFERENCE_BEST = {"finetune": 0.9346, "fixed": 0.9477}


def child(args: argparse.Namespace) -> None:
    """One visiontune run in this process; prints a JSON line with its measurements."""
    import torch

    # visiontune imports torch lazily; import it here so the timed call measures training, not imports.
    from visiontune.training import train

    started = time.perf_counter()
    settings = json.loads(args.settings)
    run = train(args.data, quiet=True, **settings)
    wall = time.perf_counter() - started
    epochs = [row["seconds"] for row in run.metrics]
    startup = wall - sum(epochs)
    result = {
        "wall": wall,
        # By epoch number: a fine-tune run's row 0 is the linear probe (epoch 0), not a training epoch.
        "wall_to_best": startup + sum(row["seconds"] for row in run.metrics if row["epoch"] <= run.best_epoch),
        "epoch_seconds": [row["seconds"] for row in run.metrics if row["stage"] != "probe"],
        "probe_seconds": sum(row["seconds"] for row in run.metrics if row["stage"] == "probe"),
        "best_val_acc": run.best_val_acc,
        "best_epoch": run.best_epoch,
    }
    # The run's peak, before the floor: the floor is this script's own reference code (all images stacked in
    # one tensor, batch 64), not a visiontune run.
    result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    if args.floor:
        result["floor"] = forward_floor(run, args.data, torch)
    print(json.dumps(result))


def forward_floor(run, data: str, torch) -> float:
    """Seconds of backbone forward (channels_last, batch 64, inference mode) over train+val images."""
    from visiontune.backbones import build_classifier, data_config
    from visiontune.data import discover
    from visiontune.images import decode_array
    from visiontune.preprocess import EvalTransform, Preprocessing, normalize_batch

    model, _ = build_classifier(run.config.model, len(run.classes))
    model = model.to(memory_format=torch.channels_last).eval()
    pre = Preprocessing.from_data_config(data_config(model))
    splits = discover(data)
    paths = [p for split in ("train", "val") for p, _ in splits.samples[split]]
    images = torch.stack([EvalTransform(pre)(decode_array(p, pre.resize)) for p in paths])
    seconds = 0.0
    with torch.inference_mode():
        for start in range(0, len(paths), 64):
            x = normalize_batch(images[start : start + 64], pre, channels_last=True)
            t = time.perf_counter()
            model.forward_head(model.forward_features(x), pre_logits=True)
            seconds += time.perf_counter() - t
    return seconds


def run_child(data: str, settings: dict, cache: Path, floor: bool = False) -> dict:
    env = {**os.environ, "VISIONTUNE_CACHE": str(cache)}
    cmd = [sys.executable, __file__, "--child", "--data", data, "--settings", json.dumps(settings)]
    if floor:
        cmd.append("--floor")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_reference(data: str, mode: str, epochs: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REFERENCE), data, mode, str(epochs)], check=True,
                          capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--ref-epochs", type=int, default=2)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--floor", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(args)

    rows = []

    def target(name: str, measured: str, ok: bool) -> None:
        rows.append((name, measured, "PASS" if ok else "FAIL"))

    ref = {mode: run_reference(args.data, mode, args.ref_epochs) for mode in ("fixed", "finetune")}
    ref_epoch = {m: sum(r["epoch_seconds"]) / len(r["epoch_seconds"]) for m, r in ref.items()}
    ref_wall25 = {m: 25 * s for m, s in ref_epoch.items()}

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        fixed_cold = run_child(args.data, {"mode": "fixed", "epochs": 25, "out": f"{tmp}/fixed1"}, cache, floor=True)
        fixed_warm = run_child(args.data, {"mode": "fixed", "epochs": 25, "out": f"{tmp}/fixed2"}, cache)
        default = run_child(args.data, {"out": f"{tmp}/default"}, Path(tmp) / "cache-default")

    ft_epoch = sum(default["epoch_seconds"]) / len(default["epoch_seconds"])
    target("fixed 25 epochs: wall speed-up vs reference >= 25x",
           f"{ref_wall25['fixed']:.0f}s / {fixed_cold['wall']:.1f}s = {ref_wall25['fixed'] / fixed_cold['wall']:.1f}x",
           ref_wall25["fixed"] / fixed_cold["wall"] >= 25)
    target("fixed: best val acc >= reference's",
           f"{fixed_cold['best_val_acc']:.4f} vs {REFERENCE_BEST['fixed']:.4f}",
           fixed_cold["best_val_acc"] >= REFERENCE_BEST["fixed"])
    target("fine-tune: per-epoch speed-up >= 2x",
           f"{ref_epoch['finetune']:.1f}s / {ft_epoch:.1f}s = {ref_epoch['finetune'] / ft_epoch:.2f}x",
           ref_epoch["finetune"] / ft_epoch >= 2)
    target("default recipe: wall to best epoch vs reference's 25 epochs >= 10x",
           f"{ref_wall25['finetune']:.0f}s / {default['wall_to_best']:.1f}s = "
           f"{ref_wall25['finetune'] / default['wall_to_best']:.1f}x (best epoch {default['best_epoch']})",
           ref_wall25["finetune"] / default["wall_to_best"] >= 10)
    target("default recipe: best val acc >= reference's",
           f"{default['best_val_acc']:.4f} vs {REFERENCE_BEST['finetune']:.4f}",
           default["best_val_acc"] >= REFERENCE_BEST["finetune"])
    target("fixed: wall / forward-only floor <= 1.5",
           f"{fixed_cold['wall']:.1f}s / {fixed_cold['floor']:.1f}s = {fixed_cold['wall'] / fixed_cold['floor']:.2f}",
           fixed_cold["wall"] / fixed_cold["floor"] <= 1.5)
    peak = max(r["max_rss_gb"] for r in (fixed_cold, fixed_warm, default))
    target("peak RSS of any visiontune run <= 2.5 GB", f"{peak:.2f} GB", peak <= 2.5)
    target("fixed, warm cache: >= 3x faster than cold",
           f"{fixed_cold['wall']:.1f}s / {fixed_warm['wall']:.1f}s = {fixed_cold['wall'] / fixed_warm['wall']:.1f}x",
           fixed_cold["wall"] / fixed_warm["wall"] >= 3)

    print(f"visiontune epoch seconds: fixed cold {[round(s, 2) for s in fixed_cold['epoch_seconds'][:3]]}..., "
          f"default recipe {[round(s, 1) for s in default['epoch_seconds']]}")
    print(f"reference: {args.ref_epochs} measured epochs per mode, 25-epoch walls extrapolated from the mean "
          f"epoch (fixed {ref_epoch['fixed']:.1f}s, fine-tune {ref_epoch['finetune']:.1f}s); reference best val "
          f"accuracies are from its full 25-epoch runs. visiontune walls are in-process (from train() call to "
          f"return), torch threads {os.cpu_count()}.")
    width = max(len(r[0]) for r in rows)
    print(f"{'target'.ljust(width)}  {'measured':58}  result")
    for name, measured, verdict in rows:
        print(f"{name.ljust(width)}  {measured:58}  {verdict}")


if __name__ == "__main__":
    main()
