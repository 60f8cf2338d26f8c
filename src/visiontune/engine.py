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

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

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
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def per_sample_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of each sample (weighted by its class weight when given)."""
    return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing, reduction="none")


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
    it into the weights (one scalar check per batch: free on a CPU). After each
    step `should_stop()` is asked whether to end the epoch early (Ctrl-C).
    """
    start = time.perf_counter()
    set_train_mode(model, frozen)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    completed = True
    pending = 0  # samples whose gradients are summed in .grad and not yet stepped
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step() -> None:
        nonlocal pending
        if accumulate > 1 and reduction == "mean":
            for p in params:
                if p.grad is not None:
                    p.grad.div_(pending)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        # Cleared right after the step, i.e. before the next backward: backward adds into .grad.
        optimizer.zero_grad(set_to_none=True)
        pending = 0

    optimizer.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(True):
        for index, (images, targets) in enumerate(batches, start=1):
            inputs, targets = prepare(images.to(device)), targets.to(device)
            logits = model(inputs)
            losses = per_sample_loss(logits, targets, class_weights, label_smoothing)
            if accumulate > 1 or reduction == "sum":
                objective = losses.sum()  # divided by the group's sample count in step()
            else:
                objective = losses.mean()
            if not torch.isfinite(objective):
                raise NonFiniteLoss(index, float(objective.detach()))
            objective.backward()
            pending += targets.shape[0]
            loss_sum += losses.detach().sum()
            correct += (logits.detach().argmax(dim=1) == targets).sum()
            n += targets.shape[0]
            if index % accumulate == 0:
                step()
                if should_stop():
                    completed = False
                    break
        if pending and completed:
            step()  # the short last group of an epoch
    # One synchronisation per epoch: the only place running sums become floats.
    return EpochStats(loss=loss_sum.item() / max(n, 1), accuracy=correct.item() / max(n, 1), n=n,
                      seconds=time.perf_counter() - start, completed=completed)


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    keep_logits: bool = False,
    device: torch.device | str = "cpu",
) -> EvalOutput:
    """Loss and accuracy over `batches` with no graph and no change to any parameter or buffer."""
    start = time.perf_counter()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    all_logits, all_targets = [], []
    with torch.inference_mode():
        for images, targets in batches:
            inputs, targets = prepare(images.to(device)), targets.to(device)
            logits = model(inputs)
            loss_sum += per_sample_loss(logits, targets, class_weights, label_smoothing).sum()
            correct += (logits.argmax(dim=1) == targets).sum()
            n += targets.shape[0]
            if keep_logits:
                all_logits.append(logits.float().cpu())
                all_targets.append(targets.cpu())
    return EvalOutput(
        loss=loss_sum.item() / max(n, 1),
        accuracy=correct.item() / max(n, 1),
        n=n,
        seconds=time.perf_counter() - start,
        logits=torch.cat(all_logits) if keep_logits else None,
        targets=torch.cat(all_targets) if keep_logits else None,
    )


def is_better(val_acc: float, val_loss: float, best: tuple[float, float] | None) -> bool:
    """Best epoch = highest val accuracy; ties go to the lower val loss."""
    if best is None:
        return True
    best_acc, best_loss = best
    return val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss)
