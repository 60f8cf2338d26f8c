"""`visiontune lr-find DATA`: the learning-rate range test (Smith 2015, popularised by fastai).

Fine-tunes a throw-away copy of the model for up to `steps` optimizer steps
while the learning rate grows exponentially from `start` to `end`, records the
exponentially smoothed training loss, stops once the loss exceeds 4x its best,
and suggests two rates: "steepest" (where the smoothed loss falls fastest per
log-lr) and "valley" (the middle of the longest stretch of falling loss).
Nothing is saved to the model or the run folders, and every random generator
is restored afterwards, so a later `train` is unaffected.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def suggest(lrs: list[float], losses: list[float]) -> dict:
    """Steepest descent and valley suggestions from a smoothed loss curve (pure function)."""
    log_lr = np.log10(np.asarray(lrs))
    loss = np.asarray(losses)
    slope = np.gradient(loss, log_lr)
    # Only between the warm-up of the smoothing (first 10%) and the minimum (after it, divergence).
    lo, hi = max(1, len(loss) // 10), int(np.argmin(loss)) + 1
    window = slope[lo:hi] if hi > lo else slope
    steepest = float(lrs[(lo if hi > lo else 0) + int(np.argmin(window))])
    # Valley: longest run of strictly decreasing loss; suggest a point two-thirds down it.
    best_start, best_len, start = 0, 1, 0
    for i in range(1, len(loss)):
        if loss[i] >= loss[i - 1]:
            start = i
        if i - start + 1 > best_len:
            best_start, best_len = start, i - start + 1
    valley = float(lrs[best_start + (2 * (best_len - 1)) // 3])
    return {"steepest": steepest, "valley": valley}


def lr_find(data: str, steps: int = 100, start: float = 1e-6, end: float = 1.0, plot: str | Path = "lr_find.png",
            **settings) -> dict:
    from .config import TrainConfig
    from .training import prepare_training

    cfg = TrainConfig(data=str(data), quiet=True, **settings).resolved()
    with torch.random.fork_rng(devices=[]):
        model, batches, prepare, optimizer, frozen = prepare_training(cfg)
        factor = (end / start) ** (1 / max(1, steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = start
        lrs, smoothed, raw = [], [], []
        avg, best = 0.0, math.inf
        model.train()
        for m in frozen:
            m.eval()
        step = 0
        while step < steps:
            for images, targets in batches:
                if step >= steps:
                    break
                lr = start * factor**step
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = torch.nn.functional.cross_entropy(model(prepare(images)), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                avg = 0.98 * avg + 0.02 * value
                debiased = avg / (1 - 0.98 ** (step + 1))
                lrs.append(lr)
                raw.append(value)
                smoothed.append(debiased)
                best = min(best, debiased)
                step += 1
                if not math.isfinite(debiased) or debiased > 4 * best:
                    step = steps  # diverged: the rest of the range tells nothing
                    break
    result = {"lrs": lrs, "losses": smoothed, **suggest(lrs, smoothed)}
    _plot(result, Path(plot))
    result["plot"] = str(plot)
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(result["lrs"], result["losses"], color="#4C72B0")
    for name, colour in (("steepest", "#DD8452"), ("valley", "#55A868")):
        ax.axvline(result[name], color=colour, linestyle="--", label=f"{name} {result[name]:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
