"""Find images, build the class index and the train/val/test splits.

Layouts accepted:
- `DATA/train/<class>/*`, `DATA/val/<class>/*`, optional `DATA/test/<class>/*`
  (the tutorial's). Without `val/`, val is split off `train/` automatically.
- `DATA/<class>/*`: split automatically, stratified by class and seeded.
- a CSV file with a `path,label` header and an optional `split` column; relative
  paths are relative to the CSV's folder.

The class index is the sorted list of class names, identical for all splits.
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, UsageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Splits:
    """Samples per split as (path, class index) pairs, plus how they were found."""

    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[Path, int]]]
    layout: str  # "folders", "class-folders" or "csv"
    auto_split: dict = field(default_factory=dict)  # how val was made, when it was

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {c: n for c, n in zip(self.classes, _class_counts(items, len(self.classes)))}
            for split, items in self.samples.items()
        }


def _class_counts(items: list[tuple[Path, int]], num_classes: int) -> list[int]:
    counter = Counter(label for _, label in items)
    return [counter.get(i, 0) for i in range(num_classes)]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def images_in(folder: Path) -> list[Path]:
    # Sorted so that the order (and with it every seeded split and shuffle) does
    # not depend on the file system's listing order.
    return sorted(p for p in folder.rglob("*") if is_image_file(p) and not _hidden(p, folder))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    return {
        d.name: images_in(d)
        for d in sorted(folder.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def stratified_split(
    items: list[tuple[Path, int]], fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Move `fraction` of every class (at least one image) out of `items`, seeded."""
    by_class: dict[int, list[tuple[Path, int]]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    rng = random.Random(seed)
    kept, held = [], []
    for label in sorted(by_class):
        group = list(by_class[label])
        rng.shuffle(group)
        n_held = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        held += group[:n_held]
        kept += group[n_held:]
    return sorted(kept), sorted(held)


def discover(data: str | Path, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Find the images and splits of a data folder or CSV; raise a one-sentence error if unusable."""
    root = Path(data).expanduser()
    if not root.exists():
        raise UsageError(f"DATA {root}: no such file or folder; pass a folder of class folders, a CSV, or a known dataset name.")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise UsageError(f"DATA {root}: is a file but not a .csv; pass a folder of class folders or a path,label CSV.")
        splits = _from_csv(root, val_fraction, seed)
    elif (root / "train").is_dir():
        splits = _from_split_folders(root, val_fraction, seed)
    else:
        splits = _from_class_folders(root, val_fraction, seed)
    _check_usable(splits)
    return splits


def _from_split_folders(root: Path, val_fraction: float, seed: int) -> Splits:
    per_split = {s: _class_folders(root / s) for s in SPLIT_NAMES if (root / s).is_dir()}
    train_classes = sorted(c for c, files in per_split["train"].items() if files)
    if not train_classes:
        raise DataError(f"DATA {root / 'train'}: holds no images in class folders; put images in train/<class>/ (extensions {_ext_list()}).")
    for split, folders in per_split.items():
        if split == "train":
            continue
        names = sorted(c for c, files in folders.items() if files)
        if names != train_classes:
            extra = sorted(set(names) - set(train_classes))
            lacking = sorted(set(train_classes) - set(names))
            detail = "; ".join(
                part
                for part in (
                    f"{split} has {', '.join(extra)} which train lacks" if extra else "",
                    f"{split} lacks {', '.join(lacking)}" if lacking else "",
                )
                if part
            )
            raise DataError(f"DATA {root / split}: class folders differ from train ({detail}); use the same class folder names in every split.")
    index = {c: i for i, c in enumerate(train_classes)}
    samples = {
        split: [(p, index[c]) for c in train_classes for p in folders.get(c, [])]
        for split, folders in per_split.items()
    }
    return _with_val_split(root, train_classes, samples, "folders", val_fraction, seed)


def _with_val_split(root: Path, classes: list[str], samples: dict, layout: str, val_fraction: float,
                    seed: int) -> Splits:
    """Splits in train/val/test order; without a val split, one is held out of train (stratified, seeded)."""
    auto = {}
    if "val" not in samples:
        samples["train"], samples["val"] = stratified_split(samples["train"], val_fraction, seed)
        auto = {"val_from": "train", "val_fraction": val_fraction, "seed": seed}
    ordered = {s: samples[s] for s in SPLIT_NAMES if s in samples}
    return Splits(root=root, classes=classes, samples=ordered, layout=layout, auto_split=auto)


def _from_class_folders(root: Path, val_fraction: float, seed: int) -> Splits:
    folders = _class_folders(root)
    classes = sorted(c for c, files in folders.items() if files)
    if not classes:
        loose = [p for p in root.iterdir() if is_image_file(p)]
        hint = " (images lie loose in it: move them into one folder per class)" if loose else ""
        raise DataError(f"DATA {root}: holds no images in class folders{hint}; use DATA/<class>/*.jpg or DATA/train/<class>/ and DATA/val/<class>/.")
    items = [(p, i) for i, c in enumerate(classes) for p in folders[c]]
    train, val = stratified_split(items, val_fraction, seed)
    return Splits(
        root=root,
        classes=classes,
        samples={"train": train, "val": val},
        layout="class-folders",
        auto_split={"val_from": "all", "val_fraction": val_fraction, "seed": seed},
    )


def _from_csv(path: Path, val_fraction: float, seed: int) -> Splits:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"DATA {path}: needs a header with columns path,label (optionally split).")
        rows = list(reader)
    records = []
    for line, row in enumerate(rows, start=2):
        file = Path(row["path"])
        file = file if file.is_absolute() else path.parent / file
        split = (row.get("split") or "train").strip() or "train"
        if split not in SPLIT_NAMES:
            raise DataError(f"DATA {path} line {line}: split {split!r} is not one of train, val, test.")
        if not file.is_file():
            raise DataError(f"DATA {path} line {line}: image {file} does not exist; fix the path or remove the row.")
        records.append((file, row["label"].strip(), split))
    classes = sorted({label for _, label, split in records if split == "train"})
    if not classes:
        raise DataError(f"DATA {path}: has no rows for the train split; add path,label rows.")
    unknown = sorted({label for _, label, split in records if label not in classes})
    if unknown:
        raise DataError(f"DATA {path}: labels {', '.join(unknown)} appear outside train only; every class needs training images.")
    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, list[tuple[Path, int]]] = {}
    for file, label, split in records:
        samples.setdefault(split, []).append((file, index[label]))
    return _with_val_split(path, classes, samples, "csv", val_fraction, seed)


def _check_usable(splits: Splits) -> None:
    if len(splits.classes) < 2:
        raise DataError(
            f"DATA {splits.root}: has a single class ({splits.classes[0]}); a classifier needs at least two class folders."
        )
    for split in ("train", "val"):
        if not splits.samples.get(split):
            raise DataError(f"DATA {splits.root}: the {split} split is empty; add images or lower --val-fraction.")


def _ext_list() -> str:
    return "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


class ImageDataset:
    """(uint8 CHW tensor, label) pairs: `decode` gives the resized image, `transform` crops it."""

    def __init__(self, samples: list[tuple[Path, int]], decode, transform):
        self.samples, self.decode, self.transform = samples, decode, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(self.decode(path)), label
