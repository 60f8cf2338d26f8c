"""`train()`: data -> model -> stages of epochs (train, then val) -> a run folder. Reads top to bottom.

Construction (data, model, stages) lives in pipeline.py; this module is the
loop around it: checkpoints, the best epoch, resume, the auto plan, and what
each rank of a torchrun job may write (only rank 0 touches the run folder).
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import checkpoint, runtime
from .callbacks import CallbackList, EpochEnd, RunEnd, StepEnd, frozen, loggers_for
from .runtime import seed_rank
from .config import TrainConfig, parse_duration
from .data import cross_split_duplicates, val_loader
from .engine import EpochStats, EvalOutput, NonFiniteLoss, evaluate, is_better, train_one_epoch
from .errors import UsageError, VisiontuneError
from .folding import fold_batchnorm
from .images import file_identity
from .memory import release_freed_memory
from .prefix import FrozenPrefix
from .preprocess import EvalTransform
from .pipeline import (Setup, Stage, at_image_size, build_setup, choose_measured_size, choose_run_dir,
                       class_weights_for, default_freeze, ensure_writable, evaluate_by_features, full_stage, head_stage,
                       refit_head, size_decision_made, starts_with_probe)
from .recipes import BN_CHECK_IMAGES, choose_bn_policy, fit_probe
from .runfolder import RunFolder

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


def train(data: str | Path, callbacks: Sequence = (), **settings) -> Run:
    """Fine-tune (mode="finetune"), train a new head on a fixed backbone (mode="fixed"), both in turn
    (mode="staged"), or let the budget decide (mode="auto").

    `settings` are the fields of `TrainConfig` (epochs, lr, batch_size, model, out, seed, ...).
    `callbacks`: observers with on_step_end / on_epoch_end / on_run_end (see visiontune.callbacks).
    """
    unknown = set(settings) - set(TrainConfig.field_names())
    if unknown:
        raise UsageError(f"train() got unknown setting(s) {', '.join(sorted(unknown))}; see visiontune.TrainConfig.")
    return run_training(TrainConfig(data=str(data), **settings).resolved(), callbacks=callbacks)


RESUME_OVERRIDES = ("device", "threads", "workers", "cache_dir")
"""Settings a resumed run may change: where and how it runs, not what it trains."""


def resume(run_dir: str | Path, quiet: bool = False, epochs: int | None = None, callbacks: Sequence = (),
           **where) -> Run:
    """Continue a run from its last.ckpt; the result equals the uninterrupted run (on CPU, bitwise).

    With `epochs` above the run's own, a run (finished or not) is extended to that many epochs of
    its last stage: the learning-rate schedule is re-planned over the new total, and training goes
    on from the last epoch's weights and optimizer state. The number of processes may differ from
    the interrupted run's (checkpoints hold no per-rank state). `where`: RESUME_OVERRIDES.
    """
    unknown = set(where) - set(RESUME_OVERRIDES)
    if unknown:
        raise UsageError(f"resume() got setting(s) {', '.join(sorted(unknown))}; a resumed run keeps its own, "
                         f"except {', '.join(RESUME_OVERRIDES)}.")
    folder = RunFolder(run_dir)
    if not folder.config_file.is_file() or not folder.last_checkpoint_file.is_file():
        raise UsageError(f"--resume {folder}: has no {folder.config_file.name} and {folder.last_checkpoint_file.name}; "
                         "pass a run folder written by `visiontune train`.")
    record = folder.read_config()
    settings = record["config"]
    if "ema_epochs" not in settings:  # a run started before weight averaging existed goes on without it
        settings = {**settings, "ema_epochs": 0.0}
    if "refit_head" not in settings:  # ... and one started before --refit-head without that
        settings = {**settings, "refit_head": False}
    if "freeze" not in settings:  # ... and one started before --freeze trained every layer
        settings = {**settings, "freeze": 0}
    cfg = TrainConfig(**{**settings, **where, "out": str(folder.path), "quiet": quiet or settings.get("quiet", False)})
    state = folder.load_last()
    if epochs is not None and cfg.epochs is None:
        # Stopped before --bn auto chose the fine-tuning recipe, which brings its epochs: N is the run's,
        # as it would have been given to a new run.
        cfg = replace(cfg, epochs=epochs)
    elif epochs is not None and epochs != cfg.epochs:
        _extend(folder, record, cfg, state, epochs)
        cfg = replace(cfg, epochs=epochs)
    elif state.get("finished"):
        raise UsageError(f"--resume {folder}: the run already finished all its {cfg.epochs} epochs; add --epochs N "
                         f"(more than {cfg.epochs}) to extend it.")
    return run_training(cfg.resolved(), resume_state=state, callbacks=callbacks)


def _extend(folder: RunFolder, record: dict, cfg: TrainConfig, state: dict, epochs: int) -> None:
    """Plan a longer run: refuse what cannot be extended, else rewrite config.json and say how."""
    if not isinstance(epochs, int) or epochs < cfg.epochs:
        raise UsageError(f"--epochs {epochs}: --resume {folder} can extend the run beyond its {cfg.epochs} epochs, "
                         "not shorten it; pass a larger number.")
    if cfg.mode == "auto":
        raise UsageError(f"--resume {folder} --epochs {epochs}: --mode auto plans its epochs to its --budget; start "
                         f"a new run from this one with --init {folder} instead.")
    stage = "head" if cfg.mode == "fixed" else "full"
    state["finished"] = False
    record["config"]["epochs"] = epochs
    if runtime.env_world()[0] == 0:
        folder.write_config(record)
    if runtime.env_world()[0] == 0:  # on stderr, as warnings are: the schedule changes, even with --quiet
        print(f"note: extending {folder} from {cfg.epochs} to {epochs} {stage}-stage epochs: the {cfg.schedule or 'default'} "
              f"learning-rate schedule is re-planned over {epochs} epochs, and training continues from epoch "
              f"{state['epoch']}'s weights and optimizer state", file=sys.stderr, flush=True)


class Interrupted(VisiontuneError):
    exit_code = 130


class Diverged(VisiontuneError):
    """The loss became NaN or infinite; raised on every rank at the same step, said once (rank 0)."""

    same_on_every_rank = True


@dataclass
class LoopState:
    """What the loop changes as it runs, as plain data: with the model, optimizer and RNG states it is
    last.ckpt. Functions below take it and change it in the open; nothing reads it behind their back."""

    epoch: int = 0
    """Epochs finished, over all stages (the linear probe of a fine-tune run is epoch 0)."""
    metrics: list[dict] = field(default_factory=list)
    best: tuple[int, float, float] | None = None
    """(epoch, val acc, val loss) of the best epoch so far."""
    plan: dict = field(default_factory=dict)
    """--mode auto's decision, once made."""
    finished: bool = False
    steps: int = 0
    """Optimizer steps taken over the whole run (the x axis of per-step logs)."""
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    """The best epoch's weights in memory (on disk: best.safetensors); not in last.ckpt."""
    duplicate_check: DuplicateCheck | None = field(default=None, repr=False)
    """The new run's cross-split duplicate check while it runs in the background."""
    best_val: EvalOutput | None = field(default=None, repr=False)
    """The best epoch's val pass with its per-image probabilities (one process, this process's run only)."""
    saved: tuple[int, float] = (0, 0.0)
    """(epoch, perf_counter()) of the last write of last.ckpt."""
    started: float = field(default_factory=time.perf_counter)
    """perf_counter() at the run's start, moved back on resume by the seconds already spent, so that
    --mode auto's budget and the run's wall time count every process that worked on the run."""

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def to_checkpoint(self, model: nn.Module, stage: Stage | None, generator: torch.Generator) -> dict:
        return {"format_version": checkpoint.FORMAT_VERSION, "epoch": self.epoch, "model": model.state_dict(),
                "stage": stage.name if stage else None, "optimizer": stage.optimizer.state_dict() if stage else None,
                # fp16's loss scale: a resumed run must not start again from 65536 and skip steps.
                "scaler": stage.scaler.state_dict() if stage is not None and stage.scaler is not None else None,
                "ema": stage.ema.module.state_dict() if stage is not None and stage.ema is not None else None,
                "rng": checkpoint.rng_state(generator), "metrics": self.metrics, "plan": self.plan,
                "finished": self.finished, "best": self.best, "seconds": self.seconds, "steps": self.steps}

    @classmethod
    def from_checkpoint(cls, state: dict) -> "LoopState":
        return cls(epoch=state["epoch"], metrics=list(state["metrics"]), plan=dict(state.get("plan") or {}),
                   best=tuple(state["best"]) if state["best"] is not None else None,
                   started=time.perf_counter() - float(state.get("seconds", 0.0)), steps=int(state.get("steps", 0)),
                   saved=(state["epoch"], time.perf_counter()))


def run_training(cfg: TrainConfig, resume_state: dict | None = None, callbacks: Sequence = ()) -> Run:
    """Set up, restore, fit each stage in turn (an early stop ends them all), finish."""
    started = time.perf_counter()
    s = build_setup(cfg, runtime.start(cfg.device, cfg.precision, cfg.deterministic))
    folder = _open_run_folder(s, resuming=resume_state is not None)
    # Observers (the user's, then the loggers) run on rank 0 only: they see what rank 0 writes.
    s = replace(s, observers=CallbackList(list(callbacks) + loggers_for(cfg.log, folder.path, cfg.to_json()))
                if s.rt.is_main else CallbackList())
    loop = _restore(s, folder, resume_state) if resume_state is not None else LoopState(started=started)
    if resume_state is None and s.size_decision is not None and s.size_decision["why"]:
        _say(s, s.size_decision["why"])  # a measured size is said once measured
    if resume_state is None and s.freeze_decision is not None:
        _say(s, s.freeze_decision)
    if resume_state is None and s.rt.is_main:
        loop.duplicate_check = DuplicateCheck(s.splits)
        s = replace(s, progress=_starting_after_first_batch(s.progress, loop.duplicate_check.start))
    if s.rt.is_main:
        folder.write_metrics(loop.metrics)  # on resume: drops any row of an epoch that did not finish
    stage = None
    if resume_state is None:
        _save_last(s, folder, loop, stage)  # so that even a run stopped in its first epoch can be resumed
    offset = 0  # epochs of the stages before the current one
    with _StopOnSigint(enabled=not s.rt.distributed) as stop:  # torchrun stops all ranks itself
        for name, epochs in _stage_specs(s.cfg):
            if name == "full" and s.size_decision is not None and s.size_decision.get("pending"):
                s = _choose_image_size(s, folder)
            if name == "full" and _probe_due(s, loop):
                # Epoch 0: the linear probe, a frozen-backbone model in its own right. It is logged and
                # competes for best like any epoch, so fine-tuning can only add to it, never take away.
                _record(s, folder, loop, *probe_row(s))
                release_freed_memory()
            if name == "full" and s.cfg.bn == "auto":
                _choose_bn(s, folder)
            if name == "full":
                epochs = s.cfg.epochs  # --bn auto's recipe may have brought them
            if name == "full" and s.cfg.mode == "auto":
                if "full_epochs" not in loop.plan:
                    loop.plan = _plan_auto(s, folder, loop)
                    _save_last(s, folder, loop, stage)
                epochs = loop.plan["full_epochs"]
            if epochs > 0 and loop.epoch < offset + epochs:
                stage, stopped_early = _fit_stage(s, folder, loop, name, offset, epochs, stop, resume_state)
                if stopped_early:
                    break
            offset += epochs
    loop.finished = True
    _save_last(s, folder, loop, stage)
    _report_duplicates(s, folder, loop, wait=True)
    s.rt.barrier()  # no rank leaves before rank 0 has written the run's last file
    run = _finish(s, folder, loop)
    s.observers.call("on_run_end", RunEnd(str(folder.path), tuple(run.classes), run.best_epoch, run.best_val_acc,
                                          run.best_val_loss, tuple(frozen(r) for r in loop.metrics),
                                          frozen(s.cfg.to_json()), run.seconds, _best_val_probabilities(s, loop)))
    return run


def _best_val_probabilities(s: Setup, loop: LoopState):
    """The best epoch's val probabilities as a read-only array in splits/val.csv's order, or None when
    they were not kept (torchrun, an interrupted run) or do not line up with the val images."""
    val = loop.best_val
    if val is None or val.probabilities is None or not torch.equal(val.targets.to(s.val_labels.dtype), s.val_labels):
        return None
    probabilities = val.probabilities.float().numpy().copy()
    probabilities.setflags(write=False)
    return probabilities


def _open_run_folder(s: Setup, resuming: bool) -> RunFolder:
    """The run folder: the given one on resume (same images or refused), else a new one (rank 0 writes)."""
    if resuming:
        folder = RunFolder(s.cfg.out)
        s.exclude(folder.read_excluded())  # found by the interrupted run; said then
        s.rt.on_main(lambda: folder.check_same_splits(s.splits.samples, s.classes))
    else:
        folder = RunFolder(s.rt.on_main(lambda: _start_run_folder(s)))
    s.on_exclude = lambda new: _record_excluded(s, folder, new)
    return folder


def _record_excluded(s: Setup, folder: RunFolder, new: dict[str, str]) -> None:
    """Unreadable images just found: listed in excluded.csv and gone from splits/*.csv at once; said
    in one warning when the epoch that met them ends (_say_excluded)."""
    s.unsaid.update(new)
    if s.rt.is_main:
        folder.write_excluded(s.excluded)
        folder.write_splits(s.splits.samples, s.classes)


def _say_excluded(s: Setup, folder: RunFolder) -> None:
    if s.unsaid and s.rt.is_main:
        shown = "; ".join(f"{Path(p).name}: {why}" for p, why in list(s.unsaid.items())[:3])
        print(f"warning: left out {len(s.unsaid)} unreadable image(s) (listed in {folder.excluded_file}): "
              f"{shown}{' ...' if len(s.unsaid) > 3 else ''}", file=sys.stderr, flush=True)
    s.unsaid.clear()


def _restore(s: Setup, folder: RunFolder, state: dict) -> LoopState:
    loop = LoopState.from_checkpoint(state)
    s.model.load_state_dict(state["model"])
    checkpoint.set_rng_state(state["rng"], s.generator)
    # Rank 0's streams were saved; the other ranks' augmentations must still differ from it.
    seed_rank(s.cfg.seed + 104729 * loop.epoch, s.rt.rank)
    if loop.best is not None:
        loop.best_weights = s.rt.broadcast(folder.load_best_weights() if s.rt.is_main else None)
    _say(s, f"resuming {folder} after epoch {loop.epoch}")
    return loop


# An epoch on cached features takes milliseconds and last.ckpt (the whole model) ~0.15 s to write:
# in a head stage it is written at most this often, and at the stage's end, an early stop or a stop.
HEAD_STAGE_SAVE_EVERY_S = 10.0


def _save_last(s: Setup, folder: RunFolder, loop: LoopState, stage: Stage | None) -> None:
    if s.rt.is_main:
        folder.save_last(loop.to_checkpoint(s.model, stage, s.generator))
    loop.saved = (loop.epoch, time.perf_counter())


def _fit_stage(s: Setup, folder: RunFolder, loop: LoopState, name: str, offset: int, epochs: int, stop,
               resume_state: dict | None) -> tuple[Stage, bool]:
    """Train one stage from loop.epoch to offset + epochs; returns the stage and whether it stopped early."""
    cfg = s.cfg
    lr = cfg.head_lr if name == "head" and cfg.head_lr is not None else cfg.lr
    stage = head_stage(s, epochs, lr) if name == "head" else full_stage(s, epochs)
    if resume_state is not None and resume_state.get("stage") == name and loop.epoch > offset:
        stage.optimizer.load_state_dict(resume_state["optimizer"])
        if stage.scaler is not None and resume_state.get("scaler") is not None:
            stage.scaler.load_state_dict(resume_state["scaler"])
        stage.fast_forward(loop.epoch - offset, cfg)
        if stage.ema is not None and resume_state.get("ema") is not None:
            stage.ema.module.load_state_dict(resume_state["ema"])
    if stage.ema is not None and loop.epoch < offset + epochs:
        _say_weight_average(s, folder, stage)
    if _refits(s, stage) and loop.epoch < offset + epochs:
        _say(s, "--refit-head: val, the choice of best and the saved model use a head fitted again after each "
                "epoch on the evaluated weights' own features of the training images (the probe's recipe)")
    class_weights = class_weights_for(s)
    for epoch in range(loop.epoch + 1, offset + epochs + 1):
        _record(s, folder, loop, *_epoch_row(s, folder, loop, stage, epoch, offset, stop, class_weights))
        loop.epoch = epoch
        early_stop = cfg.patience is not None and epoch - loop.best[0] >= cfg.patience
        if not stage.on_features or early_stop or epoch == offset + epochs \
                or time.perf_counter() - loop.saved[1] >= HEAD_STAGE_SAVE_EVERY_S:
            _save_last(s, folder, loop, stage)
        if early_stop:
            _say(s, f"early stop: val has not improved for {cfg.patience} epochs")
            return stage, True
    return stage, False


def _probe_due(s: Setup, loop: LoopState) -> bool:
    return starts_with_probe(s.cfg, s.head_from_init) and loop.epoch == 0


def _choose_image_size(s: Setup, folder: RunFolder) -> Setup:
    """Images smaller than the training crops (choose_image_sizes): fit the linear probe on features at
    each candidate size and go on at the better one, kept in s.cfg and config.json so that a resumed run
    goes on with it. The features are those the probe reads next (the feature cache keeps both sizes'
    for later runs); each fit starts from the run's head and generator as the probe will, so the chosen
    size's score is the probe row's. Rank 0 decides."""
    decision = s.size_decision
    setups = {size: s if size == s.pre.size else at_image_size(s, size) for size in decision["candidates"]}
    for candidate in setups.values():
        if candidate.frozen_outputs is not None:
            # Only the chosen size's frozen-layer output is read again (by val and the refit): the store
            # gets it once the choice is made, and not the other's (0.6 GB at 224 px on eurosat10).
            candidate.frozen_outputs.holding_writes = True
    scores = {}
    for size, candidate in setups.items():
        train = candidate.features_of(candidate.train_items, 1, desc=f"features at {size} px")
        val = candidate.features_of(candidate.val_items, 1, desc=f"val features at {size} px")[0]
        generator = torch.Generator()
        generator.set_state(s.generator.get_state())
        _, val_stats = fit_probe(copy.deepcopy(s.model.get_classifier()), train, candidate.train_labels,
                                 candidate.cfg, generator, val, candidate.val_labels, candidate.multi_label)
        scores[size] = (val_stats.accuracy, val_stats.loss)
    scores = s.rt.broadcast(scores if s.rt.is_main else None)
    chosen = choose_measured_size(scores)
    for size, candidate in setups.items():
        if size != chosen:
            candidate.frozen_outputs = None  # the other size's kept output: memory the run will not read
        elif candidate.frozen_outputs is not None:
            candidate.frozen_outputs.holding_writes = False
            candidate.frozen_outputs.write_new(list(candidate.frozen_outputs.outputs))
    s = replace(setups[chosen], size_decision=size_decision_made(decision, scores, chosen))
    _say(s, s.size_decision["why"])
    if s.rt.is_main:
        record = folder.read_config()
        folder.write_config({**record, "config": s.cfg.to_json(), "image_size_decision": s.size_decision})
    return s


def _choose_bn(s: Setup, folder: RunFolder) -> None:
    """--bn auto, before the first fine-tuning step: measure, then fix the policy (and its optimizer and
    lr) in s.cfg and config.json, so that a resumed run goes on with the same. Rank 0 decides."""
    cfg, rt = s.cfg, s.rt
    # The probe and the head stage were fitted on cached features: those give the running statistics'
    # predictions for free. Otherwise (a random or --init head) a forward pass does. Read on every rank:
    # under torchrun the feature pass is collective (each rank computes its share of any missing image).
    on_features = cfg.feature_cache and not s.head_from_init and (cfg.mode != "finetune" or cfg.head_init == "probe")
    features = s.features_of(s.train_items, 1)[0] if on_features else None

    def measure() -> dict:
        # Its own generator, and the global RNG restored: the run's batches and augmentations are the
        # same whichever policy is chosen, and the same as with --bn given.
        with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
            picked = torch.randperm(len(s.train_items), generator=torch.Generator().manual_seed(cfg.seed))
            picked = picked[:BN_CHECK_IMAGES]  # in random order: training batches mix the classes, and so must these
            items = [s.train_items[i] for i in picked.tolist()]
            # Batches of the training batch size: the statistics train mode would use.
            loader = val_loader(items, s.decode, EvalTransform(s.pre), replace(cfg, eval_batch_size=cfg.batch_size),
                                replace(rt, rank=0, world_size=1), len(s.classes) if s.multi_label else 0)
            batches = [(x, y) for x, y, _ in loader]
            if features is not None and sum(len(y) for _, y in batches) == len(picked):
                with torch.inference_mode():
                    logits = s.model.get_classifier()(features[picked].to(rt.device)).float()
                running = torch.sigmoid(logits) if s.multi_label else torch.softmax(logits, 1)
            else:
                running = evaluate(s.model, batches, s.prepare, keep_outputs=True, device=rt.device,
                                   autocast=rt.autocast, multi_label=s.multi_label).probabilities
            return choose_bn_policy(s.model, running, batches, s.prepare, rt.device, rt.autocast, s.multi_label)

    decision = rt.broadcast(measure() if rt.is_main else None)
    s.cfg = cfg.with_bn_policy(decision["bn"], decision.get("far", False))
    freeze_line = None
    if s.cfg.freeze is None:  # --freeze's default comes with the policy
        count, freeze_line = default_freeze(s.model, s.cfg.bn)
        s.cfg = replace(s.cfg, freeze=count)
    if decision["agreement"] is None:
        why = "the backbone has no BatchNorm"
    else:
        why = (f"the head keeps {decision['agreement']:.0%} of its predictions on {decision['images']} training "
               f"images under their own batch statistics ({'at least' if decision['bn'] == 'train' else 'below'} "
               f"{decision['threshold']:.0%})")
        if decision.get("far"):
            why += f"; under {decision['far_threshold']:.0%}: a domain far from the backbone's, a larger step"
    decision["why"] = (f"--bn auto: {decision['bn']} ({s.cfg.optimizer} lr {s.cfg.lr:g}, {s.cfg.epochs} epochs): "
                       f"{why}")
    _say(s, decision["why"])
    if freeze_line is not None:
        _say(s, freeze_line)
    if rt.is_main:
        record = folder.read_config()
        folder.write_config({**record, "config": s.cfg.to_json(), "bn_decision": decision,
                             **({"freeze_decision": freeze_line} if freeze_line is not None else {})})


def _say_weight_average(s: Setup, folder: RunFolder, stage: Stage) -> None:
    """The EMA's decay follows the data's size: said in one line and kept in config.json."""
    ema = stage.ema
    _say(s, f"--ema-epochs {ema.epochs:g}: val and the saved model use the {ema.describe()}")
    if s.rt.is_main:
        record = folder.read_config()
        folder.write_config({**record, "ema": {"epochs": ema.epochs, "steps_per_epoch": ema.steps_per_epoch,
                                               "steps": ema.steps, "decay": ema.decay}})


def _refits(s: Setup, stage: Stage) -> bool:
    return stage.name == "full" and bool(s.cfg.refit_head)


def _epoch_row(s: Setup, folder: RunFolder, loop: LoopState, stage: Stage, epoch: int, offset: int, stop,
               class_weights: torch.Tensor | None) -> tuple[dict, EvalOutput, nn.Module | None]:
    """One epoch of `stage`: train, then evaluate; its metrics row, the val pass's outputs, and the
    weights evaluated when they are not the model's (the weight average, or a copy with a refitted head)."""
    cfg, rt = s.cfg, s.rt
    epoch_start = time.perf_counter()
    reduce = (lambda v: v) if stage.on_features else rt.all_reduce_sum

    def on_step(loss: torch.Tensor) -> None:
        loop.steps += 1
        if observe_steps:  # .item() waits for the device: only paid when someone watches steps
            lr = max(group["lr"] for group in stage.optimizer.param_groups)
            s.observers.call("on_step_end", StepEnd(epoch, loop.steps, stage.name, float(loss.item()), lr))

    observe_steps = s.observers.wants("on_step_end")
    try:
        train_stats: EpochStats = train_one_epoch(
            stage.trainable, s.progress(stage.train_batches, len(stage.train_batches), f"epoch {epoch} train"),
            stage.optimizer, stage.prepare, stage.scheduler, stage.frozen, class_weights=class_weights,
            label_smoothing=cfg.label_smoothing, should_stop=stop.requested, accumulate=cfg.accumulate,
            device=rt.device, mix=stage.mix, autocast=rt.autocast, scaler=stage.scaler,
            no_sync=getattr(stage.trainable, "no_sync", None), reduce=reduce, on_step=on_step,
            multi_label=s.multi_label,
            after_step=(lambda: stage.ema.update(stage.module)) if stage.ema is not None else None)
    except NonFiniteLoss as exc:
        raise Diverged(
            f"training stopped: the loss became {exc.value} at epoch {epoch}, step {exc.step}; likely a learning "
            f"rate too high (--lr {stage.lr}) or bad input; the last good state is {folder.last_checkpoint_file} "
            f"(epoch {loop.saved[0]}).") from None
    if not train_stats.completed:
        raise Interrupted(f"interrupted in epoch {epoch}; the state after epoch {loop.saved[0]} is saved in "
                          f"{folder.last_checkpoint_file}; continue with: visiontune train --resume {folder}")
    release_freed_memory()
    rt.broadcast_buffers(s.model)
    if stage.ema is not None:  # averaged from each rank's own BatchNorm statistics: rank 0's for all
        rt.broadcast_buffers(stage.ema.module)
    evaluated = stage.ema.module if stage.ema is not None else None
    if _refits(s, stage):
        s.exclude_unread()  # before the training images' features, so that their rows match the labels
        # A copy: training goes on with its own head (and the average with its own).
        evaluated = copy.deepcopy(stage.evaluated)
        val_stats = refit_head(s, evaluated, epoch, stage.prefix)
    elif stage.prefix:
        val_stats = evaluate_by_features(s, stage.evaluated, epoch, stage.prefix)
    else:
        # In eval mode BatchNorm is a fixed affine map: a folded copy evaluates about 1.5x faster.
        eval_model = stage.module if stage.on_features else fold_batchnorm(stage.evaluated, s.pre.size)
        val_stats = evaluate(eval_model, s.progress(stage.val_batches, len(stage.val_batches), f"epoch {epoch} val"),
                             stage.prepare, label_smoothing=cfg.label_smoothing, device=rt.device,
                             autocast=rt.autocast, reduce=reduce, multi_label=s.multi_label,
                             keep_outputs=not rt.distributed)  # a shard's outputs under torchrun: not kept
        del eval_model
    s.exclude_unread()  # images the loaders could not read this epoch: left out of the next ones
    return {"epoch": epoch, "train_loss": train_stats.loss, "train_acc": train_stats.accuracy,
            "val_loss": val_stats.loss, "val_acc": val_stats.accuracy,
            "lr": stage.lr_at_epoch_end(epoch - offset, cfg), "seconds": time.perf_counter() - epoch_start,
            "stage": stage.name}, val_stats, evaluated


def _record(s: Setup, folder: RunFolder, loop: LoopState, row: dict, val: EvalOutput,
            weights: nn.Module | None = None) -> None:
    """Log one epoch's row; keep (and save) the evaluated weights (`weights`, default the model's) when
    it is the best so far, and keep that epoch's val probabilities (the end-of-run figures need no
    second val pass)."""
    _say_excluded(s, folder)
    loop.metrics.append(row)
    if s.rt.is_main:
        folder.append_metrics(row)
    _say(s, _epoch_line(row, _total_epochs(s.cfg, loop.plan), s.cfg.head_epochs if row["stage"] == "head" else None))
    if is_better(row["val_acc"], row["val_loss"], loop.best[1:] if loop.best else None):
        loop.best = (row["epoch"], row["val_acc"], row["val_loss"])
        kept = weights if weights is not None else s.model
        loop.best_weights = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        loop.best_val = val
        if s.rt.is_main:
            folder.save_best(loop.best_weights, {**s.model_meta(), "best_epoch": row["epoch"],
                                                 "val_acc": row["val_acc"], "val_loss": row["val_loss"]})
    _report_duplicates(s, folder, loop)
    s.observers.call("on_epoch_end", EpochEnd(row["epoch"], row["stage"], frozen(row),
                                              len(s.train_items) / max(row["seconds"], 1e-9), loop.best[0],
                                              str(folder.path)))


def _finish(s: Setup, folder: RunFolder, loop: LoopState) -> Run:
    """The run's result is the best epoch's weights, not the last epoch's."""
    s.model.load_state_dict(loop.best_weights)
    s.model.eval()
    if s.multi_label:
        _store_thresholds(s, folder)
    best_epoch, best_acc, best_loss = loop.best
    _say(s, f"best epoch {best_epoch}: val acc {best_acc:.4f} (val loss {best_loss:.4f}); run folder {folder}")
    return Run(path=folder.path, config=s.cfg, classes=s.classes, metrics=loop.metrics, best_epoch=best_epoch,
               best_val_acc=best_acc, best_val_loss=best_loss, model=s.model,
               seconds=loop.seconds, decision=loop.plan.get("decision"))


def _store_thresholds(s: Setup, folder: RunFolder) -> None:
    """Multi-label: per-class decision thresholds with the best F1 on val, for the best weights, in
    model.json (predict, eval, export and serve use them; 0.5 is rarely right for a rare class)."""
    from .metrics import choose_thresholds
    from .pipeline import image_val_batches

    out = evaluate(fold_batchnorm(s.model, s.pre.size), image_val_batches(s), s.prepare, keep_outputs=True,
                   device=s.rt.device, autocast=s.rt.autocast, multi_label=True)
    parts = s.rt.all_gather((out.probabilities.numpy(), out.targets.numpy()))
    if s.rt.is_main:
        import numpy as np

        thresholds = choose_thresholds(np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts]))
        meta = folder.read_model_json()
        checkpoint.write_json(folder.model_json_file, {**meta, "thresholds": thresholds})


def _say(s: Setup, message: str) -> None:
    if not s.cfg.quiet and s.rt.is_main:
        print(message, flush=True)


def _stage_specs(cfg: TrainConfig) -> list[tuple[str, int]]:
    if cfg.mode == "fixed":
        return [("head", cfg.epochs)]
    if cfg.mode == "finetune":
        return [("full", cfg.epochs)]
    return [("head", cfg.head_epochs), ("full", cfg.epochs)]  # staged; auto decides the second count


def _total_epochs(cfg: TrainConfig, plan: dict) -> int | None:
    """None until --bn auto has chosen the fine-tuning recipe, which brings its epochs."""
    if cfg.epochs is None:
        return None
    if cfg.mode == "auto":
        return cfg.head_epochs + plan.get("full_epochs", cfg.epochs)
    return sum(epochs for _, epochs in _stage_specs(cfg))


def _start_run_folder(s: Setup) -> Path:
    """Rank 0 only: a new run folder with config.json, the splits, the excluded images and duplicates."""
    cfg = s.cfg
    folder = RunFolder(choose_run_dir(cfg))
    ensure_writable(folder.path)
    if s.excluded:
        folder.write_excluded(s.excluded)
    config = cfg.to_json()
    if s.size_decision is not None and s.size_decision.get("pending"):
        # Not yet measured: a run resumed before _choose_image_size measures again, as this one will.
        config.update(image_size=None, train_size=None)
    folder.write_config({
        "config": config,
        "data": {"root": str(s.splits.root.resolve()), "layout": s.splits.layout,
                 "split_folders": s.splits.split_folders, "classes": s.classes, "counts": s.splits.counts(),
                 "auto_split": s.splits.auto_split},
        "processes": s.rt.world_size,
        **({"image_size_decision": s.size_decision} if s.size_decision is not None else {}),
    })
    folder.write_splits(s.splits.samples, s.classes)
    return folder.path


class DuplicateCheck:
    """cross_split_duplicates on a thread of its own, started once the run's first image batch has been
    through the model: on a large set it stats every file and hashes those of shared sizes (9 s for 50 000 files
    on a cold disk), which would otherwise delay the first training step. Started earlier, its Python
    loop shared the GIL with the set-up's own pass over the files: 1 s more to the first batch at 50 000."""

    def __init__(self, splits):
        self.groups: list | None = None
        self.thread = threading.Thread(target=self._run, args=(splits,), name="visiontune-duplicates", daemon=True)

    def start(self) -> None:
        if self.thread.ident is None:
            self.thread.start()

    def _run(self, splits) -> None:
        try:
            self.groups = cross_split_duplicates(splits)
        except Exception:  # never let a leak check end a run; the images' own pass reports bad files
            self.groups = []

    def result(self, wait: bool) -> list | None:
        if wait:
            self.start()  # no image batch was ever drawn: the check runs now
            self.thread.join()
        return None if self.thread.is_alive() else self.groups


def _starting_after_first_batch(progress, start):
    """`progress`, which also calls start() once a pass over the images has had its first batch
    (when it asks for the second, or ends)."""
    def wrapped(iterable, total, desc):
        for number, item in enumerate(progress(iterable, total, desc)):
            if number == 1:
                start()
            yield item
        start()
    return wrapped


def _report_duplicates(s: Setup, folder: RunFolder, loop: LoopState, wait: bool = False) -> None:
    """Once the check is done (at an epoch's end, at the latest when the run finishes): warn once, and
    list in duplicates.csv, the files that are byte-identical across splits."""
    if loop.duplicate_check is None:
        return
    groups = loop.duplicate_check.result(wait)
    if groups is None:
        return
    loop.duplicate_check = None
    if not groups:
        return
    folder.write_duplicates(groups, s.classes)
    relabelled = sum(len({label for _, _, label in group}) > 1 for group in groups)
    print(f"warning: {len(groups)} image(s) appear byte-identical in more than one split"
          f"{f', {relabelled} of them under different labels' if relabelled else ''}: val/test accuracy counts "
          f"them as already seen; listed in {folder.duplicates_file} (remove one copy of each)", file=sys.stderr)


def _plan_auto(s: Setup, folder: RunFolder, loop: LoopState) -> dict:
    """After the head stage: how many fine-tuning epochs fit the rest of the budget, and are they worth it.

    One fine-tuning epoch is estimated from timed steps of a copy of the model on a synthetic batch
    (the cost of a step does not depend on the pixels; the copy and a forked RNG leave the run
    untouched) plus a timed val batch, through the whole model and from the frozen layers' kept output:
    the val (and refit) passes after an image's first one start there, so later epochs cost less than
    the first (trashnet: 14 s, then 11 s). Rank 0 decides, every rank follows.
    """
    cfg, rt = s.cfg, s.rt
    budget = parse_duration(cfg.budget)
    head_rows = [r for r in loop.metrics if r["stage"] == "head"]
    head_acc = max((r["val_acc"] for r in head_rows), default=0.0)
    steps_per_epoch = math.ceil(math.ceil(len(s.train_items) / rt.world_size) / cfg.batch_size / cfg.accumulate)
    # --refit-head evaluates by the features of the training images as well as the val images'.
    evaluated_items = len(s.val_items) + (len(s.train_items) if cfg.refit_head else 0)
    val_batches = math.ceil(math.ceil(evaluated_items / rt.world_size) / cfg.eval_batch_size)
    times = _time_fine_tune_step(s)
    first_s, later_s = (times.epoch_seconds(steps_per_epoch * cfg.accumulate, val_batches, resumed)
                        for resumed in (times.resumed_first, times.resumed_later))
    elapsed = loop.seconds  # over every process of the run: a resumed run keeps its budget
    left = budget - elapsed - 3.0  # loading the best weights and writing the last files
    fits = epochs_that_fit(left, first_s, later_s, cfg.epochs)
    each = f"of about {first_s:.0f}s" if round(first_s) == round(later_s) else \
        f"(about {first_s:.0f}s for the first, {later_s:.0f}s for each after it: their val passes start from " \
        f"the frozen layers' kept output)"
    if head_acc >= 1.0:
        epochs, why = 0, (f"kept the frozen-backbone head: it already gets every val image right "
                          f"(val acc {head_acc:.4f} after {elapsed:.0f}s)")
    elif fits == 0:
        epochs, why = 0, (f"kept the frozen-backbone head (val acc {head_acc:.4f} after {elapsed:.0f}s): one "
                          f"fine-tuning epoch needs about {first_s:.0f}s and {max(left, 0):.0f}s of the "
                          f"{budget:.0f}s budget are left")
    else:
        epochs, why = fits, (f"fine-tuning for {fits} epoch(s) {each}: the "
                             f"frozen-backbone head reached val acc {head_acc:.4f} in {elapsed:.0f}s and "
                             f"{left:.0f}s of the {budget:.0f}s budget are left")
    decision = rt.broadcast({"full_epochs": epochs, "decision": "auto: " + why, "head_val_acc": head_acc,
                             "seconds_used": round(elapsed, 2), "budget_seconds": budget,
                             "estimated_epoch_seconds": round(first_s, 2),
                             "estimated_later_epoch_seconds": round(later_s, 2), "epochs_that_fit": fits})
    _say(s, decision["decision"])
    if rt.is_main:
        folder.write_auto_decision(decision)
    return decision


def epochs_that_fit(left: float, first_s: float, later_s: float, most: int) -> int:
    """How many epochs, the first taking `first_s` and each after it `later_s`, fit in `left` seconds."""
    if left < first_s:
        return 0
    return min(most, 1 + int((left - first_s) // later_s))


@dataclass(frozen=True)
class FineTuneTimes:
    """Measured seconds of the full stage's parts, and how much of its evaluation can start from kept output."""

    step_s: float  # one training step
    val_batch_s: float  # one eval batch through the whole (folded) model
    fold_s: float  # folding BatchNorm for evaluation
    resumed_batch_s: float | None = None  # one eval batch from the frozen layers' kept output (None: none kept)
    resumed_first: float = 0.0  # share of the evaluated images whose output is kept before the first epoch
    resumed_later: float = 0.0  # the share once every evaluated image has been through once (the budget's cap)

    def epoch_seconds(self, steps: int, val_batches: int, resumed_share: float) -> float:
        # 10% and half a second for what is not timed: loading batches, metrics, the checkpoint.
        resumed_s = self.val_batch_s if self.resumed_batch_s is None else self.resumed_batch_s
        val_s = val_batches * (resumed_share * resumed_s + (1 - resumed_share) * self.val_batch_s)
        return 1.1 * (steps * self.step_s + val_s + self.fold_s) + 0.5


def _time_fine_tune_step(s: Setup) -> FineTuneTimes:
    """Seconds of one training step and one val batch of the full stage (whole and from kept output), of
    folding BatchNorm, and the share of evaluated images the stage's kept output covers."""
    cfg, rt = s.cfg, s.rt
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        # The fine-tuning stage exactly as training builds it (freezing, optimizer groups), on a copy.
        # Without the weight average: these steps are timed, never evaluated, and its copy would be waste.
        stage = full_stage(replace(s, model=copy.deepcopy(s.model), cfg=replace(cfg, ema_epochs=0.0)), cfg.epochs)
        model, optimizer = stage.module, stage.optimizer
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(cfg.batch_size, 3, cfg.train_size, cfg.train_size, generator=generator).to(rt.device)
        if cfg.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = torch.randint(len(s.classes), (cfg.batch_size,), generator=generator).to(rt.device)
        times = []
        model.train()
        for _ in range(4):  # the first step pays one-off costs (kernel selection, allocations)
            t = time.perf_counter()
            train_one_epoch(model, [(inputs, targets)], optimizer, device=rt.device, autocast=rt.autocast)
            times.append(time.perf_counter() - t)
        # The median of three: one step slowed by something else on the machine would otherwise set the
        # estimate (sign_digits once timed 66 s epochs that took 36 s, and fine-tuned 3 epochs instead of 5).
        step_s = statistics.median(times[1:])
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
        resumed = _time_resumed_eval(s, stage.prefix, folded, val_inputs)
        del model, folded, optimizer, stage
    release_freed_memory()
    return FineTuneTimes(step_s, val_batch_s, fold_s, *resumed)


def _time_resumed_eval(s: Setup, prefix: FrozenPrefix | None, folded: nn.Module, inputs: torch.Tensor) -> tuple:
    """(seconds of an eval batch from the frozen layers' output, share of the evaluated images already kept,
    share kept once each has been through); () when the stage keeps none."""
    split = prefix.split(folded, s.pre.size, s.cfg.channels_last) if prefix else None
    if split is None:
        return ()
    with torch.inference_mode(), s.rt.autocast():  # as extract_features runs it
        _, kept = split.features_keeping(inputs)
        split.features_from(kept)  # warm-up
        t = time.perf_counter()
        split.features_from(kept)
        resumed_batch_s = time.perf_counter() - t
    items = s.val_items + (s.train_items if s.cfg.refit_head else [])
    identities = {file_identity(path) for path, _ in items}
    if not identities:
        return ()
    already = sum(prefix.has(identity) for identity in identities)
    room = max(0, prefix.budget - prefix.used) // max(1, kept[0].numel() * kept.element_size())
    return resumed_batch_s, already / len(identities), min(len(identities), already + room) / len(identities)


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

        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _epoch_line(row: dict, total: int | None, stage_epochs: int | None = None) -> str:
    """Until the total is known (--bn auto decides the fine-tuning epochs after the head stage), a head
    row says how far into its own stage it is: "epoch 3 head (3/25)"."""
    of_total = f"/{total}" if total is not None else ""
    of_stage = f" ({row['epoch']}/{stage_epochs})" if total is None and stage_epochs else ""
    stage = row["stage"] + of_stage
    return (f"epoch {row['epoch']}{of_total} {stage:5} train loss {row['train_loss']:.4f} acc "
            f"{row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
            f"lr {row['lr']:.2e}  {row['seconds']:.1f}s")


def probe_row(s: Setup) -> tuple[dict, EvalOutput]:
    """Fit the linear probe on cached features and evaluate it on the val features: metrics row 0.

    On cached features the probe model (frozen backbone, BatchNorm folded, the new head) is evaluated
    exactly as an image epoch would evaluate it, for the cost of a matrix product.
    """
    start = time.perf_counter()
    cfg, classifier = s.cfg, s.model.get_classifier()
    train_stats, val_stats = fit_probe(classifier, s.features_of(s.train_items, 1), s.train_labels, cfg, s.generator,
                                       s.features_of(s.val_items, 1)[0], s.val_labels, s.multi_label)
    return {"epoch": 0, "train_loss": train_stats.loss, "train_acc": train_stats.accuracy,
            "val_loss": val_stats.loss, "val_acc": val_stats.accuracy, "lr": 0.0,
            "seconds": time.perf_counter() - start, "stage": "probe"}, val_stats
