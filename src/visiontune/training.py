"""`train()`: data -> model -> stages of epochs (train, then val) -> a run folder. Reads top to bottom.

Construction (data, model, stages) lives in pipeline.py; this module is the
loop around it: checkpoints, the best epoch, resume, the auto plan, and what
each rank of a torchrun job may write (only rank 0 touches the run folder).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, runtime
from .config import TrainConfig
from .engine import EpochStats, NonFiniteLoss, evaluate, is_better, train_one_epoch
from .errors import UsageError, VisiontuneError
from .features import FeatureBatches, fold_batchnorm
from .memory import release_freed_memory
from .pipeline import (Setup, Stage, build_setup, check_same_splits, choose_run_dir, class_weights_for,
                       ensure_writable, freeze_for_mode, full_stage, head_stage, image_train_batches, seed_rank,
                       write_splits)
from .preprocess import TrainTransform
from .recipes import lr_multiplier, make_optimizer, parse_duration

METRICS_HEADER = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "stage"]
PROBE_EPOCHS = 10


@dataclass
class Run:
    """What `train()` returns: the run folder and its results, with the best weights loaded."""

    path: Path
    config: TrainConfig
    classes: list[str]
    metrics: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = 0.0
    best_val_loss: float = math.inf
    model: nn.Module | None = None
    seconds: float = 0.0
    decision: str | None = None
    """--mode auto: the plan it chose, in one line."""


def train(data: str | Path, **settings) -> Run:
    """Fine-tune (mode="finetune"), train a new head on a fixed backbone (mode="fixed"), both in turn
    (mode="staged"), or let the budget decide (mode="auto").

    `settings` are the fields of `TrainConfig` (epochs, lr, batch_size, model, out, seed, ...).
    """
    unknown = set(settings) - set(TrainConfig.field_names())
    if unknown:
        raise UsageError(f"train() got unknown setting(s) {', '.join(sorted(unknown))}; see visiontune.TrainConfig.")
    return run_training(TrainConfig(data=str(data), **settings).resolved())


def resume(run_dir: str | Path, quiet: bool = False) -> Run:
    """Continue a run from its last.ckpt; the result equals the uninterrupted run (on CPU, bitwise).

    The number of processes may differ from the interrupted run's (checkpoints hold no per-rank state).
    """
    run_dir = Path(run_dir)
    config_path, state_path = run_dir / "config.json", run_dir / checkpoint.LAST_CHECKPOINT
    if not config_path.is_file() or not state_path.is_file():
        raise UsageError(f"--resume {run_dir}: has no config.json and last.ckpt; pass a run folder written by "
                         "`visiontune train`.")
    settings = json.loads(config_path.read_text())["config"]
    cfg = TrainConfig(**{**settings, "out": str(run_dir), "quiet": quiet or settings.get("quiet", False)})
    state = checkpoint.load_training_state(state_path)
    if state.get("finished"):
        raise UsageError(f"--resume {run_dir}: the run already finished all its epochs.")
    return run_training(cfg.resolved(), resume_state=state)


class Interrupted(VisiontuneError):
    exit_code = 130


def run_training(cfg: TrainConfig, resume_state: dict | None = None) -> Run:
    started = time.perf_counter()
    rt = runtime.start(cfg.device, cfg.precision, cfg.deterministic)

    def say(message: str) -> None:
        if not cfg.quiet and rt.is_main:
            print(message, flush=True)

    s = build_setup(cfg, rt)
    cfg = s.cfg
    if resume_state is not None:
        run_dir = Path(cfg.out)
        rt.on_main(lambda: check_same_splits(run_dir, s.splits))
    else:
        run_dir = rt.on_main(lambda: _start_run_folder(s))
    if s.excluded and rt.is_main:
        shown = "; ".join(f"{Path(p).name}: {why}" for p, why in list(s.excluded.items())[:3])
        print(f"warning: left out {len(s.excluded)} unreadable image(s) (listed in {run_dir / 'excluded.csv'}): "
              f"{shown}{' ...' if len(s.excluded) > 3 else ''}", file=sys.stderr)

    model = s.model
    run = Run(path=run_dir, config=cfg, classes=s.classes)
    metrics_path = run_dir / "metrics.csv"
    best_state: dict[str, torch.Tensor] | None = None
    best: tuple[float, float] | None = None
    done = 0  # epochs finished, over all stages
    plan: dict = {}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        checkpoint.set_rng_state(resume_state["rng"], s.generator)
        # Rank 0's streams were saved; the other ranks' augmentations must still differ from it.
        seed_rank(cfg.seed + 104729 * resume_state["epoch"], rt.rank)
        run.metrics = list(resume_state["metrics"])
        plan = dict(resume_state.get("plan") or {})
        if resume_state["best"] is not None:
            run.best_epoch, run.best_val_acc, run.best_val_loss = resume_state["best"]
            best = (run.best_val_acc, run.best_val_loss)
            best_state = rt.broadcast(checkpoint.load_weights(run_dir / checkpoint.BEST_WEIGHTS)
                                      if rt.is_main else None)
        done = resume_state["epoch"]
        say(f"resuming {run_dir} after epoch {done}")
    if rt.is_main:
        # Rewritten from the checkpoint on resume: drops any row of an epoch that did not finish.
        with metrics_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(METRICS_HEADER)
            writer.writerows(_metrics_cells(row) for row in run.metrics)

    stage: Stage | None = None

    def save_state(epoch: int, finished: bool = False) -> None:
        if not rt.is_main:
            return
        checkpoint.save_training_state(run_dir / checkpoint.LAST_CHECKPOINT, {
            "format_version": checkpoint.FORMAT_VERSION, "epoch": epoch, "model": model.state_dict(),
            "stage": stage.name if stage else None,
            "optimizer": stage.optimizer.state_dict() if stage else None,
            "rng": checkpoint.rng_state(s.generator), "metrics": run.metrics, "plan": plan,
            "finished": finished,
            "best": (run.best_epoch, run.best_val_acc, run.best_val_loss) if best else None})

    if resume_state is None:
        save_state(0)  # so that even a run stopped in its first epoch can be resumed
    class_weights = class_weights_for(s)
    stop = _StopOnSigint(enabled=not rt.distributed)  # torchrun stops all ranks itself
    offset = 0  # epochs of the stages before the current one
    with stop:
        for name, epochs in _stage_specs(cfg):
            if name == "full" and cfg.mode == "auto":
                if "full_epochs" not in plan:
                    plan.update(_plan_auto(s, run, started, say))
                    run.decision = plan["decision"]
                    save_state(done)
                epochs = plan["full_epochs"]
                run.decision = plan["decision"]
            if epochs == 0 or done >= offset + epochs:
                offset += epochs
                continue
            if name == "full" and cfg.mode == "finetune" and cfg.head_init == "probe" and done == 0:
                fit_probe(model.get_classifier(), s.features_of(s.train_items, 1), s.train_labels, cfg, s.generator)
                release_freed_memory()
            lr = cfg.head_lr if name == "head" and cfg.head_lr is not None else cfg.lr
            stage = head_stage(s, epochs, lr) if name == "head" else full_stage(s, epochs)
            if resume_state is not None and resume_state.get("stage") == name and done > offset:
                stage.optimizer.load_state_dict(resume_state["optimizer"])
                stage.fast_forward(done - offset, cfg)
            for epoch in range(done + 1, offset + epochs + 1):
                epoch_start = time.perf_counter()
                try:
                    train_stats: EpochStats = train_one_epoch(
                        stage.trainable, s.progress(stage.train_batches, len(stage.train_batches),
                                                    f"epoch {epoch} train"),
                        stage.optimizer, stage.prepare, stage.scheduler, stage.frozen, class_weights=class_weights,
                        label_smoothing=cfg.label_smoothing, should_stop=stop.requested, accumulate=cfg.accumulate,
                        device=rt.device, mix=stage.mix, autocast=rt.autocast, scaler=stage.scaler,
                        no_sync=getattr(stage.trainable, "no_sync", None),
                        reduce=(lambda v: v) if stage.on_features else rt.all_reduce_sum)
                except NonFiniteLoss as exc:
                    raise VisiontuneError(
                        f"training stopped: the loss became {exc.value} at epoch {epoch}, step {exc.step}; likely "
                        f"a learning rate too high (--lr {stage.lr}) or bad input; the last good state is "
                        f"{run_dir / checkpoint.LAST_CHECKPOINT} (epoch {epoch - 1}).") from None
                if not train_stats.completed:
                    raise Interrupted(
                        f"interrupted in epoch {epoch}; the state after epoch {epoch - 1} is saved in "
                        f"{run_dir / checkpoint.LAST_CHECKPOINT}; continue with: visiontune train --resume {run_dir}")
                release_freed_memory()
                rt.broadcast_buffers(model)
                # In eval mode BatchNorm is a fixed affine map: a folded copy evaluates about 1.5x faster.
                eval_model = stage.module if stage.on_features else fold_batchnorm(stage.module, s.pre.size)
                val_stats = evaluate(eval_model, s.progress(stage.val_batches, len(stage.val_batches),
                                                            f"epoch {epoch} val"),
                                     stage.prepare, label_smoothing=cfg.label_smoothing, device=rt.device,
                                     autocast=rt.autocast,
                                     reduce=(lambda v: v) if stage.on_features else rt.all_reduce_sum)
                del eval_model
                lr_now = stage.lr_at_epoch_end(epoch - offset, cfg)
                row = {"epoch": epoch, "train_loss": train_stats.loss, "train_acc": train_stats.accuracy,
                       "val_loss": val_stats.loss, "val_acc": val_stats.accuracy, "lr": lr_now,
                       "seconds": time.perf_counter() - epoch_start, "stage": name}
                run.metrics.append(row)
                if rt.is_main:
                    with metrics_path.open("a", newline="") as f:
                        csv.writer(f).writerow(_metrics_cells(row))
                say(f"epoch {epoch}/{_total_epochs(cfg, plan)} {name:4}  train loss {train_stats.loss:.4f} acc "
                    f"{train_stats.accuracy:.4f}  val loss {val_stats.loss:.4f} acc {val_stats.accuracy:.4f}  "
                    f"lr {lr_now:.2e}  {row['seconds']:.1f}s")
                if is_better(val_stats.accuracy, val_stats.loss, best):
                    best = (val_stats.accuracy, val_stats.loss)
                    run.best_epoch, run.best_val_acc, run.best_val_loss = epoch, val_stats.accuracy, val_stats.loss
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if rt.is_main:
                        checkpoint.save_weights(run_dir / checkpoint.BEST_WEIGHTS, best_state)
                        checkpoint.write_json(run_dir / checkpoint.MODEL_JSON, {
                            **s.model_meta(), "best_epoch": epoch, "val_acc": val_stats.accuracy,
                            "val_loss": val_stats.loss})
                done = epoch
                save_state(epoch)
                if cfg.patience is not None and epoch - run.best_epoch >= cfg.patience:
                    say(f"early stop: val has not improved for {cfg.patience} epochs")
                    break
            else:
                offset += epochs
                continue
            break  # early stop ends every stage
    save_state(done, finished=True)
    rt.barrier()  # no rank leaves before rank 0 has written the run's last file

    # The run's result is the best epoch's weights, not the last epoch's.
    model.load_state_dict(best_state)
    model.eval()
    run.model = model
    run.seconds = time.perf_counter() - started
    say(f"best epoch {run.best_epoch}: val acc {run.best_val_acc:.4f} (val loss {run.best_val_loss:.4f}); "
        f"run folder {run_dir}")
    return run


def _stage_specs(cfg: TrainConfig) -> list[tuple[str, int]]:
    if cfg.mode == "fixed":
        return [("head", cfg.epochs)]
    if cfg.mode == "finetune":
        return [("full", cfg.epochs)]
    return [("head", cfg.head_epochs), ("full", cfg.epochs)]  # staged; auto decides the second count


def _total_epochs(cfg: TrainConfig, plan: dict) -> int:
    if cfg.mode == "auto":
        return cfg.head_epochs + plan.get("full_epochs", cfg.epochs)
    return sum(epochs for _, epochs in _stage_specs(cfg))


def _start_run_folder(s: Setup) -> Path:
    """Rank 0 only: a new run folder with config.json, the splits and the excluded images."""
    cfg = s.cfg
    run_dir = choose_run_dir(cfg)
    ensure_writable(run_dir)
    if s.excluded:
        with (run_dir / "excluded.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows(s.excluded.items())
    checkpoint.write_json(run_dir / "config.json", {
        "config": cfg.to_json(),
        "data": {"root": str(s.splits.root.resolve()), "layout": s.splits.layout, "classes": s.classes,
                 "counts": s.splits.counts(), "auto_split": s.splits.auto_split},
        "processes": s.rt.world_size,
    })
    write_splits(run_dir, s.splits)
    return run_dir


def _plan_auto(s: Setup, run: Run, started: float, say) -> dict:
    """After the head stage: how many fine-tuning epochs fit the rest of the budget, and are they worth it.

    One fine-tuning epoch is estimated from timed steps of a copy of the model on a synthetic batch
    (the cost of a step does not depend on the pixels; the copy and a forked RNG leave the run
    untouched) plus a timed val batch. Rank 0 decides, every rank follows.
    """
    cfg, rt = s.cfg, s.rt
    budget = parse_duration(cfg.budget)
    head_rows = [r for r in run.metrics if r["stage"] == "head"]
    head_acc = max((r["val_acc"] for r in head_rows), default=0.0)
    steps_per_epoch = math.ceil(math.ceil(len(s.train_items) / rt.world_size) / cfg.batch_size / cfg.accumulate)
    val_batches = math.ceil(math.ceil(len(s.val_items) / rt.world_size) / cfg.eval_batch_size)
    step_s, val_batch_s, fold_s = _time_fine_tune_step(s)
    epoch_s = 1.1 * (steps_per_epoch * cfg.accumulate * step_s + val_batches * val_batch_s + fold_s) + 0.5
    elapsed = time.perf_counter() - started
    left = budget - elapsed - 3.0  # loading the best weights and writing the last files
    fits = max(0, min(cfg.epochs, int(left // epoch_s)))
    if head_acc >= 1.0:
        epochs, why = 0, (f"kept the frozen-backbone head: it already gets every val image right "
                          f"(val acc {head_acc:.4f} after {elapsed:.0f}s)")
    elif fits == 0:
        epochs, why = 0, (f"kept the frozen-backbone head (val acc {head_acc:.4f} after {elapsed:.0f}s): one "
                          f"fine-tuning epoch needs about {epoch_s:.0f}s and {max(left, 0):.0f}s of the "
                          f"{budget:.0f}s budget are left")
    else:
        epochs, why = fits, (f"fine-tuning every layer for {fits} epoch(s) of about {epoch_s:.0f}s: the "
                             f"frozen-backbone head reached val acc {head_acc:.4f} in {elapsed:.0f}s and "
                             f"{left:.0f}s of the {budget:.0f}s budget are left")
    decision = rt.broadcast({"full_epochs": epochs, "decision": "auto: " + why, "head_val_acc": head_acc,
                             "seconds_used": round(elapsed, 2), "budget_seconds": budget,
                             "estimated_epoch_seconds": round(epoch_s, 2), "epochs_that_fit": fits})
    say(decision["decision"])
    if rt.is_main:
        checkpoint.write_json(run.path / "auto.json", decision)
    return decision


def _time_fine_tune_step(s: Setup) -> tuple[float, float, float]:
    """Seconds of one training step and one val batch of the full stage, and of folding BatchNorm."""
    import copy

    cfg, rt = s.cfg, s.rt
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        model = copy.deepcopy(s.model)
        freeze_for_mode(cfg, model, "full")
        optimizer = make_optimizer(cfg, list(model.named_parameters()), model)
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(cfg.batch_size, 3, cfg.train_size, cfg.train_size, generator=generator).to(rt.device)
        if cfg.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = torch.randint(len(s.classes), (cfg.batch_size,), generator=generator).to(rt.device)
        batches = [(inputs, targets)] * 3
        times = []
        model.train()
        for x, y in batches:  # the first step pays one-off costs (kernel selection, allocations)
            t = time.perf_counter()
            train_one_epoch(model, [(x, y)], optimizer, device=rt.device, autocast=rt.autocast)
            times.append(time.perf_counter() - t)
        step_s = sum(times[1:]) / len(times[1:])
        t = time.perf_counter()
        folded = fold_batchnorm(model, s.pre.size)
        fold_s = time.perf_counter() - t
        val_inputs = torch.randn(cfg.eval_batch_size, 3, s.pre.size, s.pre.size, generator=generator).to(rt.device)
        if cfg.channels_last:
            val_inputs = val_inputs.contiguous(memory_format=torch.channels_last)
        val_targets = torch.zeros(cfg.eval_batch_size, dtype=torch.long, device=rt.device)
        evaluate(folded, [(val_inputs, val_targets)], device=rt.device, autocast=rt.autocast)  # warm-up
        t = time.perf_counter()
        evaluate(folded, [(val_inputs, val_targets)], device=rt.device, autocast=rt.autocast)
        val_batch_s = time.perf_counter() - t
        del model, folded, optimizer
    release_freed_memory()
    return step_s, val_batch_s, fold_s


def prepare_training(cfg: TrainConfig):
    """Model, training batches, input preparation, optimizer and frozen modules as `train` would build
    them for fine-tuning (image batches, no run folder, no probe): for tools such as lr-find that
    must not touch a run."""
    s = build_setup(cfg, runtime.Runtime(), screen_splits=("train",))
    stage_name = "head" if cfg.mode == "fixed" else "full"
    frozen = freeze_for_mode(s.cfg, s.model, stage_name)
    batches = image_train_batches(s, TrainTransform(s.pre, s.cfg.train_size, strength=s.cfg.augment))
    params = [(n, p) for n, p in s.model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(s.cfg, params, s.model if stage_name == "full" else None)
    return s.model, batches, s.prepare, optimizer, frozen


def _metrics_cells(row: dict) -> list:
    # repr keeps every bit of the float, so a resumed run's file can equal an uninterrupted one's.
    return [row[k] if k in ("epoch", "stage") else f"{row[k]:.6g}" if k in ("lr", "seconds") else repr(row[k])
            for k in METRICS_HEADER]


class _StopOnSigint:
    """Ctrl-C asks the loop to stop after the current step instead of killing it mid-write.

    A second Ctrl-C falls through to Python's default (KeyboardInterrupt).
    Only installed in the main thread (signal handlers cannot be set elsewhere), and not under
    torchrun, which stops every rank itself (ranks stopping at different steps would wait on
    each other forever).
    """

    def __init__(self, enabled: bool = True):
        self.flag = False
        self.previous = None
        self.enabled = enabled

    def requested(self) -> bool:
        return self.flag

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nstopping after this step (Ctrl-C again to abort now)", file=sys.stderr, flush=True)

    def __enter__(self):
        import signal
        import threading

        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def fit_probe(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
              generator: torch.Generator) -> None:
    """Linear probe: fit the new head on frozen-backbone features before fine-tuning (LP-FT).

    Costs one forward pass over the training images (cached across runs) and
    well under a second of head training, and means fine-tuning starts from a
    head that already separates the classes instead of sending random
    gradients into the pretrained backbone. Every rank fits the same head from
    the same features and generator.
    """
    device = next(classifier.parameters()).device
    batches = FeatureBatches(features, labels, cfg.batch_size, generator)
    optimizer = make_optimizer(replace(cfg, lr_decay=None), list(classifier.named_parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier("cosine", step, len(batches), PROBE_EPOCHS, 0.0))
    for _ in range(PROBE_EPOCHS):
        train_one_epoch(classifier, batches, optimizer, scheduler=scheduler, label_smoothing=cfg.label_smoothing,
                        device=device)
