"""The explicit training loop: `train_one_epoch` and `evaluate`.

Mechanics (docs/mechanics.md explains each, with the test that proves it):
- gradients are cleared once per optimizer step, before backward, with
  `zero_grad(set_to_none=True)`: backward *adds* into `.grad`;
- training runs under `torch.set_grad_enabled(True)` with `model.train()`, while
  frozen parts stay in eval mode so their BatchNorm statistics do not move;
  evaluation runs under `model.eval()` and `torch.inference_mode()`;
- the epoch loss is the sum of per-sample losses divided by the number of
  samples, accumulated as tensors (no per-step `.item()` sync). This is exact
  for a partial last batch, class weights and label smoothing, where the
  tutorial's `loss.item() * inputs.size(0)` is not exact with class weights
  (weighted "mean" divides by the sum of weights, not by the batch size);
- the scheduler is stepped once per optimizer step, right after it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    n: int
    seconds: float
    completed: bool = True  # False when `should_stop` ended the epoch early


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite at optimizer step `step` (1-based) of the epoch."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss {value} at step {step}")
        self.step, self.value = step, value


@dataclass
class EvalOutput(EpochStats):
    probabilities: torch.Tensor | None = None
    """With keep_outputs: softmax probabilities per sample (averaged over the flips with tta), on the CPU."""
    losses: torch.Tensor | None = None
    """With keep_outputs: each sample's loss (float64), in batch order."""
    targets: torch.Tensor | None = None


def per_sample_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    multi_label: bool = False,
) -> torch.Tensor:
    """Cross-entropy of each sample (weighted by its class weight when given).

    `targets` are class indices, or per-class probabilities (mixup/cutmix) of shape [B, classes].
    multi_label: `targets` are multi-hot [B, classes] and each sample's loss is the mean over classes of
    the binary cross-entropy of one sigmoid per class (smoothing pulls targets towards 0.5).
    """
    if multi_label:
        soft = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits, soft, reduction="none").mean(dim=1)
    return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing, reduction="none")


def label_decisions_correct(logits_or_probs: torch.Tensor, targets: torch.Tensor, probabilities: bool) -> torch.Tensor:
    """Multi-label: per sample, the share of its classes decided right at 0.5 (fastai's accuracy_multi)."""
    decided = logits_or_probs > (0.5 if probabilities else 0.0)
    return (decided == (targets > 0.5)).double().mean(dim=1)


def set_train_mode(model: nn.Module, frozen: Sequence[nn.Module] = ()) -> None:
    """`model.train()`, except frozen parts, which stay in eval so BatchNorm keeps its running statistics."""
    model.train()
    for module in frozen:
        module.eval()


Batch = tuple[torch.Tensor, torch.Tensor]


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    frozen: Sequence[nn.Module] = (),
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    device: torch.device | str = "cpu",
    should_stop: Callable[[], bool] = lambda: False,
    accumulate: int = 1,
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    no_sync: Callable[[], ContextManager] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
    on_step: Callable[[torch.Tensor], None] | None = None,
    multi_label: bool = False,
    after_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass over `batches`; one optimizer step per `accumulate` batches.

    `reduction="mean"` optimises the mean of per-sample losses over the
    samples of one optimizer step; `"sum"` optimises their sum (equivalent to
    "mean" with the learning rate multiplied by the batch size, for SGD
    without weight decay). With `accumulate=K`, the gradients of K batches are
    summed and divided by their total sample count before the step, so K
    batches of B make exactly the step of one batch of K*B (for a model
    without BatchNorm, whose statistics see B samples at a time), also for a
    short last group.
    A non-finite loss raises `NonFiniteLoss` before the step that would spread
    it into the weights (one scalar check per batch: free on a CPU), on every
    rank at once when `reduce` sums over ranks. After each
    step `should_stop()` is asked whether to end the epoch early (Ctrl-C).
    `on_step(loss)`, when given, sees each optimizer step's mean per-sample loss
    before the step is taken (lr-find records its curve with it; fastai's
    `lr_find` is likewise `fit` plus a per-step hook). `after_step()` runs after
    each optimizer step (a weight EMA follows the weights with it).
    `multi_label`: multi-hot targets, per-class sigmoid loss, accuracy = share of label decisions right.
    """
    start = time.perf_counter()
    set_train_mode(model, frozen)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64 if multi_label else torch.int64, device=device)
    n = 0
    completed = True
    pending = 0  # samples whose gradients are summed in .grad and not yet stepped
    params = [p for group in optimizer.param_groups for p in group["params"]]

    step_loss = torch.zeros((), dtype=torch.float64, device=device)  # for on_step only

    def step() -> None:
        nonlocal pending, step_loss
        if on_step is not None:  # a hook that reads (lr-find's loss curve); it cannot change the step
            on_step(step_loss / pending)
            step_loss = torch.zeros_like(step_loss)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if accumulate > 1 and reduction == "mean":
            for p in params:
                if p.grad is not None:
                    p.grad.div_(pending)
        if scaler is not None:
            scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        # Cleared right after the step, i.e. before the next backward: backward adds into .grad.
        optimizer.zero_grad(set_to_none=True)
        pending = 0

    optimizer.zero_grad(set_to_none=True)
    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.set_grad_enabled(True):
        for index, (images, targets) in enumerate(batches, start=1):
            inputs, targets = prepare(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
            labels = targets
            if mix is not None and not multi_label:
                inputs, targets = mix(inputs, targets)
                labels = targets.argmax(dim=1)
            # Gradients are all-reduced only on the batch that ends an optimizer step.
            ends_step = index % accumulate == 0 or index == total
            sync = contextlib.nullcontext() if no_sync is None or ends_step else no_sync()
            with sync:
                with autocast():
                    logits = model(inputs)
                losses = per_sample_loss(logits.float(), targets, class_weights, label_smoothing, multi_label)
                if accumulate > 1 or reduction == "sum":
                    objective = losses.sum()  # divided by the group's sample count in step()
                else:
                    objective = losses.mean()
                # Every rank asks the same question at the same step (`reduce` sums over ranks), so a
                # NaN on one rank stops all of them here instead of leaving the others waiting in the
                # next gradient exchange.
                non_finite = reduce((~torch.isfinite(objective.detach())).double().reshape(1))
                if non_finite.item() > 0:
                    raise NonFiniteLoss(index, float(objective.detach()))
                (scaler.scale(objective) if scaler is not None else objective).backward()
            pending += labels.shape[0]
            loss_sum += losses.detach().sum()
            if on_step is not None:
                step_loss += losses.detach().sum()
            if multi_label:
                correct += label_decisions_correct(logits.detach().float(), labels, probabilities=False).sum()
            else:
                correct += (logits.detach().argmax(dim=1) == labels).sum()
            n += labels.shape[0]
            if index % accumulate == 0:
                step()
                if should_stop():
                    completed = False
                    break
        if pending and completed:
            step()  # the short last group of an epoch
    # One synchronisation per epoch: the only place running sums become floats.
    loss_total, correct_total, n_total = reduce(
        torch.stack([loss_sum, correct.double(), torch.tensor(float(n), dtype=torch.float64, device=device)])).tolist()
    return EpochStats(loss=loss_total / max(n_total, 1), accuracy=correct_total / max(n_total, 1), n=int(n_total),
                      seconds=time.perf_counter() - start, completed=completed)


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    keep_outputs: bool = False,
    device: torch.device | str = "cpu",
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
    tta: bool = False,
    multi_label: bool = False,
) -> EvalOutput:
    """Loss and accuracy over `batches` with no graph and no change to any parameter or buffer.

    `tta`: each image's probabilities are the mean of its own and its mirror image's (horizontal
    flip), and its loss is -log of that mean at the true class (class weights and smoothing do not
    apply to it). Distributed: each rank passes its own shard of the images (every sample on exactly
    one rank) and `reduce` adds [loss sum, correct, n] over ranks before the one division.
    `multi_label`: sigmoid probabilities, the mean per-class binary cross-entropy, and accuracy as the
    share of label decisions right at 0.5 (with tta: of the mean of the two probabilities).
    """
    start = time.perf_counter()
    model.eval()
    squash = torch.sigmoid if multi_label else (lambda x: torch.softmax(x, 1))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64 if multi_label else torch.int64, device=device)
    n = 0
    kept: dict[str, list[torch.Tensor]] = {"probabilities": [], "losses": [], "targets": []}
    with torch.inference_mode():
        for images, targets in batches:
            inputs, targets = prepare(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
            with autocast():
                logits = model(inputs)
            logits = logits.float()
            if tta:
                with autocast():
                    mirrored = model(torch.flip(inputs, dims=[3]))
                probabilities = (squash(logits) + squash(mirrored.float())) / 2
                if multi_label:
                    losses = F.binary_cross_entropy(probabilities, targets, reduction="none").mean(dim=1)
                else:
                    losses = -torch.log(probabilities[torch.arange(len(targets), device=device), targets])
            else:
                probabilities = None
                losses = per_sample_loss(logits, targets, class_weights, label_smoothing, multi_label)
            loss_sum += losses.sum()
            if multi_label:
                correct += label_decisions_correct(probabilities if tta else logits, targets, probabilities=tta).sum()
            else:
                predictions = (probabilities if tta else logits).argmax(dim=1)
                correct += (predictions == targets).sum()
            n += targets.shape[0]
            if keep_outputs:
                kept["probabilities"].append((probabilities if tta else squash(logits)).cpu())
                kept["losses"].append(losses.double().cpu())
                kept["targets"].append(targets.cpu())
    loss_total, correct_total, n_total = reduce(
        torch.stack([loss_sum, correct.double(), torch.tensor(float(n), dtype=torch.float64, device=device)])).tolist()
    outputs = {k: (torch.cat(v) if v else None) for k, v in kept.items()} if keep_outputs else {}
    return EvalOutput(loss=loss_total / max(n_total, 1), accuracy=correct_total / max(n_total, 1), n=int(n_total),
                      seconds=time.perf_counter() - start, **outputs)


def is_better(val_acc: float, val_loss: float, best: tuple[float, float] | None) -> bool:
    """Best epoch = highest val accuracy; ties go to the lower val loss."""
    if best is None:
        return True
    best_acc, best_loss = best
    return val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss)
