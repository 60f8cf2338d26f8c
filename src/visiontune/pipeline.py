"""What a run is built from: data, run folder, model, preprocessing, and the stages that train it.

`training.run_training` reads as the loop; this module holds the construction
it needs, so that tools such as lr-find build exactly what a run would.

A run is one or two stages:
- fixed: "head" (backbone frozen, BatchNorm statistics too; new head only);
- finetune: "full" (every layer but --freeze's first groups), after a linear probe of the head (LP-FT);
- staged/auto: "head" for head_epochs, then "full" at a lower learning rate.
A "head" stage trains on backbone features computed once (cached); a "full"
stage on images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import backbones, checkpoint
from .callbacks import CallbackList
from .config import EMA_MIN_STEPS, FREEZE_FINEST_REDUCTION, MODE_DEFAULTS, TrainConfig
from .data import Splits, discover, label_tensor, train_loader, val_loader
from .engine import EvalOutput, evaluate
from .errors import DataError, UsageError
from .features import FeatureBatches, FeatureCache, extract_features
from .prefix import FrozenPrefix, frozen_module_names
from .progress import progress_bar
from .images import DecodeCache, decode_array, default_cache_dir, file_identity, screen_images
from .known.datasets import resolve_dataset
from .memory import reuse_freed_memory
from .preprocess import EvalTransform, Preprocessing, TrainTransform, normalize_batch
from .recipes import (MixBatch, fit_probe, high_resolution_groups, inverse_frequency_weights, leading_group_parameters,
                      lr_multiplier, make_optimizer, make_sampler)
from .runtime import Runtime, seed_everything, seed_rank


def resolve_data(cfg: TrainConfig) -> Splits:
    root = resolve_dataset(cfg.data) or Path(cfg.data)
    return discover(root, val_fraction=cfg.val_fraction, seed=cfg.seed)


def choose_run_dir(cfg: TrainConfig, kind: str | None = None) -> Path:
    """--out (new or empty, never overwritten), else runs/<data>-<kind: the mode>[-N]."""
    if cfg.out is not None:
        out = Path(cfg.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out}: already exists and is not empty; choose a new folder or delete it first.")
        return out
    stem = Path("runs") / f"{(Path(cfg.data).name or 'data').removesuffix('.csv')}-{kind or cfg.mode}"
    candidate, n = stem, 1
    while candidate.exists():
        n += 1
        candidate = stem.with_name(f"{stem.name}-{n}")
    return candidate


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {folder}: cannot be written ({exc.strerror}); choose a writable folder.") from None


def default_train_size(eval_size: int) -> int:
    return max(32, int(round(eval_size * 5 / 7 / 16)) * 16)


# Training files whose sizes are read (headers only) to decide the sizes for small images.
SIZE_SAMPLE = 64


def median_short_side(items: list[tuple[Path, int]], limit: int = SIZE_SAMPLE) -> tuple[int | None, int]:
    """The median short side of up to `limit` evenly spaced training files, and how many were read.
    PIL reads only the headers; files it cannot open are skipped (screening reports them later)."""
    from PIL import Image

    step = max(1, len(items) // limit)
    sides = []
    for path, _ in items[::step][:limit]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return (sorted(sides)[len(sides) // 2] if sides else None), len(sides)


def choose_image_sizes(cfg: TrainConfig, splits: Splits, eval_size: int,
                       measure: bool = False) -> tuple[int, int, dict | None]:
    """(eval size, training crop size, the decision for config.json or None when not made).

    Fine-tuning trains on crops smaller than the eval size (faster steps). For images smaller than those
    crops, a larger eval size only upscales them, and the gap between the two sizes is what fine-tuning's
    first epoch paid for: on sign_digits (100 px) and eurosat10 (64 px), evaluating at the 160 px the
    crops are taken at halved or removed the first-epoch drop and raised the best epoch (docs/recipes.md,
    seventh pass). So when the training images' median short side is below the crop size, both sizes are
    one size. Which one is then measured when `measure` (a fine-tune run that starts with the linear
    probe): the crop size or the backbone's own size, for val and crops alike, whichever the probe fits
    better on (`choose_measured_size`): upscaling helped sign_digits (100 px: 0.9992 at 224 px against
    0.9959 at 160) and cost eurosat10 (64 px: 0.9608 against 0.9667), and the probe ranked the two sizes as
    the runs did on both (docs/recipes.md, nineteenth pass). Until then the decision is "pending" and the
    crop size stands. Sizes given on the command line, fixed mode (no crops) and data that are not files
    keep the backbone's sizes."""
    train_size = default_train_size(eval_size)
    if cfg.image_size is not None or cfg.train_size is not None or cfg.mode == "fixed":
        return eval_size, cfg.train_size or (train_size if cfg.mode != "fixed" else eval_size), None
    median, read = median_short_side(splits.samples.get("train", []))
    if median is None:
        return eval_size, train_size, None
    small = median < train_size
    decision = {"median_short_side": median, "images_read": read, "small": small,
                "image_size": train_size if small else eval_size, "train_size": train_size,
                "why": (f"image size {train_size} px for val and training: the training images' median short side "
                        f"is {median} px, below the {train_size} px training crops, and a larger val size would "
                        f"only upscale them (--image-size sets it)") if small else None}
    if small and measure and eval_size != train_size:
        decision.update(pending=True, candidates=[train_size, eval_size], why=None)
    return decision["image_size"], train_size, decision


def choose_measured_size(scores: dict[int, tuple[float, float]]) -> int:
    """The size whose probe reached the higher val accuracy, then the lower val loss; on a tie the
    smaller size, whose steps are cheaper. `scores`: {size: (val acc, val loss)}."""
    return max(sorted(scores), key=lambda size: (scores[size][0], -scores[size][1]))


def size_decision_made(decision: dict, scores: dict[int, tuple[float, float]], chosen: int) -> dict:
    """The pending decision of choose_image_sizes, completed with the probe's measurements."""
    median, crops = decision["median_short_side"], decision["train_size"]
    measured = ", ".join(f"{scores[size][0]:.4f} at {size} px" for size in sorted(scores))
    return {**{k: v for k, v in decision.items() if k != "pending"},
            "image_size": chosen, "train_size": chosen,
            "probe": [{"size": size, "val_acc": scores[size][0], "val_loss": scores[size][1]}
                      for size in sorted(scores)],
            "why": (f"image size {chosen} px for val and training: the training images' median short side is "
                    f"{median} px, below the {crops} px training crops, and the linear probe's val acc was "
                    f"{measured} (--image-size sets it)")}


@dataclass
class Setup:
    """Everything both stages share."""

    cfg: TrainConfig
    rt: Runtime
    splits: Splits
    model: nn.Module
    backbone: backbones.Backbone
    weights_source: str
    head_from_init: bool
    """--init from a run with the same classes: the head is already trained (no linear probe)."""
    pre: Preprocessing
    decode: Callable
    cache_dir: Path
    generator: torch.Generator
    progress: Callable
    excluded: dict[str, str]
    size_decision: dict | None = None
    """How the image sizes followed the data (choose_image_sizes), for config.json; None when given.
    "pending" in it: training measures the size before the probe (training._choose_image_size)."""
    freeze_decision: str | None = None
    """The line that says which layers --freeze's default keeps as pretrained, when it keeps any."""
    observers: CallbackList = field(default_factory=CallbackList)
    """Callbacks and experiment loggers (rank 0); run_training sets them once the run folder exists."""
    on_exclude: Callable[[dict[str, str]], None] | None = None
    """Told of newly found unreadable images (run_training: excluded.csv, the splits, one warning)."""
    unsaid: dict[str, str] = field(default_factory=dict)
    """Unreadable images left out and not yet said (one warning per epoch that met any)."""
    unread: dict[str, str] = field(default_factory=dict)
    """Unreadable images met by the image loaders this epoch, not yet excluded (see exclude_unread)."""
    frozen_outputs: FrozenPrefix | None = None
    """--freeze's frozen layers' output, kept from the first pass that computes it (on a first run the
    probe's: those layers are the pretrained ones), for the full stage's val and refit passes."""
    prefix_groups: int = 0
    """How many leading layer groups `frozen_outputs` is the output of (--freeze's, or while --bn auto has
    not decided it, the most either policy would freeze)."""

    def exclude(self, found: dict[str, str]) -> None:
        """Leave unreadable images out of every split from now on; every rank must pass the same ones."""
        new = {p: why for p, why in found.items() if p not in self.excluded}
        if not new:
            return
        self.excluded.update(new)
        self.splits.samples = {split: [(p, y) for p, y in items if str(p) not in new]
                               for split, items in self.splits.samples.items()}
        for split in ("train", "val"):
            if not self.splits.samples.get(split):
                raise DataError(f"DATA {self.splits.root}: no readable image is left in the {split} split "
                                f"({len(self.excluded)} unreadable); run `visiontune doctor DATA`.")
        if self.on_exclude is not None:
            self.on_exclude(new)

    def exclude_unread(self) -> None:
        """After an epoch of image batches: the unreadable images any rank met, left out on every rank."""
        found = {k: v for part in self.rt.all_gather(self.unread) for k, v in part.items()}
        self.unread.clear()
        self.exclude(found)

    @property
    def feature_key(self) -> dict:
        """The feature cache's key for this run's pretrained model and preprocessing."""
        return feature_key(self.cfg, self.rt, self.backbone, self.weights_source, self.pre)

    @property
    def classes(self) -> list[str]:
        return self.splits.classes

    @property
    def train_items(self) -> list[tuple[Path, int]]:
        return self.splits.samples["train"]

    @property
    def val_items(self) -> list[tuple[Path, int]]:
        return self.splits.samples["val"]

    @property
    def multi_label(self) -> bool:
        return self.splits.multi_label

    @property
    def train_labels(self) -> torch.Tensor:
        return label_tensor(self.train_items, len(self.classes))

    @property
    def val_labels(self) -> torch.Tensor:
        return label_tensor(self.val_items, len(self.classes))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_batch(images, self.pre, self.cfg.channels_last)

    def features_of(self, items: list[tuple[Path, int]], views: int, model: nn.Module | None = None,
                    desc: str | None = None, prefix: FrozenPrefix | None = None) -> torch.Tensor:
        """Pooled backbone features [views, readable images, dim] of `items`: of the run's model through
        the feature cache, or of `model` as it is now (fine-tuned weights: nothing to reuse, not cached;
        its frozen layers' output kept in `prefix`). `desc` names the pass on the progress bar (default:
        the view)."""
        progress = self.progress if desc is None else (lambda it, total, _: self.progress(it, total, desc))
        cache = FeatureCache(self.cache_dir, self.feature_key)
        if model is None and views == 1:
            # The pretrained model's frozen layers are the ones fine-tuning keeps: what this pass computes of
            # them (the images missing from the feature cache) serves the full stage's first passes too.
            prefix = self.frozen_outputs
        features, failed = extract_features(self.model if model is None else model, [p for p, _ in items],
                                            self.decode, self.pre, views, self.cfg.seed,
                                            cache if self.cfg.feature_cache and model is None else None,
                                            self.cfg.eval_batch_size, self.cfg.channels_last, progress,
                                            runtime=self.rt, prefix=prefix)
        # The rows are those of the images that could be read: the samples (and labels) lose the others.
        self.exclude(failed)
        return features

    def model_meta(self) -> dict:
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "backbone": self.backbone.name,
            "architecture": self.backbone.timm_name,
            "classes": self.classes,
            "preprocessing": self.pre.to_json(),
            "weights_source": self.weights_source,
            "mode": self.cfg.mode,
            "task": "multi-label" if self.multi_label else "single-label",
        }


def _check_multi_label_settings(cfg: TrainConfig) -> None:
    """Settings that assume one class per image, refused for a path,labels CSV."""
    for wrong, flag, why in ((cfg.class_weights != "none", "--class-weights", "class weights need one class per image"),
                             (cfg.sampler != "random", "--sampler", "class-balanced sampling needs one class per image"),
                             (cfg.mixup > 0 or cfg.cutmix > 0, "--mixup/--cutmix",
                              "mixup and cutmix mix one-class targets (--augment strong turns them on: add "
                              "--mixup 0 --cutmix 0)")):
        if wrong:
            raise UsageError(f"{flag}: this data is multi-label (a path,labels CSV) and {why}; drop it.")


def init_from_run(model: nn.Module, backbone: backbones.Backbone, cfg: TrainConfig, classes: list[str],
                  rt: Runtime) -> tuple[str, bool]:
    """--init RUN: load RUN's best weights into `model`; the head too when the classes are the same.
    Returns the weights source and whether the head came along."""
    from .images import file_identity as checkpoint_identity
    from .runfolder import RunFolder

    folder = RunFolder(cfg.init)
    if not folder.path.is_dir():
        raise UsageError(f"--init {cfg.init}: no such run folder; pass a folder written by `visiontune train`.")
    meta = folder.read_model_json()
    if meta["architecture"] != backbone.timm_name:
        raise UsageError(f"--init {cfg.init}: was trained with --model {meta.get('backbone', meta['architecture'])}, "
                         f"not {cfg.model}; pass --model {meta.get('backbone', meta['architecture'])} or another run.")
    if not folder.best_weights_file.is_file():
        raise UsageError(f"--init {cfg.init}: has no {folder.best_weights_file.name}; the run did not finish an epoch.")
    state = folder.load_best_weights()
    same = meta["classes"] == classes
    if not same:
        head = {f"{name}.{key}" for name, module in model.named_modules() if module is model.get_classifier()
                for key in module.state_dict()}
        state = {k: v for k, v in state.items() if k not in head}
    model.load_state_dict(state, strict=same)
    if not cfg.quiet and rt.is_main:
        if same:
            print(f"starting from {cfg.init}'s best weights: backbone and head (same classes)", flush=True)
        else:
            print(f"starting from {cfg.init}'s backbone with a new head: its classes ({', '.join(meta['classes'])}) "
                  f"differ from this data's ({', '.join(classes)})", flush=True)
    # The file's identity is part of the source: it keys the feature cache, and an extended run's
    # best weights change.
    return f"init:{checkpoint_identity(folder.best_weights_file)}", same


def build_setup(cfg: TrainConfig, rt: Runtime, screen_splits: tuple[str, ...] = ("train", "val")) -> Setup:
    """Data (listed, not read: unreadable images are left out by the first pass that meets them, or all
    checked here with --strict), model on its device, preprocessing, decode cache, seeds.
    `cfg` comes back in `Setup.cfg` with the image sizes filled in."""
    splits = resolve_data(cfg)
    if splits.multi_label:
        _check_multi_label_settings(cfg)
    backbone = backbones.resolve(cfg.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    reuse_freed_memory()
    generator = seed_everything(cfg.seed)
    model, weights_source = backbones.build_classifier(cfg.model, len(splits.classes),
                                                       Path(cfg.weights) if cfg.weights else None)
    head_from_init = False
    if cfg.init:
        weights_source, head_from_init = init_from_run(model, backbone, cfg, splits.classes, rt)
    seed_rank(cfg.seed, rt.rank)
    pre = Preprocessing.from_data_config(backbones.data_config(model), cfg.image_size)
    eval_size, train_size, size_decision = choose_image_sizes(cfg, splits, pre.size,
                                                              measure=starts_with_probe(cfg, head_from_init))
    if eval_size != pre.size:
        pre = Preprocessing.from_data_config(backbones.data_config(model), eval_size)
    # Record the sizes actually used, so config.json is complete without the backbone at hand.
    cfg = replace(cfg, image_size=pre.size, train_size=train_size)
    freeze, freeze_decision, prefix_groups = _choose_freeze(cfg, model)
    cfg = replace(cfg, freeze=freeze)
    model = model.to(rt.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    progress = progress_bar(not cfg.quiet and rt.is_main)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    decode = _decoder(cfg, pre, cache_dir)
    if cfg.strict:
        # All or nothing, before anything is written: every image is decoded once up front. Otherwise
        # unreadable images are found by the first pass that reads them (features, or image batches)
        # and left out from then on, so that training starts after listing the files.
        paths = [p for split in screen_splits for p, _ in splits.samples.get(split, [])]
        bad = screen_images(decode, paths, progress, rt)
        if bad:
            first = next(iter(bad.items()))
            raise DataError(f"{len(bad)} image(s) cannot be used, e.g. {first[0]}: {first[1]}; fix or remove "
                            "them (visiontune doctor DATA lists all), or drop --strict to leave them out.")
    excluded: dict[str, str] = {}
    frozen_outputs = None
    if _keeps_frozen_outputs(cfg, rt, prefix_groups) and cfg.mode != "fixed":
        frozen_outputs = _frozen_prefix(cfg, rt, model, cache_dir, feature_key(cfg, rt, backbone, weights_source, pre),
                                        leading_group_parameters(model, prefix_groups))
    return Setup(cfg=cfg, rt=rt, splits=splits, model=model, backbone=backbone, weights_source=weights_source,
                 head_from_init=head_from_init,
                 pre=pre, decode=decode, cache_dir=cache_dir, generator=generator, progress=progress,
                 excluded=excluded, size_decision=size_decision, freeze_decision=freeze_decision,
                 frozen_outputs=frozen_outputs, prefix_groups=prefix_groups)


def starts_with_probe(cfg: TrainConfig, head_from_init: bool) -> bool:
    """Whether fine-tuning starts from the linear probe (epoch 0): a fine-tune run whose head is new."""
    return cfg.mode == "finetune" and cfg.head_init == "probe" and not head_from_init


def _decoder(cfg: TrainConfig, pre: Preprocessing, cache_dir: Path) -> Callable:
    return DecodeCache(pre.resize, pre.interpolation, cache_dir, int(cfg.decode_cache_gb * (1 << 30))) \
        if cfg.decode_cache_gb > 0 else partial(decode_array, short_side=pre.resize, interpolation=pre.interpolation)


def at_image_size(s: Setup, size: int) -> Setup:
    """The same run with val and training crops at `size` px: its own preprocessing, decoded images,
    feature-cache key and kept frozen output. Data, model and state are shared with `s`."""
    cfg = replace(s.cfg, image_size=size, train_size=size)
    pre = Preprocessing.from_data_config(backbones.data_config(s.model), size)
    frozen_outputs = None
    if s.frozen_outputs is not None:
        frozen_outputs = _frozen_prefix(cfg, s.rt, s.model, s.cache_dir,
                                        feature_key(cfg, s.rt, s.backbone, s.weights_source, pre),
                                        leading_group_parameters(s.model, s.prefix_groups))
    return replace(s, cfg=cfg, pre=pre, decode=_decoder(cfg, pre, s.cache_dir), frozen_outputs=frozen_outputs)


def feature_key(cfg: TrainConfig, rt, backbone: backbones.Backbone, weights_source: str, pre: Preprocessing) -> dict:
    """What the pretrained model's features of an image depend on, besides the image: the feature cache's key."""
    return {"arch": backbone.timm_name, "weights": weights_source, "pre": pre.to_json(),
            "channels_last": cfg.channels_last, "folded_bn": True, "precision": rt.precision}


def _frozen_prefix(cfg: TrainConfig, rt, model: nn.Module, cache_dir: Path, key: dict,
                   frozen: list[nn.Parameter] | None = None) -> FrozenPrefix:
    """The frozen layers' output in memory up to --frozen-cache-gb, with its store beside the features."""
    prefix = FrozenPrefix(model, int(cfg.frozen_cache_gb * (1 << 30)), frozen)
    prefix.store = frozen_output_store(cfg, rt, cache_dir, key, prefix.names)
    return prefix


def frozen_output_store(cfg: TrainConfig, rt, cache_dir: Path, key: dict, names: list[str]) -> FeatureCache | None:
    """Where the frozen layers' output is kept between runs: beside the features, under their key and the
    layers' names. Float32 rows: only a run without autocast (a CPU run) writes or reads them."""
    if not cfg.feature_cache or not names or rt.amp_dtype is not None:
        return None
    return FeatureCache(cache_dir, {**key, "frozen_output_of": names})


def _keeps_frozen_outputs(cfg: TrainConfig, rt, groups: int | None) -> bool:
    # Under torchrun each rank evaluates its own shard of the images: they go through the whole model.
    return bool(groups) and cfg.frozen_cache_gb > 0 and not rt.distributed


def _choose_freeze(cfg: TrainConfig, model: nn.Module) -> tuple[int | None, str | None, int]:
    """--freeze as given (checked against the model before any work), or its default for the BatchNorm
    policy (default_freeze); with --bn auto still to measure, None until it has. Also how many groups the
    kept frozen output (FrozenPrefix) starts after until then: the most that either policy freezes, since
    the full stage starts a fresh one when it freezes fewer, and with trained statistics (no refit) that
    is one pass over the val images."""
    if cfg.freeze is not None:
        leading_group_parameters(model, cfg.freeze)  # too many groups: one sentence now, not after the probe
        return cfg.freeze, None, cfg.freeze
    if cfg.bn in FREEZE_FINEST_REDUCTION:
        count, line = default_freeze(model, cfg.bn)
        return count, line, count
    return None, None, max(high_resolution_groups(model, r)[0] for r in FREEZE_FINEST_REDUCTION.values())


def default_freeze(model: nn.Module, bn: str) -> tuple[int, str | None]:
    """--freeze's default under BatchNorm policy `bn` (config.FREEZE_FINEST_REDUCTION), and the line that
    says it (None when it freezes nothing)."""
    reduction = FREEZE_FINEST_REDUCTION[bn]
    count, last = high_resolution_groups(model, reduction)
    if count == 0:
        return 0, None
    share = {4: "a quarter", 8: "an eighth"}.get(reduction, f"1/{reduction}")
    policy = "statistics kept pretrained" if bn == "frozen" else "statistics that train"
    return count, (f"--freeze {count}: the layers up to {last} ({share} of the input resolution and finer, with "
                   f"BatchNorm {policy}) keep their pretrained weights and BatchNorm statistics while the rest "
                   "fine-tunes: their generic features stay, each step is cheaper (--freeze 0 trains every layer)")


@dataclass
class Stage:
    """One optimizer, one schedule, one kind of batches, over `epochs` epochs."""

    name: str
    """"head" (new head only, backbone frozen) or "full" (every layer but --freeze's first groups)."""
    epochs: int
    lr: float
    module: nn.Module
    """The module whose forward is trained (the model, or the classifier on cached features)."""
    trainable: nn.Module
    """`module`, possibly wrapped (DistributedDataParallel, torch.compile)."""
    train_batches: object
    val_batches: object
    prepare: Callable
    frozen: list[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    on_features: bool
    mix: Callable | None = None
    scaler: object = None
    ema: "WeightAverage | None" = None
    """Full stage with --ema-epochs > 0: the averaged weights that val, best and the saved files use."""
    prefix: FrozenPrefix | None = None
    """Full stage with --freeze: the frozen layers' output on the images val (and the refit) pass over."""

    @property
    def evaluated(self) -> nn.Module:
        """The weights an epoch is judged and kept by: the average when there is one."""
        return self.ema.module if self.ema is not None else self.module

    def lr_at_epoch_end(self, epoch_in_stage: int, cfg: TrainConfig) -> float:
        """The learning rate of the epoch's last optimizer step."""
        return self.lr * lr_multiplier(cfg.schedule, epoch_in_stage * self.steps_per_epoch - 1, self.steps_per_epoch,
                                       self.epochs, cfg.warmup_epochs)

    def fast_forward(self, epochs_done: int, cfg: TrainConfig) -> None:
        """Put the schedule at the start of epoch `epochs_done + 1`. Counted in epochs, not saved steps,
        so a run resumed with another number of processes (other steps per epoch) stays on schedule."""
        step = epochs_done * self.steps_per_epoch
        self.scheduler.last_epoch = step
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_multiplier(cfg.schedule, step, self.steps_per_epoch, self.epochs, cfg.warmup_epochs)


def freeze_for_mode(cfg: TrainConfig, model: nn.Module, stage: str) -> list[nn.Module]:
    """Set requires_grad for the stage; return the modules that must stay in eval mode while training.

    head: everything but the classifier is frozen, BatchNorm statistics included.
    full with --bn frozen: every BatchNorm keeps its running statistics (its affine weights train).
    full with --freeze N: the first N layer groups keep their weights and statistics.
    """
    classifier = model.get_classifier()
    if stage == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in classifier.parameters():
            p.requires_grad_(True)
        return [m for m in model.children() if m is not classifier]
    for p in model.parameters():
        p.requires_grad_(True)
    for p in leading_group_parameters(model, cfg.freeze) if cfg.freeze else ():
        p.requires_grad_(False)
    # --freeze: the frozen layer groups run as at inference (BatchNorm statistics, dropout), whatever --bn.
    frozen_groups = [m for m in model.modules() if any(True for _ in m.parameters())
                     and not any(p.requires_grad for p in m.parameters())]
    if cfg.bn == "frozen":
        return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] + frozen_groups
    return frozen_groups


def _scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(cfg.schedule, step, steps_per_epoch, epochs, cfg.warmup_epochs))


def image_train_batches(s: Setup, transform) -> "ReadableBatches":
    # A training batch left with one image breaks BatchNorm in train mode: skipped (the loader already
    # drops a last batch of one, for the same reason).
    return ReadableBatches(train_loader(s.train_items, s.decode, transform, s.cfg, s.rt, s.generator,
                                        len(s.classes) if s.multi_label else 0), s.unread, smallest=2)


def image_val_batches(s: Setup) -> "ReadableBatches":
    return ReadableBatches(val_loader(s.val_items, s.decode, EvalTransform(s.pre), s.cfg, s.rt,
                                      len(s.classes) if s.multi_label else 0), s.unread)


class ReadableBatches:
    """A loader's (images, labels) batches without the images that could not be read, which are
    noted in `unread` ({path: reason}) for the loop to leave out after the epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader, unread: dict[str, str], smallest: int = 1):
        self.loader, self.unread, self.smallest = loader, unread, smallest

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, failed in self.loader:
            self.unread.update(failed)
            # A batch only shrinks below `smallest` because of unreadable images: one the loader made
            # small itself (fixed mode's last batch) is kept, as it always was.
            if len(labels) >= self.smallest or (len(labels) and not failed):
                yield images, labels


def _wrap(s: Setup, model: nn.Module) -> nn.Module:
    wrapped = model
    if s.rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[s.rt.device] if s.rt.device.type == "cuda" else None)
    if s.cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def head_stage(s: Setup, epochs: int, lr: float) -> Stage:
    """New head only, backbone frozen. On cached features (every rank trains the same head on all
    of them: it costs a second, and needs no gradient exchange); or, with --no-feature-cache in fixed
    mode, on images through the frozen backbone."""
    cfg = s.cfg
    model, classifier = s.model, s.model.get_classifier()
    frozen = freeze_for_mode(cfg, model, "head")
    # staged/auto: the head stage is fixed mode's head recipe (its optimizer; --optimizer is the full
    # stage's), so that its best epoch is what --mode fixed gives and auto is never below it.
    head_optimizer = cfg.optimizer if cfg.mode == "fixed" else MODE_DEFAULTS["fixed"]["optimizer"]
    stage_cfg = replace(cfg, lr=lr, lr_decay=None, optimizer=head_optimizer)
    optimizer = make_optimizer(stage_cfg, [(n, p) for n, p in classifier.named_parameters()])
    if cfg.feature_cache or cfg.mode != "fixed":
        views = cfg.views if cfg.mode == "fixed" else 1
        train_features = s.features_of(s.train_items, views)  # first: it may leave unreadable images out
        labels = s.train_labels
        train_batches = FeatureBatches(train_features, labels, cfg.batch_size, s.generator,
                                       sampler=make_sampler(cfg, range(len(labels)), labels, s.generator))
        val_features = s.features_of(s.val_items, 1)[0]
        val_batches = list(zip(val_features.split(cfg.eval_batch_size), s.val_labels.split(cfg.eval_batch_size)))
        steps = math.ceil(len(train_batches) / cfg.accumulate)
        return Stage("head", epochs, lr, classifier, classifier, train_batches, val_batches, lambda x: x, [],
                     optimizer, _scheduler(cfg, optimizer, steps, epochs), steps, on_features=True)
    transform = EvalTransform(s.pre) if cfg.views == 1 else TrainTransform(s.pre, cfg.train_size, strength=cfg.augment)
    train_batches = image_train_batches(s, transform)
    steps = math.ceil(len(train_batches) / cfg.accumulate)
    return Stage("head", epochs, lr, model, _wrap(s, model), train_batches, image_val_batches(s), s.prepare, frozen,
                 optimizer, _scheduler(cfg, optimizer, steps, epochs), steps, on_features=False,
                 scaler=s.rt.grad_scaler())


def full_stage(s: Setup, epochs: int) -> Stage:
    """Every layer, on augmented images, at `cfg.lr` (with layer-wise decay when asked)."""
    cfg, model = s.cfg, s.model
    if cfg.bn == "auto":
        raise ValueError("full_stage needs a decided BatchNorm policy: cfg.with_bn_policy('frozen' or 'train')")
    frozen = freeze_for_mode(cfg, model, "full")
    optimizer = make_optimizer(cfg, [(n, p) for n, p in model.named_parameters() if p.requires_grad], model)
    train_batches = image_train_batches(s, TrainTransform(s.pre, cfg.train_size, (cfg.crop_scale, 1.0),
                                                          strength=cfg.augment))
    steps = math.ceil(len(train_batches) / cfg.accumulate)
    mix = MixBatch(len(s.classes), cfg.mixup, cfg.cutmix) if cfg.mixup > 0 or cfg.cutmix > 0 else None
    prefix, s.frozen_outputs = s.frozen_outputs, None  # the stage holds what it uses
    if prefix is not None and prefix.names == frozen_module_names(model):
        # The stage reads the val images' output, and the training images' only to refit the head.
        prefix.keep_only({file_identity(p) for p, _ in s.val_items + (s.train_items if cfg.refit_head else [])})
    elif _keeps_frozen_outputs(cfg, s.rt, cfg.freeze):
        prefix = _frozen_prefix(cfg, s.rt, model, s.cache_dir, s.feature_key)
    else:
        prefix = None
    return Stage("full", epochs, cfg.lr, model, _wrap(s, model), train_batches, image_val_batches(s), s.prepare,
                 frozen, optimizer, _scheduler(cfg, optimizer, steps, epochs), steps, on_features=False, mix=mix,
                 scaler=s.rt.grad_scaler(), ema=WeightAverage(model, cfg.ema_epochs, steps) if cfg.ema_epochs else None,
                 prefix=prefix)


def refit_head(s: Setup, model: nn.Module, epoch: int, prefix: FrozenPrefix | None = None) -> EvalOutput:
    """--refit-head: fit `model`'s head again on `model`'s own features and return its val statistics.

    The probe's recipe (recipes.fit_probe, continuing from the head as it is) on the features of the
    training images at the eval transform, evaluated on the val images' features: the same numbers an
    image val pass of `model` gives, from the same forward pass. Fine-tuning moves the features faster
    than the head trained alongside follows them (eurosat10 seed 2, first epoch: 0.9025 with the trained
    head, 0.95 refitted; docs/recipes.md, tenth pass). Its own generator, seeded by the epoch, leaves the
    run's batch order what it would be without it; every process fits the same head from the same features.
    """
    generator = torch.Generator().manual_seed(s.cfg.seed * 10_000 + epoch)
    # The training images first: their pass may leave unreadable images out.
    train_features = s.features_of(s.train_items, 1, model, f"epoch {epoch} refit: train features", prefix)
    val_features = s.features_of(s.val_items, 1, model, f"epoch {epoch} val", prefix)[0]
    _, val = fit_probe(model.get_classifier(), train_features, s.train_labels, s.cfg, generator, val_features,
                       s.val_labels, s.multi_label)
    return val


def evaluate_by_features(s: Setup, model: nn.Module, epoch: int, prefix: FrozenPrefix) -> EvalOutput:
    """The val pass of `model` as its pooled features (through `prefix`: the frozen layers run on an image
    once a stage), then its classifier on them: the numbers an image val pass gives, the same batches."""
    features = s.features_of(s.val_items, 1, model, f"epoch {epoch} val", prefix)[0]
    # The image val loader draws its seed from the global RNG on each pass; the same draw here keeps the
    # training's random stream (crops, dropout), so a run gives the numbers it gives with --frozen-cache-gb 0.
    torch.empty((), dtype=torch.int64).random_()
    batches = zip(features.split(s.cfg.eval_batch_size), s.val_labels.split(s.cfg.eval_batch_size))
    return evaluate(model.get_classifier(), batches, label_smoothing=s.cfg.label_smoothing, device=s.rt.device,
                    multi_label=s.multi_label, keep_outputs=True)


class WeightAverage:
    """An exponential moving average of a model's weights (timm's ModelEmaV3; BatchNorm's running
    statistics are averaged too), updated after every optimizer step. Its time constant is given in
    epochs, so the per-step decay follows the data's size, and is at least `min_steps` steps:
    1 - 1 / max(epochs x steps per epoch, min_steps)."""

    def __init__(self, model: nn.Module, epochs: float, steps_per_epoch: int, min_steps: int = EMA_MIN_STEPS):
        from timm.utils import ModelEmaV3

        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.steps = max(epochs * steps_per_epoch, min_steps)
        self.decay = max(0.0, 1.0 - 1.0 / self.steps)
        # Starts as a copy of the model as the stage begins (the probe's head on the pretrained backbone).
        self.average = ModelEmaV3(model, decay=self.decay)

    @property
    def module(self) -> nn.Module:
        return self.average.module

    def update(self, model: nn.Module) -> None:
        self.average.update(model)

    def describe(self) -> str:
        return (f"weights averaged over {self.epochs:g} epoch, at least {self.steps:.0f} steps (an epoch is "
                f"{self.steps_per_epoch}): EMA decay {self.decay:.4f} per step")


def class_weights_for(s: Setup) -> torch.Tensor | None:
    if s.cfg.class_weights != "auto":
        return None
    return inverse_frequency_weights(s.train_labels, len(s.classes)).to(s.rt.device)
