"""The first fine-tuning steps after the linear probe, step by step: where does accuracy go?

Builds one run's setup (data, model, probe) and then, for each variant, starts again from the probe
and takes N steps of the full stage that `visiontune train` would build, with the variant's settings
at a constant learning rate; prints the per-step training losses (engine's `on_step` hook) and val
accuracy after the steps. docs/recipes.md has its table for eurosat10.

usage: python bench/first_steps.py DATA VARIANT [VARIANT ...]
  VARIANT: comma-separated key=value, keys: bn (train|frozen), lr, opt (sgd|adamw), steps, warm,
           size (train crop), aug, decay (layer-wise lr decay), wd, headx (the classifier's lr as a
           multiple of lr), scale (the random resized crop's smallest area, default 0.25), eps (AdamW's),
           fold=1 (each BatchNorm multiplied into its conv in place and its statistics set to identity
           before the steps: the same function, but Adam's steps are then relative to the folded
           weights); opt=lamb is timm's Lamb (layer-wise trust ratio) on the same groups; sp=L pulls
           every weight back towards the probe's by lr * L of the distance after each step (L2-SP);
           e.g. bn=frozen,lr=1e-4,opt=adamw,steps=50
  SIZE=N in the environment sets the eval size (and so the probe's features); SEED=N the run's seed.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import replace

import torch

from visiontune import runtime
from visiontune.config import TrainConfig
from visiontune.engine import evaluate, train_one_epoch
from visiontune.folding import batchnorm_affine
from visiontune.pipeline import build_setup, full_stage, image_val_batches
from visiontune.recipes import fit_probe
from visiontune.training import probe_row


def main() -> int:
    data, variants = sys.argv[1], sys.argv[2:]
    cfg = TrainConfig(data=data, quiet=True, image_size=int(os.environ.get("SIZE", 0)) or None,
                      seed=int(os.environ.get("SEED", 0))).resolved()
    s = build_setup(cfg, runtime.start("cpu", "fp32", False))
    print("probe val acc", probe_row(s)[0]["val_acc"], flush=True)
    probe_state = copy.deepcopy(s.model.state_dict())
    # Every variant draws the same batches (and crops) as the run's first fine-tuning epoch would.
    generator_state, torch_state = s.generator.get_state(), torch.get_rng_state()
    for variant in variants:
        kv = dict(item.split("=") for item in variant.split(","))
        s.model.load_state_dict(probe_state)
        if kv.get("fold") == "1":
            fold_into_convs(s.model)
        s.generator.set_state(generator_state)
        torch.set_rng_state(torch_state)
        c = replace(s.cfg, bn=kv.get("bn", "train"), lr=float(kv.get("lr", 0.003)),
                    optimizer="adamw" if kv.get("opt") == "lamb" else kv.get("opt", "sgd"),
                    warmup_epochs=float(kv.get("warm", 0)), schedule="constant",
                    train_size=int(kv.get("size", s.cfg.train_size)), augment=kv.get("aug", "light"),
                    lr_decay=float(kv["decay"]) if "decay" in kv else None, weight_decay=float(kv.get("wd", 1e-4)),
                    head_lr_mult=float(kv.get("headx", 1)), crop_scale=float(kv.get("scale", 0.25)))
        stage = full_stage(replace(s, cfg=c), 3)
        scheduler = stage.scheduler
        if "eps" in kv:  # AdamW's epsilon: the same groups, a new optimizer, constant lr without a scheduler
            stage = replace(stage, optimizer=torch.optim.AdamW(stage.optimizer.param_groups, lr=c.lr,
                                                               eps=float(kv["eps"])))
            scheduler = None
        if kv.get("opt") == "lamb":  # timm's Lamb: each tensor's step scaled to its norm (trust ratio)
            from timm.optim import Lamb
            stage = replace(stage, optimizer=Lamb(stage.optimizer.param_groups, lr=c.lr))
            scheduler = None
        batches = iter(stage.train_batches)
        taken = [next(batches) for _ in range(int(kv.get("steps", 20)))]
        losses: list[float] = []
        start = time.time()
        pull = pull_towards(s.model, probe_state, c.lr * float(kv["sp"])) if "sp" in kv else None
        trained = train_one_epoch(stage.trainable, taken, stage.optimizer, prepare=stage.prepare,
                                  scheduler=scheduler, frozen=stage.frozen, after_step=pull,
                                  on_step=lambda loss: losses.append(round(float(loss), 3)))
        if kv.get("refit") in ("1", "new"):  # the head fitted again on the moved backbone's features
            refit_head(s, fresh=kv["refit"] == "new")
        val = evaluate(s.model, image_val_batches(s), prepare=s.prepare)
        print(f"{variant}: step losses {losses[:5]} ... {losses[-5:]}; train acc {trained.accuracy:.3f}; "
              f"val acc {val.accuracy:.4f} loss {val.loss:.3f}; {time.time() - start:.0f}s", flush=True)
    return 0


def refit_head(s, fresh: bool) -> None:
    """The probe's recipe again, on features of the backbone as it is now (train and val at the eval
    transform), from the head as it is (or from a new head's initial weights)."""
    classifier = s.model.get_classifier()
    if fresh:
        classifier.reset_parameters()
    fit_probe(classifier, s.features_of(s.train_items, 1, s.model), s.train_labels, s.cfg, s.generator,
              s.features_of(s.val_items, 1, s.model)[0], s.val_labels)


def pull_towards(model: torch.nn.Module, state: dict, rate: float):
    """L2-SP as a decoupled decay: after each step every weight moves `rate` of the way back to its
    value in `state` (the probe's), instead of towards zero."""
    pairs = [(p, state[name]) for name, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def step() -> None:
        for parameter, start in pairs:
            parameter.lerp_(start, rate)
    return step


@torch.no_grad()
def fold_into_convs(model: torch.nn.Module) -> None:
    """Each BatchNorm's affine map multiplied into the conv registered just before it, and the BatchNorm
    left as the identity (mean 0, variance 1 - eps, scale 1) plus the folded shift as its bias."""
    conv = None
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            conv = module
        elif (isinstance(module, torch.nn.BatchNorm2d) and conv is not None
              and conv.out_channels == module.num_features):
            scale, shift = batchnorm_affine(module)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            module.bias.copy_(shift)
            module.weight.fill_(1.0)
            module.running_mean.zero_()
            module.running_var.fill_(1.0 - module.eps)
            conv = None


if __name__ == "__main__":
    sys.exit(main())
