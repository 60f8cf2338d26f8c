"""Training settings as one validated dataclass; each error names its flag."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import UsageError

DEFAULT_BACKBONE = "efficientnet_lite0"
MODES = ("finetune", "fixed")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "onecycle", "constant")
AUGMENTS = ("none", "light", "strong")
SAMPLERS = ("random", "balanced")
CLASS_WEIGHTS = ("none", "auto")
HEAD_INITS = ("probe", "random")
BN_POLICIES = ("frozen", "train")

# Per-mode defaults; chosen by measurement on hymenoptera (docs/performance.md).
MODE_DEFAULTS = {
    "finetune": {"epochs": 3, "lr": 0.003, "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 0.0,
                 "head_init": "probe"},
    "fixed": {"epochs": 25, "lr": 0.01, "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 0.0,
              "head_init": "random"},
}


@dataclass
class TrainConfig:
    """Everything that defines a training run. `None` means "the mode's default"."""

    data: str
    """Folder (tutorial layout or class folders), CSV of path,label[,split], or a known data set name."""
    mode: str = "finetune"
    """finetune: train every weight; fixed: frozen backbone (BatchNorm statistics too), new head only."""
    model: str = DEFAULT_BACKBONE
    """Registered backbone name (`visiontune models`) or any timm architecture."""
    weights: str | None = None
    """Weights file (.safetensors or state dict) for the backbone, instead of bundled/hub weights."""
    epochs: int | None = None
    batch_size: int = 32
    """Training batch size; 32 keeps BatchNorm statistics stable and the CPU busy."""
    eval_batch_size: int = 32
    """Batch size of evaluation and feature extraction (throughput is flat above 32 on a CPU; memory is not)."""
    lr: float | None = None
    """Peak learning rate for a batch of `batch_size`."""
    optimizer: str | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    """Applied to weights of convolutions and linear layers only, not to norms and biases."""
    schedule: str | None = None
    """cosine (per step, after linear warmup), step (x0.1 every 7 epochs: the tutorial's),
    onecycle (30% linear rise from lr/25, then cosine down to lr/1e4), constant."""
    warmup_epochs: float | None = None
    bn: str = "train"
    """Fine-tune BatchNorm policy. train: statistics follow the training batches (measured best on
    hymenoptera, docs/performance.md); frozen: running statistics stay the pretrained ones (layers in
    eval mode, affine weights still trained), as Keras recommends."""
    label_smoothing: float = 0.0
    augment: str = "light"
    """Training augmentation: none (center crop, as in eval), light (random resized crop 25-100% + flip),
    strong (light + TrivialAugmentWide)."""
    class_weights: str = "none"
    """auto: weight each class's loss by N / (classes * count), for imbalanced data (training loss only;
    val loss stays the plain mean cross-entropy so epochs and runs compare)."""
    sampler: str = "random"
    """balanced: draw training images with probability inversely proportional to their class size."""
    accumulate: int = 1
    """Optimizer step every K batches, on the gradient of all K*B samples."""
    patience: int | None = None
    """Stop when val has not improved (accuracy, then loss) for this many epochs."""
    lr_decay: float | None = None
    """Layer-wise learning-rate decay for fine-tuning: each block group from the head down gets lr
    multiplied by this factor once more (e.g. 0.7); None: one learning rate."""
    seed: int = 0
    out: str | None = None
    """Run folder; default runs/<data name>-<mode>[-N]."""
    val_fraction: float = 0.2
    """Share of each class held out for val when the data has no val split."""
    views: int = 1
    """Fixed mode: feature views per training image; view 0 is un-augmented, the others augmented."""
    image_size: int | None = None
    """Evaluation input size; default from the backbone's data config."""
    train_size: int | None = None
    """Fine-tune training crop size; default 5/7 of the eval size (160 for 224): about 2x cheaper
    steps, and training at a lower resolution than testing does not cost accuracy (FixRes)."""
    head_init: str | None = None
    """Fine-tune: "probe" fits the new head on cached backbone features first (linear probe, then
    fine-tune: LP-FT), so the backbone is not disturbed by a random head; "random" starts cold."""
    channels_last: bool = True
    """NHWC memory layout: about 1.7x faster convolutions on CPU for EfficientNet."""
    threads: int | None = None
    """Intra-op threads; default: the machine's cores."""
    cache_dir: str | None = None
    """Where decoded images and features are cached; default ~/.cache/visiontune."""
    decode_cache_gb: float = 8.0
    """Upper bound for newly cached decoded images; past it images are decoded every epoch."""
    feature_cache: bool = True
    """Fixed mode: compute backbone features once and train the head on them."""
    strict: bool = False
    """Stop on unreadable images instead of leaving them out with a warning."""
    quiet: bool = False

    def resolved(self) -> "TrainConfig":
        """A copy with mode defaults filled in, validated."""
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}.")
        values = asdict(self)
        for key, default in MODE_DEFAULTS[self.mode].items():
            if values[key] is None:
                values[key] = default
        cfg = TrainConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok: bool, flag: str, value, fix: str) -> None:
            if not ok:
                raise UsageError(f"{flag} {value!r} is invalid: {fix}.")

        need(isinstance(self.epochs, int) and self.epochs >= 1, "--epochs", self.epochs, "use a whole number of at least 1")
        need(self.batch_size >= 1, "--batch-size", self.batch_size, "use 1 or more")
        need(self.eval_batch_size >= 1, "--eval-batch-size", self.eval_batch_size, "use 1 or more")
        need(self.lr is not None and self.lr > 0, "--lr", self.lr, "use a positive learning rate such as 0.01")
        need(self.optimizer in OPTIMIZERS, "--optimizer", self.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
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
        need(self.bn in BN_POLICIES, "--bn", self.bn, f"use one of {', '.join(BN_POLICIES)}")
        need(self.threads is None or self.threads >= 1, "--threads", self.threads, "use 1 or more")
        need(self.decode_cache_gb >= 0, "--decode-cache-gb", self.decode_cache_gb, "use 0 (no cache) or more")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
