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

import dataclasses
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


def lr_find(data: str, steps: int = 100, start: float = 1e-6, end: float = 1.0, out: str | Path | None = None,
            **settings) -> dict:
    """Run the range test on a throw-away copy of what `train` would build; write the plot into `out`.

    The stage comes from the same builder as training's (fine-tuning: every layer on augmented images;
    fixed mode: the head on cached features) and is trained by the engine's loop; the only differences
    are an exponential learning-rate schedule and a per-step hook that records the loss and ends the
    test once the loss has diverged. `out`: a folder (default runs/<data>-lr-find[-N]).
    """
    from . import runtime
    from .config import TrainConfig
    from .engine import NonFiniteLoss, train_one_epoch
    from .pipeline import build_setup, choose_run_dir, ensure_writable, full_stage, head_stage

    cfg = TrainConfig(data=str(data), quiet=True, out=None if out is None else str(out), **settings).resolved()
    if cfg.bn == "auto":
        # train's --bn auto measures its fitted head, which the range test (from a new head) does not
        # have: it tests the pretrained-statistics recipe; --bn train tests the other.
        cfg = cfg.with_bn_policy("frozen")
    # The range test reads training losses only: no weight average to keep beside the model.
    cfg = dataclasses.replace(cfg, ema_epochs=0.0)
    folder = choose_run_dir(cfg, kind="lr-find")
    ensure_writable(folder)
    rt = runtime.start(cfg.device, cfg.precision, cfg.deterministic)
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, smoothed = [], []
    curve = {"avg": 0.0, "best": math.inf, "stop": False}

    def record(loss: torch.Tensor) -> None:
        value = float(loss)
        curve["avg"] = 0.98 * curve["avg"] + 0.02 * value
        debiased = curve["avg"] / (1 - 0.98 ** (len(lrs) + 1))
        lrs.append(stage.optimizer.param_groups[-1]["lr"])
        smoothed.append(debiased)
        curve["best"] = min(curve["best"], debiased)
        # Diverged (the rest of the range tells nothing), or the range is done.
        curve["stop"] = not math.isfinite(debiased) or debiased > 4 * curve["best"] or len(lrs) >= steps

    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        s = build_setup(cfg, rt)
        stage = head_stage(s, 1, start) if cfg.mode == "fixed" else full_stage(s, 1)
        for group in stage.optimizer.param_groups:
            # initial_lr too: the stage's own scheduler already set it, and LambdaLR starts from it.
            group["lr"] = group["initial_lr"] = start
        schedule = torch.optim.lr_scheduler.LambdaLR(stage.optimizer, lambda step: factor**step)
        try:
            while not curve["stop"]:
                train_one_epoch(stage.trainable, stage.train_batches, stage.optimizer, stage.prepare, schedule,
                                stage.frozen, device=rt.device, autocast=rt.autocast, scaler=stage.scaler,
                                should_stop=lambda: curve["stop"], on_step=record, multi_label=s.multi_label)
        except NonFiniteLoss:
            pass  # diverged to inf/nan: the curve up to here is the result
    result = {"lrs": lrs, "losses": smoothed, **suggest(lrs, smoothed)}
    plot = folder / "lr_find.png"
    _plot(result, plot)
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
