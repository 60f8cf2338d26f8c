"""Would bf16 autocast make the CPU's training or eval passes cheaper? (docs/recipes.md, "fastai measured
on the same machine".)

`--precision auto` picks fp32 on a CPU. CPUs with AMX or AVX512-BF16 (Intel Sapphire Rapids and later)
compute bf16 natively, so the question is measured here, in one process, on the default backbone
(channels-last, batch 32, random inputs): a training step (forward, backward, AdamW) at the 160 px
crop size and an eval forward at 224 px, fp32 and bf16 alternating twice, the mean of 8 timed
repetitions after 2 untimed. Prints each time and bf16's speed-up over fp32; no target.

usage: python bench/cpu_bf16.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from visiontune.backbones import build_classifier
from visiontune.config import DEFAULT_BACKBONE

TIMED, UNTIMED, BATCH = 8, 2, 32


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(sorted(f for f in flags if f.startswith("amx") or f == "avx512_bf16")) or "none"


def timed(step) -> float:
    for _ in range(UNTIMED):
        step()
    start = time.perf_counter()
    for _ in range(TIMED):
        step()
    return (time.perf_counter() - start) / TIMED


def main() -> None:
    torch.manual_seed(0)
    model, _ = build_classifier(DEFAULT_BACKBONE, 10)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    crops = torch.randn(BATCH, 3, 160, 160).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (BATCH,))
    val = torch.randn(BATCH, 3, 224, 224).to(memory_format=torch.channels_last)

    def train_step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(crops), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def eval_batch(bf16: bool) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(val)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16 flags: {cpu_flags()}")
    times = {("train", p): [] for p in ("fp32", "bf16")} | {("eval", p): [] for p in ("fp32", "bf16")}
    for _ in range(2):
        for precision in ("fp32", "bf16"):
            model.train()
            times["train", precision].append(timed(lambda: train_step(precision == "bf16")))
            model.eval()
            times["eval", precision].append(timed(lambda: eval_batch(precision == "bf16")))
    for kind, what in (("train", "training step, 160 px"), ("eval", "eval batch, 224 px")):
        fp32, bf16 = (sum(times[kind, p]) / 2 for p in ("fp32", "bf16"))
        print(f"{what}: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s: bf16 {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
