"""Where does the first fine-tuning step hurt? One Adam-sized step applied to one kind of parameter at a time.

AdamW's first update is lr * sign(gradient) for every weight (its moment estimates are one gradient
old). This script fits the probe, takes the gradient of the first training batch of the default's full
stage at the probe's weights, and for each parameter kind (pointwise, depthwise and other convs,
BatchNorm scales and shifts, the classifier), each block and each single tensor, moves only those
weights by -lr * sign(gradient) and reports the loss on the stage's first 4 training batches in eval
mode (running statistics, no dropout: as with frozen BatchNorm), then restores them. docs/recipes.md
(ninth pass) has the result for eurosat10.

usage: SEED=2 SIZE=160 python bench/step_sensitivity.py DATA [LR]   (LR default 3e-4)
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch
from torch import nn

from visiontune import runtime
from visiontune.config import TrainConfig
from visiontune.pipeline import build_setup, full_stage
from visiontune.training import probe_row


def parameter_kinds(model: nn.Module) -> dict[str, tuple[str, str, nn.Parameter]]:
    """name -> (kind, block, parameter); block is timm's `blocks.N` stage, else the top-level module."""
    kinds = {}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if isinstance(module, nn.Conv2d):
                kind = "conv dw" if module.groups > 1 else "conv 1x1" if module.kernel_size == (1, 1) else "conv kxk"
            elif isinstance(module, nn.BatchNorm2d):
                kind = f"batchnorm {name}"
            elif isinstance(module, nn.Linear):
                kind = "classifier"
            else:
                kind = type(module).__name__
            parts = module_name.split(".")
            block = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
            kinds[f"{module_name}.{name}"] = (kind, block, parameter)
    return kinds


def main() -> int:
    data, lr = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 3e-4
    cfg = TrainConfig(data=data, quiet=True, image_size=int(os.environ.get("SIZE", 0)) or None,
                      seed=int(os.environ.get("SEED", 0))).resolved()
    s = build_setup(cfg, runtime.start("cpu", "fp32", False))
    print("probe val acc", probe_row(s)[0]["val_acc"], flush=True)
    stage = full_stage(replace(s, cfg=replace(s.cfg, bn="frozen", lr=lr, optimizer="adamw")), 1)
    batches = iter(stage.train_batches)
    taken = [next(batches) for _ in range(4)]
    model, loss_of = s.model.eval(), nn.CrossEntropyLoss()

    def loss_on_batches() -> float:
        with torch.no_grad():
            return sum(loss_of(model(stage.prepare(x)), y).item() for x, y in taken) / len(taken)

    model.zero_grad()
    loss_of(model(stage.prepare(taken[0][0])), taken[0][1]).backward()
    kinds = parameter_kinds(model)

    def after_step(chosen) -> float:
        names = [n for n, (kind, block, p) in kinds.items() if chosen(n, kind, block) and p.grad is not None]
        saved = {n: kinds[n][2].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                kinds[n][2].sub_(lr * kinds[n][2].grad.sign())
        loss = loss_on_batches()
        with torch.no_grad():
            for n, value in saved.items():
                kinds[n][2].copy_(value)
        return loss

    print(f"loss at the probe {loss_on_batches():.3f}; after the step on every parameter {after_step(lambda *_: True):.3f}")
    for kind in sorted({k for k, _, _ in kinds.values()}):
        print(f"  kind {kind:18} {after_step(lambda n, k, b, want=kind: k == want):.3f}")
    for block in sorted({b for _, b, _ in kinds.values()}):
        print(f"  block {block:17} {after_step(lambda n, k, b, want=block: b == want):.3f}")
    single = sorted(((after_step(lambda n, k, b, want=name: n == want), name) for name in kinds), reverse=True)
    print("  single tensors, worst 5:", ", ".join(f"{name} {loss:.3f}" for loss, name in single[:5]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
