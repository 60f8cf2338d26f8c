"""Does a weight EMA remove fine-tuning's first-epoch dip, and what does it do to the last epoch?

One run of the default's fine-tuning (the probe, then the full stage with the policy --bn auto chose
for the set, or --bn given), with several exponential moving averages of the weights kept beside it.
After each epoch the raw weights and every EMA are evaluated on val (BatchNorm folded, as a run
evaluates). The raw column is the run `visiontune train DATA --seed N` makes, to the image. The EMA
decays are given as time constants in epochs (decay = 1 - 1 / (tau * steps per epoch)), so that they
mean the same on sets of different sizes. docs/recipes.md has the tables.

usage: SEED=1 python bench/ema_screen.py DATA [--bn frozen|train] [--lr LR] [--taus 0.25 0.5 1]
                                             [--epochs 3] [--warmup-epochs W]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from visiontune import runtime
from visiontune.config import TrainConfig
from visiontune.engine import evaluate, train_one_epoch
from visiontune.folding import fold_batchnorm
from visiontune.pipeline import WeightAverage, build_setup, full_stage, image_val_batches
from visiontune.training import probe_row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--bn", default="frozen", choices=["frozen", "train"])
    parser.add_argument("--lr", type=float)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=float, default=0.0)
    args = parser.parse_args()
    cfg = TrainConfig(data=args.data, quiet=True, seed=int(os.environ.get("SEED", 0)), epochs=args.epochs,
                      warmup_epochs=args.warmup_epochs).resolved()
    s = build_setup(cfg, runtime.start("cpu", "fp32", False))
    probe_acc = probe_row(s)[0]["val_acc"]
    s.cfg = s.cfg.with_bn_policy(args.bn)
    if args.lr:
        s.cfg = replace(s.cfg, lr=args.lr)
    # The run's own average is off: the screen keeps its own, one per time constant, without the 8-step floor.
    stage = full_stage(replace(s, cfg=replace(s.cfg, ema_epochs=0.0)), args.epochs)
    averages = [WeightAverage(stage.module, tau, stage.steps_per_epoch, min_steps=1) for tau in args.taus]
    decays = [a.decay for a in averages]

    def after_step():
        for average in averages:
            average.update(stage.module)
    print(f"{args.data} seed {cfg.seed} bn {args.bn} {s.cfg.optimizer} lr {s.cfg.lr:g} warm-up {args.warmup_epochs}; "
          f"{stage.steps_per_epoch} steps/epoch; EMA taus {args.taus} epochs = decays "
          f"{[round(d, 4) for d in decays]}", flush=True)
    print(f"epoch 0 (probe): {probe_acc:.4f}", flush=True)
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        train_one_epoch(stage.trainable, stage.train_batches, stage.optimizer, stage.prepare, stage.scheduler,
                        stage.frozen, label_smoothing=s.cfg.label_smoothing, accumulate=s.cfg.accumulate, mix=stage.mix,
                        after_step=after_step)
        accs = []
        for model in [stage.module, *(a.module for a in averages)]:
            accs.append(evaluate(fold_batchnorm(model, s.pre.size), image_val_batches(s), s.prepare).accuracy)
        print(f"epoch {epoch}: raw {accs[0]:.4f}; " + "; ".join(
            f"ema tau {tau:g} {acc:.4f}" for tau, acc in zip(args.taus, accs[1:])) + f"  ({time.time() - start:.0f}s)",
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
