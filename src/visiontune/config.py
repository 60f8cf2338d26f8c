"""Training settings as one validated dataclass; each error names its flag."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import UsageError

DEFAULT_BACKBONE = "efficientnet_lite0"
MODES = ("finetune", "fixed", "staged", "auto")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "onecycle", "constant")
AUGMENTS = ("none", "light", "strong")
SAMPLERS = ("random", "balanced")
CLASS_WEIGHTS = ("none", "auto")
HEAD_INITS = ("probe", "random")
BN_POLICIES = ("auto", "frozen", "train")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXPLAIN_METHODS = ("gradcam", "gradcam++", "hirescam", "layercam")  # grad-cam's CAM variants offered
DEFAULT_TOP_K = 3  # classes listed per image by predict, the Python API and the server
# --augment strong turns these on: light mixup, full cutmix (timm's ImageNet recipes use cutmix 1.0).
STRONG_MIXUP, STRONG_CUTMIX = 0.2, 1.0

# Per-mode defaults, chosen by measurement on four data sets (bench/accuracy.py, docs/recipes.md).
# Fine-tuning every layer: the BatchNorm policy is measured on the data before the first fine-tuning
# step (--bn auto, recipes.choose_bn_policy) and brings its optimizer and step (BN_RECIPES).
# The weights evaluated, kept as best and saved are an EMA of the fine-tuned weights over a quarter of an
# epoch (EMA_EPOCHS): at AdamW 1e-4 it removed the raw weights' first-epoch dip below the probe
# (sign_digits seed 1: raw 0.907, EMA 0.956, probe 0.951; trashnet seed 1: 0.739, 0.783, 0.775), and it
# lets far domains take a larger step (FAR_DOMAIN_RECIPE; docs/recipes.md, sixth pass).
EMA_EPOCHS = 0.25
# ... and over at least 8 steps: a quarter epoch of a small set is 2 steps (hymenoptera, 8 steps an epoch), which
# averages nothing; 8 steps is what a quarter epoch is on about 1 000 images in batches of 32.
EMA_MIN_STEPS = 8
FINE_TUNE = {"schedule": "cosine", "warmup_epochs": 0.0, "bn": "auto", "ema_epochs": EMA_EPOCHS}
# What each BatchNorm policy fine-tunes with, unless --optimizer / --lr say otherwise.
# frozen (the pretrained statistics kept): AdamW at 1e-4. On the sets far from ImageNet (eurosat10,
# sign_digits, trashnet) statistics re-estimated from training batches with SGD at 0.003 took the first
# epoch 4-27 points below the probe head, and frozen statistics diverge at that SGD step.
# train (statistics follow the batches): SGD-Nesterov at 0.003, where the data's own batch statistics
# leave the probe's predictions nearly unchanged (hymenoptera: the first epoch adds to the probe).
# Each brings its number of fine-tuning epochs too (FINE_TUNE_EPOCHS unless said), which --epochs replaces.
# And whether each epoch's head is fitted again on the evaluated weights' own features (--refit-head):
# AdamW's steps move the features faster than the head trained alongside follows them. With frozen
# statistics (AdamW), 3 seeds each: mean best +0.72 points on trashnet, +0.16 on sign_digits, +1.34 on
# eurosat10; the first epoch above the probe on 7 of those 9 runs (5 without), and within a point of it on
# all but eurosat10 seed 0 (-1.5; -3.75 without).
# With trained statistics (SGD 0.003: small steps from a fitted probe) it gained nothing on hymenoptera
# (0.9564 vs 0.9586), and its extra forward pass over the training images made an epoch there a third
# longer (8.4 -> 11.4 s; bench/speed.py's per-epoch target failed: docs/recipes.md, tenth pass).
# 5 fine-tuning epochs on every set (eleventh pass, 3 seeds each): first on the far domains (eighth pass:
# sign_digits 0.9943 instead of 0.9886, eurosat10 0.9533 instead of 0.9492), then on the two sets near the
# backbone's domain once the weight EMA and the refit were in: trashnet 0.8164 instead of 0.7995, hymenoptera
# 0.9608 instead of 0.9586 (one image more; with the fourth pass's recipe, 6 epochs had added nothing there).
# They cost wall: trashnet 79 -> 115 s, half of fastai's on the same machine rather than the third.
FINE_TUNE_EPOCHS = 5
BN_RECIPES = {"frozen": {"optimizer": "adamw", "lr": 1e-4, "epochs": FINE_TUNE_EPOCHS, "refit_head": True},
              "train": {"optimizer": "sgd", "lr": 0.003, "epochs": FINE_TUNE_EPOCHS, "refit_head": False}}
# frozen on a far domain (--bn auto measured the head keeping under half its predictions under the data's
# own batch statistics: eurosat10, sign_digits): a 3x larger AdamW step. With the weight EMA, 3 seeds:
# sign_digits 0.9870 and eurosat10 0.9475 (+3.67 and +2.00 points over fixed mode; at 1e-4 +1.96 and
# +1.58), though one seed of each still dips in its first epoch (-6.6, -4.5 points); on trashnet
# (agreement 0.63-0.66) the same step took the first epoch 2-9 points below the probe even averaged.
# Since both far sets are evaluated at their 160 px crop size (small images, pipeline.choose_image_sizes),
# 3e-4 is still ahead of 1e-4 on sign_digits (0.9886 vs 0.9780) and behind on eurosat10 (0.9492 vs
# 0.9558): kept, as neither wins on both (docs/recipes.md, seventh pass).
FAR_DOMAIN_RECIPE = {"optimizer": "adamw", "lr": 3e-4, "epochs": FINE_TUNE_EPOCHS, "refit_head": True}
# --freeze's default follows the BatchNorm policy too (pipeline.default_freeze): the layer groups that run at
# 1/N of the input resolution or finer keep their pretrained weights and statistics. With the statistics kept
# (AdamW, whose steps move every weight by about lr whatever its gradient), one stage more: 1/8, blocks 0-2 of
# EfficientNet-Lite. 3 seeds each against 1/4 (docs/recipes.md, twenty-first pass): eurosat10's first epoch
# within a point of the probe on every seed (+0.75 / +2.0 / +0.25 points; seed 0 was -1.5) and its mean best
# 0.9633 against 0.9650; sign_digits and trashnet the same mean best (0.9992, 0.8188); a step 0.87x as long.
# With trained statistics (SGD: hymenoptera) the quarter: at 1/8 its seed 2 lost two images (0.9608 against
# 0.9739), below the floor.
FREEZE_FINEST_REDUCTION = {"train": 4, "frozen": 8}
MODE_DEFAULTS = {
    # Fine-tuning's epochs come with the BatchNorm policy's recipe (BN_RECIPES, FAR_DOMAIN_RECIPE).
    "finetune": {**FINE_TUNE, "head_init": "probe"},
    "fixed": {"epochs": 25, "lr": 0.01, "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 0.0,
              "head_init": "random", "bn": "frozen", "ema_epochs": 0.0, "refit_head": False, "freeze": 0},
    # Head first on cached features with fixed mode's head recipe (SGD, 25 epochs at 0.01: on cached
    # features they cost about a second), then every layer as finetune does.
    "staged": {**FINE_TUNE, "head_init": "random", "head_epochs": 25, "head_lr": 0.01},
    # The staged plan, with the fine-tuning epochs (at most `epochs`) chosen to fit --budget.
    "auto": {**FINE_TUNE, "head_init": "random", "head_epochs": 25, "head_lr": 0.01, "budget": "5m"},
}


@dataclass
class TrainConfig:
    """Everything that defines a training run. `None` means "the mode's default"."""

    data: str
    """Folder (tutorial layout or class folders), CSV of path,label[,split], or a known data set name."""
    mode: str = field(default="finetune", metadata={"choices": MODES})
    """finetune: train the new head and the backbone (all but its first --freeze layer groups); fixed: frozen
    backbone (BatchNorm statistics too), new head only; staged: head_epochs of head only (frozen backbone),
    then `epochs` of fine-tuning as finetune does, at `lr`;
    auto: staged, with as many fine-tuning epochs (up to `epochs`, maybe none) as fit `budget`."""
    model: str = DEFAULT_BACKBONE
    """Registered backbone name (`visiontune models`) or any timm architecture."""
    weights: str | None = None
    """Weights file (.safetensors or state dict) for the backbone, instead of bundled/hub weights; a run's
    best.safetensors gives its backbone (its head is replaced)."""
    init: str | None = None
    """A run folder whose best weights start this run: backbone and head when the classes are the same,
    else the backbone only."""
    epochs: int | None = None
    """Epochs of fine-tuning (finetune, staged, auto) or of the head (fixed, default 25).
    Fine-tuning's default comes with the BatchNorm policy's recipe: 5 with each (said in its line and
    config.json)."""
    head_epochs: int | None = None
    """staged/auto: epochs of head-only training on cached features before every layer trains."""
    head_lr: float | None = None
    """staged/auto: learning rate of the head-only epochs."""
    budget: str | None = None
    """auto: wall-clock budget for the whole run, e.g. 90s, 5m, 1h."""
    batch_size: int = 32
    """Training batch size per process (torchrun: the global batch is this times the processes); 32 keeps
    BatchNorm statistics stable and the CPU busy."""
    eval_batch_size: int = 32
    """Batch size of evaluation and feature extraction (throughput is flat above 32 on a CPU; memory is not)."""
    lr: float | None = None
    """Peak learning rate for a batch of `batch_size`."""
    optimizer: str | None = field(default=None, metadata={"choices": OPTIMIZERS})
    """Default: adamw (finetune, staged, auto), sgd (fixed)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """Applied to weights of convolutions and linear layers only, not to norms and biases."""
    schedule: str | None = field(default=None, metadata={"choices": SCHEDULES})
    """cosine (per step, after linear warmup), step (x0.1 every 7 epochs: the tutorial's),
    onecycle (30% linear rise from lr/25, then cosine down to lr/1e4), constant."""
    warmup_epochs: float | None = None
    """Epochs of linear learning-rate warm-up (fractions allowed); default 0."""
    bn: str | None = field(default=None, metadata={"choices": BN_POLICIES})
    """Fine-tune BatchNorm policy. frozen: running statistics stay the pretrained ones (layers in eval
    mode, affine weights still trained), as Keras recommends for fine-tuning, with AdamW at 1e-4; train:
    statistics follow the training batches (the tutorial's and timm's), with SGD at 0.003. auto
    (default): measured before the first fine-tuning step: train when the fitted head's predictions on
    training images hardly change under the data's own batch statistics (an ImageNet-like domain),
    else frozen (docs/recipes.md). With train on a far domain the probe head stops fitting: on
    eurosat10 the first fine-tuning epoch fell from the probe's 0.93 to 0.63-0.85. --optimizer and
    --lr, when given, replace the policy's own."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing of the training loss, e.g. 0.1."""
    augment: str = field(default="light", metadata={"choices": AUGMENTS})
    """Training augmentation: none (center crop, as in eval), light (random resized crop 25-100% + flip),
    strong (light + TrivialAugmentWide)."""
    mixup: float | None = None
    """Mixup Beta(alpha, alpha); 0 off; default 0.2 with --augment strong, else off."""
    cutmix: float | None = None
    """CutMix Beta(alpha, alpha); 0 off; default 1.0 with --augment strong, else off."""
    class_weights: str = field(default="none", metadata={"choices": CLASS_WEIGHTS})
    """auto: weight each class's loss by N / (classes * count), for imbalanced data (training loss only;
    val loss stays the plain mean cross-entropy so epochs and runs compare)."""
    sampler: str = field(default="random", metadata={"choices": SAMPLERS})
    """balanced: draw training images with probability inversely proportional to their class size."""
    accumulate: int = 1
    """Optimizer step every K batches, on the gradient of all K*B samples."""
    patience: int | None = None
    """Stop when val has not improved (accuracy, then loss) for this many epochs."""
    lr_decay: float | None = None
    """Layer-wise learning-rate decay for fine-tuning: each block group from the head down gets lr
    multiplied by this factor once more (e.g. 0.7); None: one learning rate."""
    freeze: int | None = None
    """Fine-tuning: the first N of the backbone's layer groups (timm's group_matcher: the stem, then
    each stage) keep their pretrained weights and BatchNorm statistics; no gradient flows through them,
    so each training step is cheaper. Default, with the BatchNorm policy (said in one line): the groups
    that run at an eighth of the input resolution or finer where the statistics stay pretrained (4 on
    EfficientNet-Lite: the stem, blocks 0-2; 3 on a ResNet), at a quarter where they train (3 on
    EfficientNet-Lite, 2 on a ResNet); 0 on a ViT (timm's feature_info). 0: every layer trains."""
    head_lr_mult: float = 1.0
    """Fine-tuning: the new head's learning rate as a multiple of lr (fastai's discriminative rates:
    the head higher than the pretrained body), e.g. 30; 1: one learning rate."""
    ema_epochs: float | None = None
    """Fine-tuning: val, the best epoch and the saved weights use an exponential moving average of the
    weights (timm's ModelEmaV3) with this time constant in epochs, so that it means the same on any
    data size, and at least 8 steps: decay = 1 - 1 / max(ema_epochs x steps per epoch, 8), said in one
    line and in config.json.
    Default 0.25 (finetune, staged, auto); 0: the raw weights. Fixed mode's head never averages."""
    refit_head: bool | None = None
    """Fine-tuning: after each epoch, the evaluated weights' head is fitted again with the probe's recipe
    (SGD 0.01, 25 epochs on features, its best epoch on val) on those weights' own features of the
    training images at the eval transform; val, the best epoch and the saved model use that head, while
    training goes on with its own. Costs one forward pass over the training images per epoch.
    Default: with the BatchNorm policy's recipe (--bn auto): on with frozen statistics (AdamW), off with
    trained ones (SGD); never in fixed mode. --no-refit-head: the head trained with the backbone."""
    crop_scale: float = 0.25
    """Fine-tuning: the smallest area of the random resized crop, as a share of the image (timm's
    --scale): 0.08 crops hard, 1 only reshapes."""
    seed: int = 0
    """Seed of every random choice (splits, initialisation, augmentation, batch order)."""
    out: str | None = None
    """Run folder; default runs/<data name>-<mode>[-N]."""
    val_fraction: float = 0.2
    """Share of each class held out for val when the data has no val split."""
    views: int = 1
    """Fixed mode: feature views per training image; view 0 is un-augmented, the others augmented."""
    image_size: int | None = None
    """Evaluation input size; default from the backbone's data config, or, when fine-tuning on images
    whose median short side is below the training crop size, the crop size (said in one line)."""
    train_size: int | None = None
    """Fine-tune training crop size; default 5/7 of the eval size (160 for 224): about 2x cheaper
    steps, and training at a lower resolution than testing does not cost accuracy (FixRes)."""
    head_init: str | None = field(default=None, metadata={"choices": HEAD_INITS})
    """Fine-tune: "probe" fits the new head on cached backbone features first (linear probe, then
    fine-tune: LP-FT), so the backbone is not disturbed by a random head; "random" starts cold."""
    channels_last: bool = True
    """NHWC memory layout: about 1.7x faster convolutions on CPU for EfficientNet."""
    threads: int | None = None
    """Intra-op threads; default: the machine's cores."""
    device: str = "auto"
    """auto (cuda if visible, else cpu), cpu, cuda (torchrun: the process's LOCAL_RANK GPU) or cuda:N."""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """auto (bf16 on GPUs that support it, fp32 on CPU), fp32, bf16 (autocast) or fp16 (autocast + GradScaler)."""
    compile: bool = False
    """torch.compile the model for training (on an H100 it doubled lite0's eval speed, not its training
    speed: docs/performance.md; compiling costs about a minute)."""
    deterministic: bool = False
    """Deterministic kernels (and cuBLAS/cuDNN settings) so that GPU runs repeat exactly; slower."""
    workers: int | None = None
    """DataLoader worker processes; default 0 on CPU (decoding is cached and the cores are busy with the
    model), up to 8 per process on GPU."""
    cache_dir: str | None = None
    """Where decoded images and features are cached; default ~/.cache/visiontune."""
    decode_cache_gb: float = 8.0
    """Upper bound for newly cached decoded images; past it images are decoded every epoch."""
    frozen_cache_gb: float = 1.0
    """Memory for the output of --freeze's frozen layers on the val images (and, with --refit-head, the
    training images) at the eval transform: kept from the first pass that computes it, and written
    beside the cached features, so later passes (and later runs) start after those layers; 0 computes
    them every epoch."""
    feature_cache: bool = True
    """Keep backbone features (and the frozen layers' output) in the cache folder for later runs; without
    it fixed mode runs every epoch's images through the frozen backbone."""
    strict: bool = False
    """Stop on unreadable images instead of leaving them out with a warning."""
    quiet: bool = False
    """Print nothing but warnings and errors."""
    log: str = "tensorboard"
    """Experiment log: tensorboard (RUN/tensorboard: scalars per step and epoch, the confusion matrix and the
    mistakes at the end), mlflow (when installed: params, metrics, the run folder as artifacts),
    tensorboard,mlflow, or none."""

    def resolved(self) -> "TrainConfig":
        """A copy with mode defaults filled in, validated."""
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}.")
        values = asdict(self)
        for key, default in MODE_DEFAULTS[self.mode].items():
            if values[key] is None:
                values[key] = default
        if values["head_epochs"] is None:
            values["head_epochs"] = 0
        if values["mode"] == "fixed" and values["bn"] == "auto":
            values["bn"] = "frozen"  # the backbone is frozen whole: there is nothing to decide
        if values["bn"] in BN_RECIPES:
            values.update(_with_bn_recipe(values, values["bn"]))
        strong = values["augment"] == "strong"
        for key, on in (("mixup", STRONG_MIXUP), ("cutmix", STRONG_CUTMIX)):
            if values[key] is None:
                values[key] = on if strong else 0.0
        cfg = TrainConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok: bool, flag: str, value, fix: str) -> None:
            if not ok:
                raise UsageError(f"{flag} {value!r} is invalid: {fix}.")

        need(self.batch_size >= 1, "--batch-size", self.batch_size, "use 1 or more")
        need(self.eval_batch_size >= 1, "--eval-batch-size", self.eval_batch_size, "use 1 or more")
        # --bn auto leaves the fine-tuning optimizer and lr open until the policy is measured.
        open_until_bn = self.bn == "auto"
        need((open_until_bn and self.epochs is None) or (isinstance(self.epochs, int) and self.epochs >= 1),
             "--epochs", self.epochs, "use a whole number of at least 1")
        need((open_until_bn and self.lr is None) or (self.lr is not None and self.lr > 0), "--lr", self.lr,
             "use a positive learning rate such as 0.01")
        need((open_until_bn and self.optimizer is None) or self.optimizer in OPTIMIZERS, "--optimizer",
             self.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, "--schedule", self.schedule, f"use one of {', '.join(SCHEDULES)}")
        need(0 <= self.momentum < 1, "--momentum", self.momentum, "use a value in [0, 1)")
        need(self.weight_decay >= 0, "--weight-decay", self.weight_decay, "use 0 or more")
        need(self.warmup_epochs >= 0, "--warmup-epochs", self.warmup_epochs, "use 0 or more")
        need(0 <= self.label_smoothing < 1, "--label-smoothing", self.label_smoothing, "use a value in [0, 1)")
        need(0 < self.val_fraction < 1, "--val-fraction", self.val_fraction, "use a value between 0 and 1, such as 0.2")
        need(self.views >= 1, "--views", self.views, "use 1 or more")
        need(self.image_size is None or self.image_size >= 32, "--image-size", self.image_size, "use 32 or more")
        need(self.train_size is None or self.train_size >= 32, "--train-size", self.train_size, "use 32 or more")
        need(self.head_init in HEAD_INITS, "--head-init", self.head_init, f"use one of {', '.join(HEAD_INITS)}")
        need(self.augment in AUGMENTS, "--augment", self.augment, f"use one of {', '.join(AUGMENTS)}")
        need(self.class_weights in CLASS_WEIGHTS, "--class-weights", self.class_weights, "use none or auto")
        need(self.sampler in SAMPLERS, "--sampler", self.sampler, "use random or balanced")
        need(self.accumulate >= 1, "--accumulate", self.accumulate, "use 1 or more")
        need(self.patience is None or self.patience >= 1, "--patience", self.patience, "use 1 or more")
        need(self.lr_decay is None or 0 < self.lr_decay <= 1, "--lr-decay", self.lr_decay, "use a value in (0, 1]")
        need(self.freeze is None or (isinstance(self.freeze, int) and self.freeze >= 0), "--freeze", self.freeze,
             "use a whole number of layer groups, 0 (every layer trains) or more")
        need(self.head_lr_mult > 0, "--head-lr-mult", self.head_lr_mult, "use a value above 0 (1: one learning rate)")
        need(self.ema_epochs >= 0, "--ema-epochs", self.ema_epochs, "use 0 (off) or a time constant in epochs such as 0.25")
        need(0 < self.crop_scale <= 1, "--crop-scale", self.crop_scale, "use a share of the image in (0, 1]")
        need(self.bn in BN_POLICIES, "--bn", self.bn, f"use one of {', '.join(BN_POLICIES)}")
        need(self.threads is None or self.threads >= 1, "--threads", self.threads, "use 1 or more")
        need(isinstance(self.head_epochs, int) and self.head_epochs >= 0, "--head-epochs", self.head_epochs,
             "use a whole number, 0 or more")
        need(self.mode not in ("staged", "auto") or self.head_epochs >= 1, "--head-epochs", self.head_epochs,
             f"--mode {self.mode} trains the head first; use 1 or more")
        need(self.head_lr is None or self.head_lr > 0, "--head-lr", self.head_lr, "use a positive learning rate")
        need(self.mixup >= 0, "--mixup", self.mixup, "use 0 (off) or a Beta alpha such as 0.2")
        need(self.cutmix >= 0, "--cutmix", self.cutmix, "use 0 (off) or a Beta alpha such as 1.0")
        need(self.precision in PRECISIONS, "--precision", self.precision, f"use one of {', '.join(PRECISIONS)}")
        need(self.workers is None or self.workers >= 0, "--workers", self.workers, "use 0 or more")
        if self.mode == "auto":
            parse_duration(self.budget)
        elif self.budget is not None:
            raise UsageError(f"--budget {self.budget}: only --mode auto plans to a budget; add --mode auto or "
                             "drop --budget.")
        from .callbacks import parse_log

        parse_log(self.log)
        need(self.decode_cache_gb >= 0, "--decode-cache-gb", self.decode_cache_gb, "use 0 (no cache) or more")
        need(self.frozen_cache_gb >= 0, "--frozen-cache-gb", self.frozen_cache_gb, "use 0 (no cache) or more")

    def with_bn_policy(self, policy: str, far: bool = False) -> "TrainConfig":
        """--bn auto decided: the policy, and its optimizer and step where the user gave none (`far`:
        frozen statistics on a domain far from the backbone's, FAR_DOMAIN_RECIPE)."""
        return TrainConfig(**_with_bn_recipe(asdict(self), policy, far))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _with_bn_recipe(values: dict, policy: str, far: bool = False) -> dict:
    recipe = FAR_DOMAIN_RECIPE if far and policy == "frozen" else BN_RECIPES[policy]
    return {**values, "bn": policy, **{k: v for k, v in recipe.items() if values[k] is None}}


def field_docs() -> dict[str, str]:
    """Each TrainConfig field's docstring (the string literal below it), whitespace collapsed: the
    command line's help, so that a setting is described once."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def read_settings_file(path: str | Path) -> dict:
    """TrainConfig fields from a YAML or JSON file, or from a run's own config.json (whose run folder
    is left out, so that the repeat gets a new one)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file; pass a YAML or JSON file of training settings.")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            settings = yaml.safe_load(text)
        else:
            settings = json.loads(text)
    except Exception as exc:
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"--config {path}: is not valid {kind} ({first}); fix the file.") from None
    if isinstance(settings, dict) and isinstance(settings.get("config"), dict) and "data" in settings:
        settings = {k: v for k, v in settings["config"].items() if k != "out"}  # a run folder's config.json
    if not isinstance(settings, dict):
        raise UsageError(f"--config {path}: must hold a mapping of setting names to values (epochs: 10).")
    unknown = sorted(set(settings) - set(TrainConfig.field_names()))
    if unknown:
        raise UsageError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; the settings are the long "
                         "flags of `visiontune train --help` with _ for -.")
    return settings


def parse_duration(text: str, flag: str = "--budget") -> float:
    """Seconds in "90", "90s", "5m", "1h", "2m30s"."""
    value = str(text).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", value)
    if not value or parts is None or not any(parts.groups()):
        raise UsageError(f"{flag} {text!r} is invalid: use a duration such as 90s, 5m or 1h.")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise UsageError(f"{flag} {text!r} is invalid: use a duration above zero, such as 5m.")
    return total
