"""Observers of a training run: user callbacks and the experiment loggers (TensorBoard, MLflow).

A callback has any of `on_step_end(step)`, `on_epoch_end(epoch)`, `on_run_end(run)`. Each receives
a frozen snapshot of plain values (numbers, strings, read-only mappings), never the model, the
optimizer or the loop's own state: an observer reads, it cannot change the run. A callback that
raises is reported once on stderr and not called again; the run goes on.

    class PrintLoss:
        def on_epoch_end(self, epoch):
            print(epoch.epoch, epoch.metrics["val_acc"])

    visiontune.train("photos/", callbacks=[PrintLoss()])
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from collections.abc import Mapping

LOGGERS = ("tensorboard", "mlflow", "none")


@dataclass(frozen=True)
class StepEnd:
    epoch: int
    step: int
    """Optimizer steps taken in the run so far, this one included."""
    stage: str
    loss: float
    """Mean per-sample training loss of this step's samples (this process's)."""
    lr: float
    """The largest learning rate of the optimizer's groups for this step."""


@dataclass(frozen=True)
class EpochEnd:
    epoch: int
    stage: str
    metrics: Mapping[str, float | int | str]
    """The epoch's metrics.csv row: train_loss, train_acc, val_loss, val_acc, lr, seconds, stage."""
    images_per_second: float
    best_epoch: int
    run_dir: str


@dataclass(frozen=True)
class RunEnd:
    run_dir: str
    classes: tuple[str, ...]
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    metrics: tuple[Mapping, ...]
    config: Mapping
    seconds: float
    val_probabilities: object = None
    """The best epoch's probabilities per val image (rows in splits/val.csv's order; a read-only numpy
    array), or None where they were not kept (under torchrun, or after a resume)."""


def parse_log(value: str) -> tuple[str, ...]:
    """--log tensorboard (default), mlflow, tensorboard,mlflow or none."""
    from .errors import UsageError

    names = tuple(dict.fromkeys(part.strip().lower() for part in str(value).split(",") if part.strip()))
    if not names or any(n not in LOGGERS for n in names) or ("none" in names and len(names) > 1):
        raise UsageError(f"--log {value!r} is invalid: use tensorboard, mlflow, tensorboard,mlflow or none.")
    return () if names == ("none",) else names


def frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


class CallbackList:
    """Calls each observer's hooks; one that fails is said once and dropped."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def wants(self, hook: str) -> bool:
        return any(callable(getattr(c, hook, None)) for c in self.callbacks)

    def call(self, hook: str, info) -> None:
        for callback in list(self.callbacks):
            method = getattr(callback, hook, None)
            if not callable(method):
                continue
            try:
                method(info)
            except Exception as exc:  # an observer's bug must not end a long run
                self.callbacks.remove(callback)
                print(f"warning: callback {type(callback).__name__}.{hook} failed ({type(exc).__name__}: {exc}); "
                      "it is not called again, the run goes on", file=sys.stderr, flush=True)


class TensorBoardLogger:
    """RUN/tensorboard: scalars per step and per epoch, then the confusion matrix and the mistakes grid.

    `tensorboard --logdir runs/` shows every run side by side.
    """

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.directory = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.directory))

    def on_step_end(self, step: StepEnd) -> None:
        self.writer.add_scalar("step/train_loss", step.loss, step.step)
        self.writer.add_scalar("step/lr", step.lr, step.step)

    def on_epoch_end(self, epoch: EpochEnd) -> None:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            self.writer.add_scalar(f"epoch/{key}", float(epoch.metrics[key]), epoch.epoch)
        self.writer.add_scalar("epoch/images_per_second", epoch.images_per_second, epoch.epoch)
        self.writer.flush()

    def on_run_end(self, run: RunEnd) -> None:
        from .evaluation import evaluate_run, scores_result
        from .report import confusion_figure, mistakes_figure
        from .errors import env_world

        self.writer.add_text("run", f"best epoch {run.best_epoch}: val acc {run.best_val_acc:.4f}, val loss "
                                    f"{run.best_val_loss:.4f}; {run.seconds:.1f}s", run.best_epoch)
        if env_world()[2] > 1:
            # Under torchrun only rank 0 observes, and evaluate_run would wait for the other ranks to
            # share the val images: the figures are left to `visiontune report RUN`.
            self.writer.close()
            return
        result = scores_result(run.run_dir, run.val_probabilities, run.best_val_loss) \
            if run.val_probabilities is not None else None
        if result is None:
            result = evaluate_run(run.run_dir, keep_items=True, device=str(run.config.get("device", "auto")))
        if "confusion_matrix" in result:  # one class per image
            self.writer.add_figure("val/confusion_matrix",
                                   confusion_figure(result["confusion_matrix"], list(run.classes)), run.best_epoch)
        mistakes = sorted((i for i in result["items"] if i["true"] != i["predicted"]), key=lambda i: -i["probability"])
        self.writer.add_figure("val/mistakes", mistakes_figure(mistakes[:16]), run.best_epoch)
        self.writer.close()


class MLflowLogger:
    """An MLflow run: the settings as params, each epoch's metrics, the run folder as artifacts.

    Where it logs is MLflow's choice (MLFLOW_TRACKING_URI, or its default local store).
    """

    def __init__(self, run_dir: str | Path, config: Mapping):
        import mlflow

        self.mlflow = mlflow
        self.run_dir = Path(run_dir)
        self.active = mlflow.start_run(run_name=self.run_dir.name)
        mlflow.log_params({k: ("" if v is None else v) for k, v in config.items()})

    def on_epoch_end(self, epoch: EpochEnd) -> None:
        self.mlflow.log_metrics({k: float(epoch.metrics[k]) for k in ("train_loss", "train_acc", "val_loss",
                                                                        "val_acc", "lr")}
                                | {"images_per_second": epoch.images_per_second}, step=epoch.epoch)

    def on_run_end(self, run: RunEnd) -> None:
        self.mlflow.log_metrics({"best_val_acc": run.best_val_acc, "best_val_loss": run.best_val_loss,
                                 "best_epoch": run.best_epoch})
        self.mlflow.log_artifacts(str(self.run_dir))
        self.mlflow.end_run()


def loggers_for(log: str, run_dir: str | Path, config: Mapping) -> list:
    from .errors import UsageError

    names = parse_log(log)
    loggers = []
    if "tensorboard" in names:
        try:
            loggers.append(TensorBoardLogger(run_dir))
        except ImportError:
            raise UsageError("--log tensorboard: the tensorboard package is not installed; pip install tensorboard, "
                             "or pass --log none.") from None
    if "mlflow" in names:
        try:
            loggers.append(MLflowLogger(run_dir, config))
        except ImportError:
            raise UsageError("--log mlflow: MLflow is not installed; pip install mlflow (or mlflow-skinny), or use "
                             "--log tensorboard.") from None
        except Exception as exc:  # MLflow's own refusal (its tracking URI, its store): its first sentence
            first = str(exc).split(". ")[0].strip() or type(exc).__name__
            raise UsageError(f"--log mlflow: MLflow could not start a run ({first}); check MLFLOW_TRACKING_URI, "
                             "or use --log tensorboard.") from None
    return loggers
