"""A run folder: the one place that names a run's files and knows what each holds.

    runs/<name>/
      config.json        resolved settings, data root, layout, class counts, processes
      metrics.csv        one row per epoch (epoch 0: the linear probe of a fine-tune run)
      best.safetensors   the best epoch's weights          model.json   all that prediction needs
      last.ckpt          resumable state (weights_only)    splits/<split>.csv   the images of each split
      excluded.csv       unreadable images left out        duplicates.csv   files identical across splits
      auto.json          --mode auto's decision            report.html, model.onnx, model.pt   on request
      tensorboard/       event files (--log tensorboard, the default)

Formats (atomic writes, safetensors, pickle-free checkpoints) live in checkpoint.py; this module says
which file is which, so that train, resume, eval, report, export and predict agree on one layout.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .data import label_name, parse_label
from .shards import sample_path
from .errors import UsageError

METRICS_HEADER = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "stage"]


def _metrics_cells(row: dict) -> list:
    # repr keeps every bit of the float, so a resumed run's file can equal an uninterrupted one's.
    return [row[k] if k in ("epoch", "stage") else f"{row[k]:.6g}" if k in ("lr", "seconds") else repr(row[k])
            for k in METRICS_HEADER]


class RunFolder:
    """The files of one run folder; every other module asks this class for them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.json")
    metrics_file = property(lambda self: self.path / "metrics.csv")
    best_weights_file = property(lambda self: self.path / "best.safetensors")
    model_json_file = property(lambda self: self.path / "model.json")
    last_checkpoint_file = property(lambda self: self.path / "last.ckpt")
    excluded_file = property(lambda self: self.path / "excluded.csv")
    duplicates_file = property(lambda self: self.path / "duplicates.csv")
    auto_decision_file = property(lambda self: self.path / "auto.json")
    report_file = property(lambda self: self.path / "report.html")

    def split_file(self, split: str) -> Path:
        return self.path / "splits" / f"{split}.csv"

    def export_file(self, suffix: str) -> Path:
        return self.path / f"model{suffix}"

    def __str__(self) -> str:
        return str(self.path)

    # --- settings -----------------------------------------------------------------------------------

    def write_config(self, data: dict) -> None:
        checkpoint.write_json(self.config_file, data)

    def read_config(self) -> dict:
        return json.loads(self.config_file.read_text())

    # --- metrics ------------------------------------------------------------------------------------

    def write_metrics(self, rows: list[dict]) -> None:
        """The header and `rows`; on resume this drops any row of an epoch that did not finish."""
        with self.metrics_file.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(METRICS_HEADER)
            writer.writerows(_metrics_cells(row) for row in rows)

    def append_metrics(self, row: dict) -> None:
        with self.metrics_file.open("a", newline="") as f:
            csv.writer(f).writerow(_metrics_cells(row))

    def read_metrics(self) -> list[dict]:
        with self.metrics_file.open(newline="") as f:
            return list(csv.DictReader(f))

    # --- weights and state --------------------------------------------------------------------------

    def save_best(self, state: dict[str, torch.Tensor], meta: dict) -> None:
        """best.safetensors and its model.json, the pair prediction reads."""
        checkpoint.save_weights(self.best_weights_file, state)
        checkpoint.write_json(self.model_json_file, meta)

    def load_best_weights(self) -> dict[str, torch.Tensor]:
        return checkpoint.load_weights(self.best_weights_file)

    def save_last(self, state: dict) -> None:
        checkpoint.save_training_state(self.last_checkpoint_file, state)

    def load_last(self) -> dict:
        return checkpoint.load_training_state(self.last_checkpoint_file)

    def read_model_json(self) -> dict:
        if not self.model_json_file.is_file():
            raise UsageError(f"RUN {self.path}: has no {self.model_json_file.name}; pass a run folder written by "
                             "`visiontune train`.")
        meta = json.loads(self.model_json_file.read_text())
        if meta.get("format_version", 0) > checkpoint.FORMAT_VERSION:
            raise UsageError(f"RUN {self.path}: was written by a newer visiontune; upgrade visiontune to read it.")
        return meta

    def load_model(self) -> tuple[nn.Module, dict]:
        """The trained classifier, rebuilt from model.json and best.safetensors, in eval mode."""
        from .backbones import build_architecture

        meta = self.read_model_json()
        if not self.best_weights_file.is_file():
            raise UsageError(f"RUN {self.path}: has no {self.best_weights_file.name}; the run did not finish an "
                             "epoch.")
        model = build_architecture(meta["architecture"], len(meta["classes"]))
        model.load_state_dict(self.load_best_weights())
        model.eval()
        return model, meta

    # --- data records -------------------------------------------------------------------------------

    def write_splits(self, samples: dict[str, list[tuple[Path, int]]], classes: list[str]) -> None:
        """splits/<split>.csv: path,label, or path,labels (joined by |) for a multi-label run."""
        for split, items in samples.items():
            path = self.split_file(split)
            path.parent.mkdir(parents=True, exist_ok=True)
            multi = bool(items) and isinstance(items[0][1], tuple)
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "labels" if multi else "label"])
                writer.writerows([str(p), label_name(classes, label)] for p, label in items)

    def read_split(self, split: str, classes: list[str]) -> list[tuple[Path, int]]:
        """The run's own `split` as (path, class index) pairs (a tuple of indices for multi-label)."""
        path = self.split_file(split)
        if not path.is_file():
            raise UsageError(f"--split {split}: RUN {self.path} has no {split} split; pass DATA or use --split val.")
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            multi = "labels" in (reader.fieldnames or [])
            return [(sample_path(row["path"]), parse_label(classes, row["labels" if multi else "label"], multi))
                    for row in reader]

    def check_same_splits(self, samples: dict[str, list[tuple[Path, int]]], classes: list[str]) -> None:
        """--resume: refuse data whose images differ from those the run started with."""
        for split, items in samples.items():
            with self.split_file(split).open(newline="") as f:
                recorded = [(row["path"], row.get("label", row.get("labels"))) for row in csv.DictReader(f)]
            if recorded != [(str(p), label_name(classes, y)) for p, y in items]:
                raise UsageError(f"--resume {self.path}: the {split} images differ from those the run started "
                                 "with; restore the data or start a new run.")

    def read_excluded(self) -> dict[str, str]:
        if not self.excluded_file.is_file():
            return {}
        with self.excluded_file.open(newline="") as f:
            return {row["path"]: row["reason"] for row in csv.DictReader(f)}

    def write_excluded(self, excluded: dict[str, str]) -> None:
        with self.excluded_file.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows(excluded.items())

    def write_duplicates(self, groups: list[list[tuple[str, Path, int]]], classes: list[str]) -> None:
        with self.duplicates_file.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["group", "split", "label", "path"])
            for number, group in enumerate(groups, start=1):
                writer.writerows([number, split, label_name(classes, label), str(path)] for split, path, label in group)

    def write_auto_decision(self, decision: dict) -> None:
        checkpoint.write_json(self.auto_decision_file, decision)
