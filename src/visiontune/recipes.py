"""Recipe pieces: optimizer parameter groups, learning-rate schedules, class weights, samplers.

Pure construction functions, so that each can be tested without a run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying BatchNorm scales and biases only hurts."""
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, params: list[tuple[str, nn.Parameter]],
                   model: nn.Module | None = None) -> torch.optim.Optimizer:
    if cfg.lr_decay is not None and model is not None and hasattr(model, "group_matcher"):
        groups = layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.lr_decay)
    else:
        groups = param_groups(params, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """Discriminative learning rates: timm's block grouping of the model (stem, each stage, head);
    the classifier gets `lr`, each group below it one more factor of `decay`."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=decay)
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
        group["params"] = [p for p in group["params"] if p.requires_grad]
    return [g for g in groups if g["params"]]


def lr_multiplier(schedule: str, step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float) -> float:
    """Learning-rate factor for optimizer step `step` (0-based); stepped once per optimizer step."""
    epoch = step / steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":  # the tutorial's StepLR(step_size=7, gamma=0.1), per epoch
        return 0.1 ** math.floor(epoch / 7)
    if schedule == "onecycle":  # 30% linear rise from lr/25, then cosine down to lr/1e4
        total = epochs * steps_per_epoch
        rise = 0.3 * total
        if step < rise:
            return 1 / 25 + (1 - 1 / 25) * step / rise
        progress = min(1.0, (step - rise) / max(1.0, total - rise))
        return 1e-4 + (1 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1.0, epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """N / (classes * count): a balanced set gets weight 1 everywhere; rare classes weigh more."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    return (labels.numel() / (num_classes * counts.clamp(min=1))).float()


def make_sampler(cfg: TrainConfig, dataset, labels: torch.Tensor, generator: torch.Generator):
    if cfg.sampler == "balanced":
        per_class = 1.0 / torch.bincount(labels).double().clamp(min=1)
        return torch.utils.data.WeightedRandomSampler(per_class[labels], num_samples=len(labels), replacement=True,
                                                      generator=generator)
    return torch.utils.data.RandomSampler(dataset, generator=generator)
