"""`train()`: data -> model -> epochs of train/val -> a run folder. Reads top to bottom."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import backbones, checkpoint
from .config import TrainConfig
from .data import ImageDataset, Splits, discover
from .engine import EpochStats, NonFiniteLoss, evaluate, is_better, train_one_epoch
from .errors import DataError, UsageError, VisiontuneError
from .features import FeatureBatches, FeatureCache, extract_features, fold_batchnorm
from .images import DecodeCache, decode_array, default_cache_dir
from .known.datasets import resolve_dataset
from .memory import release_freed_memory
from .recipes import inverse_frequency_weights, lr_multiplier, make_optimizer, make_sampler
from .preprocess import EvalTransform, Preprocessing, TrainTransform, normalize_batch

METRICS_HEADER = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


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


def train(data: str | Path, **settings) -> Run:
    """Fine-tune (mode="finetune") or train a new head on a fixed backbone (mode="fixed").

    `settings` are the fields of `TrainConfig` (epochs, lr, batch_size, model, out, seed, ...).
    """
    unknown = set(settings) - set(TrainConfig.field_names())
    if unknown:
        raise UsageError(f"train() got unknown setting(s) {', '.join(sorted(unknown))}; see visiontune.TrainConfig.")
    return run_training(TrainConfig(data=str(data), **settings).resolved())


def resume(run_dir: str | Path, quiet: bool = False) -> Run:
    """Continue a run from its last.ckpt; the result equals the uninterrupted run (on CPU, bitwise)."""
    run_dir = Path(run_dir)
    config_path, state_path = run_dir / "config.json", run_dir / checkpoint.LAST_CHECKPOINT
    if not config_path.is_file() or not state_path.is_file():
        raise UsageError(f"--resume {run_dir}: has no config.json and last.ckpt; pass a run folder written by "
                         "`visiontune train`.")
    settings = json.loads(config_path.read_text())["config"]
    cfg = TrainConfig(**{**settings, "out": str(run_dir), "quiet": quiet or settings.get("quiet", False)})
    state = checkpoint.load_training_state(state_path)
    if state["epoch"] >= cfg.epochs:
        raise UsageError(f"--resume {run_dir}: the run already finished all {cfg.epochs} epochs.")
    return run_training(cfg.resolved(), resume_state=state)


class Interrupted(VisiontuneError):
    exit_code = 130


def resolve_data(cfg: TrainConfig) -> Splits:
    root = resolve_dataset(cfg.data) or Path(cfg.data)
    return discover(root, val_fraction=cfg.val_fraction, seed=cfg.seed)


def choose_run_dir(cfg: TrainConfig, splits: Splits) -> Path:
    if cfg.out is not None:
        out = Path(cfg.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out}: already exists and is not empty; choose a new folder or delete it first.")
        return out
    stem = Path("runs") / f"{(Path(cfg.data).name or 'data').removesuffix('.csv')}-{cfg.mode}"
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


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _progress(quiet: bool):
    from tqdm import tqdm

    show = not quiet and sys.stderr.isatty()

    def wrap(iterable, total=None, desc=""):
        return tqdm(iterable, total=total, desc=desc, leave=False, disable=not show, file=sys.stderr)

    return wrap


def _say(cfg: TrainConfig, message: str) -> None:
    if not cfg.quiet:
        print(message, flush=True)


def write_splits(run_dir: Path, splits: Splits) -> None:
    folder = run_dir / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in splits.samples.items():
        with (folder / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            for path, label in items:
                writer.writerow([str(path), splits.classes[label]])


def run_training(cfg: TrainConfig, resume_state: dict | None = None) -> Run:
    started = time.perf_counter()
    splits = resolve_data(cfg)
    run_dir = Path(cfg.out) if resume_state is not None else choose_run_dir(cfg, splits)
    backbone = backbones.resolve(cfg.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    generator = seed_everything(cfg.seed)
    classes = splits.classes
    model, weights_source = backbones.build_classifier(cfg.model, len(classes), Path(cfg.weights) if cfg.weights else None)
    pre = Preprocessing.from_data_config(backbones.data_config(model), cfg.image_size)
    # Record the sizes actually used, so config.json is complete without the backbone at hand.
    cfg = replace(cfg, image_size=pre.size, train_size=cfg.train_size or (
        _default_train_size(pre.size) if cfg.mode == "finetune" else pre.size))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    progress = _progress(cfg.quiet)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    decode = DecodeCache(pre.resize, pre.interpolation, cache_dir, int(cfg.decode_cache_gb * (1 << 30))) \
        if cfg.decode_cache_gb > 0 else (lambda p: decode_array(p, pre.resize, pre.interpolation))
    # Every image is decoded once before the first epoch, so a bad file can never stop training mid-epoch.
    excluded = _screen_images(decode, [p for items in splits.samples.values() for p, _ in items], progress)
    if excluded:
        if cfg.strict:
            first = next(iter(excluded.items()))
            raise DataError(f"{len(excluded)} image(s) cannot be used, e.g. {first[0]}: {first[1]}; fix or remove "
                            "them (visiontune doctor DATA lists all), or drop --strict to leave them out.")
        splits.samples = {s: [(p, y) for p, y in items if str(p) not in excluded] for s, items in splits.samples.items()}
        shown = "; ".join(f"{Path(p).name}: {why}" for p, why in list(excluded.items())[:3])
        print(f"warning: left out {len(excluded)} unreadable image(s) (listed in {run_dir / 'excluded.csv'}): "
              f"{shown}{' ...' if len(excluded) > 3 else ''}", file=sys.stderr)
    if resume_state is not None:
        _check_same_splits(run_dir, splits)

    ensure_writable(run_dir)
    if excluded and resume_state is None:
        with (run_dir / "excluded.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows(excluded.items())
    if resume_state is None:
        checkpoint.write_json(run_dir / "config.json", {
            "config": cfg.to_json(),
            "data": {"root": str(splits.root.resolve()), "layout": splits.layout, "classes": classes,
                     "counts": splits.counts(), "auto_split": splits.auto_split},
        })
        write_splits(run_dir, splits)
    model_meta = {
        "format_version": checkpoint.FORMAT_VERSION,
        "backbone": backbone.name,
        "architecture": backbone.timm_name,
        "classes": classes,
        "preprocessing": pre.to_json(),
        "weights_source": weights_source,
        "mode": cfg.mode,
    }

    train_items, val_items = splits.samples["train"], splits.samples["val"]
    prepare = lambda images: normalize_batch(images, pre, cfg.channels_last)  # noqa: E731
    classifier = model.get_classifier()
    frozen = freeze_for_mode(cfg, model)

    feature_cache = FeatureCache(cache_dir, {"arch": backbone.timm_name, "weights": weights_source,
                                             "pre": pre.to_json(), "channels_last": cfg.channels_last,
                                             "folded_bn": True})

    def features_of(items: list[tuple[Path, int]], views: int) -> torch.Tensor:
        return extract_features(model, [p for p, _ in items], decode, pre, views, cfg.seed,
                                feature_cache if cfg.feature_cache else None, cfg.eval_batch_size,
                                cfg.channels_last, progress)

    train_labels = torch.tensor([y for _, y in train_items])
    if cfg.mode == "fixed" and cfg.feature_cache:
        # The backbone is a fixed function: compute its features once, train the head on them.
        trainable: nn.Module = classifier
        train_batches = FeatureBatches(features_of(train_items, cfg.views), train_labels, cfg.batch_size, generator,
                                       sampler=make_sampler(cfg, range(len(train_items)), train_labels, generator))
        val_features = features_of(val_items, 1)[0]
        val_labels = torch.tensor([y for _, y in val_items])
        val_batches = list(zip(val_features.split(cfg.eval_batch_size), val_labels.split(cfg.eval_batch_size)))
        step_prepare = lambda x: x  # noqa: E731
        frozen_for_step: list[nn.Module] = []
    else:
        if cfg.mode == "finetune" and cfg.head_init == "probe" and resume_state is None:
            fit_probe(classifier, features_of(train_items, 1), train_labels, cfg, generator)
            release_freed_memory()
        trainable = model
        if cfg.mode == "fixed" and cfg.views == 1:
            train_transform = EvalTransform(pre)  # the same single un-augmented view as the cached path
        else:
            train_transform = TrainTransform(pre, cfg.train_size, strength=cfg.augment)
        remainder = len(train_items) % cfg.batch_size
        train_batches = torch.utils.data.DataLoader(
            train_set := ImageDataset(train_items, decode, train_transform), batch_size=cfg.batch_size,
            # The generator goes to the sampler only: given to the DataLoader it would also be drawn
            # from for worker seeds, and the order would differ from the cached-feature path's.
            sampler=make_sampler(cfg, train_set, train_labels, generator), num_workers=0,
            # A last batch of one sample breaks BatchNorm in train mode; drop it then.
            drop_last=remainder == 1 and cfg.mode == "finetune")
        val_batches = torch.utils.data.DataLoader(
            ImageDataset(val_items, decode, EvalTransform(pre)), batch_size=cfg.eval_batch_size, shuffle=False)
        step_prepare = prepare
        frozen_for_step = frozen

    params = [(n, p) for n, p in trainable.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, trainable if cfg.mode == "finetune" else None)
    steps_per_epoch = math.ceil(len(train_batches) / cfg.accumulate)
    class_weights = inverse_frequency_weights(train_labels, len(classes)) if cfg.class_weights == "auto" else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(cfg.schedule, step, steps_per_epoch, cfg.epochs, cfg.warmup_epochs))

    run = Run(path=run_dir, config=cfg, classes=classes)
    metrics_path = run_dir / "metrics.csv"
    best_state: dict[str, torch.Tensor] | None = None
    best: tuple[float, float] | None = None
    first_epoch = 1
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        checkpoint.set_rng_state(resume_state["rng"], generator)
        run.metrics = list(resume_state["metrics"])
        if resume_state["best"] is not None:
            run.best_epoch, run.best_val_acc, run.best_val_loss = resume_state["best"]
            best = (run.best_val_acc, run.best_val_loss)
            best_state = checkpoint.load_weights(run_dir / checkpoint.BEST_WEIGHTS)
        first_epoch = resume_state["epoch"] + 1
        _say(cfg, f"resuming {run_dir} after epoch {resume_state['epoch']}")
    # Rewritten from the checkpoint on resume: drops any row of an epoch that did not finish.
    with metrics_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRICS_HEADER)
        writer.writerows(_metrics_cells(row) for row in run.metrics)

    def save_state(epoch: int) -> None:
        checkpoint.save_training_state(run_dir / checkpoint.LAST_CHECKPOINT, {
            "format_version": checkpoint.FORMAT_VERSION, "epoch": epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": checkpoint.rng_state(generator), "metrics": run.metrics,
            "best": (run.best_epoch, run.best_val_acc, run.best_val_loss) if best else None})

    if resume_state is None:
        save_state(0)  # so that even a run stopped in its first epoch can be resumed
    stop = _StopOnSigint()
    with stop:
        for epoch in range(first_epoch, cfg.epochs + 1):
            epoch_start = time.perf_counter()
            try:
                train_stats: EpochStats = train_one_epoch(
                    trainable, progress(train_batches, steps_per_epoch, f"epoch {epoch} train"), optimizer,
                    step_prepare, scheduler, frozen_for_step, class_weights=class_weights,
                    label_smoothing=cfg.label_smoothing, should_stop=stop.requested, accumulate=cfg.accumulate)
            except NonFiniteLoss as exc:
                raise VisiontuneError(
                    f"training stopped: the loss became {exc.value} at epoch {epoch}, step {exc.step}; likely a "
                    f"learning rate too high (--lr {cfg.lr}) or bad input; the last good state is "
                    f"{run_dir / checkpoint.LAST_CHECKPOINT} (epoch {epoch - 1}).") from None
            if not train_stats.completed:
                raise Interrupted(
                    f"interrupted in epoch {epoch}; the state after epoch {epoch - 1} is saved in "
                    f"{run_dir / checkpoint.LAST_CHECKPOINT}; continue with: visiontune train --resume {run_dir}")
            release_freed_memory()
            # In eval mode BatchNorm is a fixed affine map: a folded copy evaluates about 1.5x faster.
            eval_model = fold_batchnorm(trainable, pre.size) if trainable is model else trainable
            val_stats = evaluate(eval_model, progress(val_batches, len(val_batches), f"epoch {epoch} val"),
                                 step_prepare, label_smoothing=cfg.label_smoothing)
            del eval_model
            # The learning rate of the epoch's last optimizer step (the scheduler already points past it).
            lr = cfg.lr * lr_multiplier(cfg.schedule, epoch * steps_per_epoch - 1, steps_per_epoch, cfg.epochs,
                                        cfg.warmup_epochs)
            row = {"epoch": epoch, "train_loss": train_stats.loss, "train_acc": train_stats.accuracy,
                   "val_loss": val_stats.loss, "val_acc": val_stats.accuracy, "lr": lr,
                   "seconds": time.perf_counter() - epoch_start}
            run.metrics.append(row)
            with metrics_path.open("a", newline="") as f:
                csv.writer(f).writerow(_metrics_cells(row))
            _say(cfg, f"epoch {epoch}/{cfg.epochs}  train loss {train_stats.loss:.4f} acc {train_stats.accuracy:.4f}  "
                      f"val loss {val_stats.loss:.4f} acc {val_stats.accuracy:.4f}  lr {lr:.2e}  {row['seconds']:.1f}s")
            if is_better(val_stats.accuracy, val_stats.loss, best):
                best = (val_stats.accuracy, val_stats.loss)
                run.best_epoch, run.best_val_acc, run.best_val_loss = epoch, val_stats.accuracy, val_stats.loss
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                checkpoint.save_weights(run_dir / checkpoint.BEST_WEIGHTS, best_state)
                checkpoint.write_json(run_dir / checkpoint.MODEL_JSON, {
                    **model_meta, "best_epoch": epoch, "val_acc": val_stats.accuracy, "val_loss": val_stats.loss})
            save_state(epoch)
            if cfg.patience is not None and epoch - run.best_epoch >= cfg.patience:
                _say(cfg, f"early stop: val has not improved for {cfg.patience} epochs")
                break

    # The run's result is the best epoch's weights, not the last epoch's.
    model.load_state_dict(best_state)
    model.eval()
    run.model = model
    run.seconds = time.perf_counter() - started
    _say(cfg, f"best epoch {run.best_epoch}: val acc {run.best_val_acc:.4f} (val loss {run.best_val_loss:.4f}); "
              f"run folder {run_dir}")
    return run


PROBE_EPOCHS = 10


def freeze_for_mode(cfg: TrainConfig, model: nn.Module) -> list[nn.Module]:
    """Set requires_grad for the mode; return the modules that must stay in eval mode while training.

    fixed: everything but the classifier is frozen, BatchNorm statistics included.
    finetune with --bn frozen: every BatchNorm keeps its running statistics (its affine weights train).
    """
    classifier = model.get_classifier()
    if cfg.mode == "fixed":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in classifier.parameters():
            p.requires_grad_(True)
        return [m for m in model.children() if m is not classifier]
    if cfg.bn == "frozen":
        return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return []


def prepare_training(cfg: TrainConfig):
    """Model, training batches, input preparation, optimizer and frozen modules as `train` would build
    them (image loop, no run folder, no probe): for tools such as lr-find that must not touch a run."""
    splits = resolve_data(cfg)
    model, _ = backbones.build_classifier(cfg.model, len(splits.classes), Path(cfg.weights) if cfg.weights else None)
    pre = Preprocessing.from_data_config(backbones.data_config(model), cfg.image_size)
    train_size = cfg.train_size or (_default_train_size(pre.size) if cfg.mode == "finetune" else pre.size)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    decode = DecodeCache(pre.resize, pre.interpolation, cache_dir)
    excluded = _screen_images(decode, [p for p, _ in splits.samples["train"]], lambda it, total, desc: it)
    items = [(p, y) for p, y in splits.samples["train"] if str(p) not in excluded]
    labels = torch.tensor([y for _, y in items])
    generator = seed_everything(cfg.seed)
    dataset = ImageDataset(items, decode, TrainTransform(pre, train_size, strength=cfg.augment))
    batches = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=0,
                                          sampler=make_sampler(cfg, dataset, labels, generator),
                                          drop_last=len(items) % cfg.batch_size == 1)
    frozen = freeze_for_mode(cfg, model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, model if cfg.mode == "finetune" else None)
    return model, batches, (lambda images: normalize_batch(images, pre, cfg.channels_last)), optimizer, frozen


def _metrics_cells(row: dict) -> list:
    # repr keeps every bit of the float, so a resumed run's file can equal an uninterrupted one's.
    return [row[k] if k == "epoch" else f"{row[k]:.6g}" if k in ("lr", "seconds") else repr(row[k])
            for k in METRICS_HEADER]


def _check_same_splits(run_dir: Path, splits: Splits) -> None:
    for split, items in splits.samples.items():
        path = run_dir / "splits" / f"{split}.csv"
        with path.open(newline="") as f:
            recorded = [(row["path"], row["label"]) for row in csv.DictReader(f)]
        if recorded != [(str(p), splits.classes[y]) for p, y in items]:
            raise UsageError(f"--resume {run_dir}: the {split} images differ from those the run started with; "
                             "restore the data or start a new run.")


class _StopOnSigint:
    """Ctrl-C asks the loop to stop after the current step instead of killing it mid-write.

    A second Ctrl-C falls through to Python's default (KeyboardInterrupt).
    Only installed in the main thread (signal handlers cannot be set elsewhere).
    """

    def __init__(self):
        self.flag = False
        self.previous = None

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

        if threading.current_thread() is threading.main_thread():
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
    gradients into the pretrained backbone.
    """
    batches = FeatureBatches(features, labels, cfg.batch_size, generator)
    optimizer = make_optimizer(cfg, list(classifier.named_parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier("cosine", step, len(batches), PROBE_EPOCHS, 0.0))
    for _ in range(PROBE_EPOCHS):
        train_one_epoch(classifier, batches, optimizer, scheduler=scheduler, label_smoothing=cfg.label_smoothing)


def _default_train_size(eval_size: int) -> int:
    return max(32, int(round(eval_size * 5 / 7 / 16)) * 16)


def _screen_images(decode, paths: list[Path], progress) -> dict[str, str]:
    """Decode every image once (two threads: Pillow releases the GIL); return {path: reason} of failures.

    With the decode cache, a good image is decoded only on the first run and a
    bad one is remembered as bad (keyed by size and mtime), so later runs screen
    from the cache.
    """
    def attempt(path: Path) -> str | None:
        try:
            decode(path)
            return None
        except Exception as exc:  # any failure to read or decode leaves the image out
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(progress(pool.map(attempt, paths), len(paths), "checking images"))
    return {str(p): why for p, why in zip(paths, reasons) if why is not None}
