"""What --freeze saves per training step: the default backbone's fine-tuning step with its first N layer
groups frozen, against every layer training, in one process on this machine.

usage: python bench/freeze_step.py [--size 160] [--batch 32] [--steps 6]

The step is the default recipe's (AdamW, BatchNorm in train mode, channels-last, training crop size, batch
32) on random images: the model's arithmetic only, no data loading, weight average or val. Frozen groups
need no backward pass: with the input not requiring a gradient either, autograd stops where the first
trained layer begins. Each count is timed twice, interleaved, and the faster of the two is kept (this
machine is shared). Target: each BatchNorm policy's default count (pipeline.default_freeze: the groups at
a quarter of the input resolution and finer with trained statistics, at an eighth with pretrained ones)
takes at most 0.8x the step of --freeze 0.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from visiontune.backbones import build_classifier
from visiontune.config import DEFAULT_BACKBONE
from visiontune.memory import reuse_freed_memory
from visiontune.pipeline import default_freeze
from visiontune.recipes import leading_group_parameters


def step_seconds(model: nn.Module, count: int, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    for p in model.parameters():
        p.requires_grad_(True)
    for p in leading_group_parameters(model, count):
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for step in range(steps + 2):  # two warm-up steps: oneDNN picks its kernels on the first
        if step == 2:
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    reuse_freed_memory()  # as every visiontune process does: without it each step's large buffers page-fault
    torch.manual_seed(0)
    model, _ = build_classifier(DEFAULT_BACKBONE, 10, None)
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,))
    defaults = {bn: default_freeze(model, bn)[0] for bn in ("train", "frozen")}
    counts = sorted({0, 1, 2, *defaults.values(), max(defaults.values()) + 1})
    best = {count: float("inf") for count in counts}
    for _ in range(2):
        for count in counts:
            best[count] = min(best[count], step_seconds(model, count, images, labels, args.steps))
    print(f"{DEFAULT_BACKBONE}, {torch.get_num_threads()} threads, batch {args.batch} at {args.size} px, "
          f"AdamW, BatchNorm in train mode; the default --freeze is {defaults['train']} with trained BatchNorm "
          f"statistics, {defaults['frozen']} with pretrained ones")
    for count in counts:
        print(f"--freeze {count}: {best[count]:.3f} s a step ({best[count] / best[0]:.2f}x of --freeze 0)")
    for bn, count in defaults.items():
        ratio = best[count] / best[0]
        print(f"--freeze {count} (default, --bn {bn}) step <= 0.8x of --freeze 0: {best[count]:.3f}s / "
              f"{best[0]:.3f}s = {ratio:.2f}x {'PASS' if ratio <= 0.8 else 'FAIL'}")


if __name__ == "__main__":
    main()
