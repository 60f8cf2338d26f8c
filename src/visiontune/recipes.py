"""Recipe pieces: optimizer parameter groups, learning-rate schedules, class weights, samplers, and the
linear probe that starts a fine-tune run.

Construction functions that can each be tested without a run.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
from torch import nn

from .config import MODE_DEFAULTS, TrainConfig
from .engine import EpochStats, EvalOutput, evaluate, is_better, train_one_epoch
from .features import FeatureBatches


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
    if model is not None and cfg.head_lr_mult != 1.0:
        groups = _head_apart(groups, model, cfg.lr, cfg.head_lr_mult)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _head_apart(groups: list[dict], model: nn.Module, lr: float, mult: float) -> list[dict]:
    """Each group split in two: the classifier's parameters get the group's lr times `mult`."""
    head = {id(p) for p in model.get_classifier().parameters()}
    split = []
    for group in groups:
        for is_head in (False, True):
            params = [p for p in group["params"] if (id(p) in head) == is_head]
            if params:
                group_lr = group.get("lr", lr)
                split.append({**group, "params": params, "lr": group_lr * mult if is_head else group_lr})
    return split


def _groups_below_head(model: nn.Module) -> list[list[str]]:
    """Parameter names of the model's layer groups in order (timm's coarse group_matcher: the stem, then
    each stage), without the groups that hold the classifier."""
    from timm.models import group_parameters

    head = {id(p) for p in model.get_classifier().parameters()}
    named = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [names for _, names in sorted(groups.items()) if not any(id(named[n]) in head for n in names)]


def leading_group_parameters(model: nn.Module, count: int) -> list[nn.Parameter]:
    """The parameters of the first `count` of the model's layer groups below its classifier, for --freeze."""
    from .errors import UsageError

    name = type(model).__name__
    if not hasattr(model, "group_matcher"):
        raise UsageError(f"--freeze {count}: {name} does not say how its layers group into stages; "
                         "use --freeze 0.")
    below_head = _groups_below_head(model)
    if count > len(below_head) - 1:
        raise UsageError(f"--freeze {count}: {name} has {len(below_head)} layer groups below its classifier "
                         f"and at least the last must train; use at most {len(below_head) - 1}.")
    named = dict(model.named_parameters())
    return [named[n] for names in below_head[:count] for n in names]


def high_resolution_groups(model: nn.Module, finest_reduction: int) -> tuple[int, str | None]:
    """How many of the model's layer groups (leading_group_parameters' count) run at 1/`finest_reduction`
    of the input resolution or finer, and the last module among them: --freeze's default, at the
    reduction the BatchNorm policy sets (pipeline.default_freeze).
    These layers hold the most generic features (edges, colours) and the largest activations, whose
    backward pass is the dearest per parameter. A model without timm's feature_info and group_matcher
    freezes nothing."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "group_matcher") or not info:
        return 0, None
    fine = [entry["module"] for entry in info if entry["reduction"] <= finest_reduction]
    if not fine:
        return 0, None
    last = fine[-1]
    for position, names in enumerate(_groups_below_head(model)):
        if any(n.startswith(last + ".") for n in names):
            return position + 1, last
    return 0, None


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


class MixBatch:
    """Mixup and CutMix on a normalised batch: each batch is paired with a shuffled copy of itself.

    mixup: x = lam * x + (1 - lam) * x[perm]; cutmix: a random box of x[perm] (area 1 - lam) pasted
    into x, with lam recomputed from the box actually pasted after clipping at the border. Targets
    become lam * onehot(y) + (1 - lam) * onehot(y[perm]), so the loss is the exact mix of the two
    labels' cross-entropies. With both on, each batch uses one of them with probability 1/2 (timm's
    switch). lam ~ Beta(alpha, alpha). Draws come from the global torch RNG, which checkpoints save,
    so a resumed run mixes exactly as an uninterrupted one.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or bool(torch.rand(()) < 0.5))
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(inputs.shape[0]).to(inputs.device)
        if use_cutmix:
            inputs, lam = self.paste_box(inputs, perm, lam)
        else:
            inputs = inputs.mul(lam).add_(inputs[perm], alpha=1 - lam)
        onehot = torch.nn.functional.one_hot(targets, self.num_classes).to(inputs.dtype if inputs.is_floating_point()
                                                                            else torch.float32)
        return inputs, onehot.mul(lam).add_(onehot[perm], alpha=1 - lam)

    @staticmethod
    def paste_box(inputs: torch.Tensor, perm: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
        height, width = inputs.shape[-2:]
        side = math.sqrt(1 - lam)
        box_h, box_w = int(height * side), int(width * side)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
        left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
        mixed = inputs.clone()
        mixed[..., top:bottom, left:right] = inputs[perm][..., top:bottom, left:right]
        return mixed, 1 - (bottom - top) * (right - left) / (height * width)


def fit_probe(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
              generator: torch.Generator, val_features: torch.Tensor, val_labels: torch.Tensor,
              multi_label: bool = False) -> tuple[EpochStats, EvalOutput]:
    """Linear probe: fit the new head on frozen-backbone features before fine-tuning (LP-FT).

    The probe is fixed mode's head stage exactly (its optimizer, lr, epochs, batch order and choice
    of the best epoch on val), so epoch 0 of a fine-tune run is the model `--mode fixed` would give
    with the same seed, and fine-tuning is measured against it. At the fine-tuning lr (0.003, 10
    epochs) the head was underfitted (eurosat10: 0.895 vs fixed mode's 0.930, docs/recipes.md).
    It costs one forward pass over the images (cached across runs) and about a second of head
    training. Every rank fits the same head from the same features and generator.
    Returns the chosen epoch's train and val statistics; the classifier is left at that epoch.
    """
    head = MODE_DEFAULTS["fixed"]
    device = next(classifier.parameters()).device
    batches = FeatureBatches(features, labels, cfg.batch_size, generator)
    val_batches = list(zip(val_features.split(cfg.eval_batch_size), val_labels.split(cfg.eval_batch_size)))
    optimizer = make_optimizer(replace(cfg, lr=head["lr"], optimizer=head["optimizer"], lr_decay=None),
                               list(classifier.named_parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(head["schedule"], step, len(batches), head["epochs"], 0.0))
    best = None
    for _ in range(head["epochs"]):
        train_stats = train_one_epoch(classifier, batches, optimizer, scheduler=scheduler,
                                      label_smoothing=cfg.label_smoothing, device=device, multi_label=multi_label)
        val_stats = evaluate(classifier, val_batches, label_smoothing=cfg.label_smoothing, device=device,
                             multi_label=multi_label, keep_outputs=True)
        if best is None or is_better(val_stats.accuracy, val_stats.loss, (best[1].accuracy, best[1].loss)):
            best = (train_stats, val_stats, {k: v.detach().clone() for k, v in classifier.state_dict().items()})
    classifier.load_state_dict(best[2])
    return best[0], best[1]


# --bn auto. Measured on 128 training images per set, seeds 0-2 (docs/recipes.md): the probe kept
# 0.82-0.91 of its predictions under batch statistics on hymenoptera, where train-mode statistics with
# SGD 0.003 made the first fine-tuning epoch add to the probe (mean best 0.9586 against 0.9499 frozen);
# 0.63-0.66 on trashnet, 0.36 on eurosat10 and 0.32 on sign_digits, where they took the first epoch
# 4-27 points below it and frozen statistics did better on every set.
BN_TRAIN_MIN_AGREEMENT = 0.75
FAR_DOMAIN_MAX_AGREEMENT = 0.5
"""Below this agreement the domain is far from the backbone's (eurosat10 0.34-0.37, sign_digits 0.32-0.41;
trashnet 0.63-0.66): frozen statistics with a larger step (config.FAR_DOMAIN_RECIPE)."""
BN_CHECK_IMAGES = 128
"""Training images the check looks at (a seeded sample, at the eval transform): 3 s on a 2-core CPU."""


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """BatchNorm layers normalise with each batch's own statistics, as in train mode, while the running
    statistics stay untouched: in eval mode a BatchNorm without running buffers uses the batch's."""
    held = [(m, m.running_mean, m.running_var) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    for m, _, _ in held:
        m.running_mean = m.running_var = None
    try:
        yield len(held)
    finally:
        for m, mean, var in held:
            m.running_mean, m.running_var = mean, var


def choose_bn_policy(model: nn.Module, running_probabilities: torch.Tensor, batches, prepare, device, autocast,
                     multi_label: bool = False) -> dict:
    """--bn auto: "train" when the model's decisions on `batches` hardly change once BatchNorm uses the
    batches' own statistics (the data looks like what the backbone was trained on, so letting the
    statistics follow it costs the fitted head nothing), else "frozen".

    `running_probabilities`: the same images' probabilities with the running statistics (the probe's,
    from cached features). A backbone without BatchNorm gets "frozen": its recipe (AdamW 1e-4) is the
    one that suits models with LayerNorm.
    """
    with batch_statistics(model) as layers:
        if not layers:
            return {"bn": "frozen", "far": False, "agreement": None, "images": 0, "layers": 0}
        batched = evaluate(model, batches, prepare, keep_outputs=True, device=device, autocast=autocast,
                           multi_label=multi_label).probabilities.float().cpu()
    running = running_probabilities.float().cpu()
    if multi_label:
        agreement = ((batched > 0.5) == (running > 0.5)).float().mean().item()
    else:
        agreement = (batched.argmax(1) == running.argmax(1)).float().mean().item()
    return {"bn": "train" if agreement >= BN_TRAIN_MIN_AGREEMENT else "frozen",
            "far": agreement < FAR_DOMAIN_MAX_AGREEMENT, "agreement": round(agreement, 4), "images": len(running),
            "layers": layers, "threshold": BN_TRAIN_MIN_AGREEMENT, "far_threshold": FAR_DOMAIN_MAX_AGREEMENT}
