"""Find images, build the class index and the train/val/test splits.

Layouts accepted:
- `DATA/train/<class>/*`, `DATA/val/<class>/*`, optional `DATA/test/<class>/*`
  (the tutorial's), with the split names people use in any letter case
  (`SPLIT_ALIASES`: training_set, valid, validation, test_set, ...). Without a
  val split, val is split off train automatically; test stays test.
- `DATA/<class>/*`: split automatically, stratified by class and seeded.
- either of those inside single wrapper folders (what unzipping an archive adds).
- a CSV file with a `path,label` header and an optional `split` column; relative
  paths are relative to the CSV's folder.

A layout that cannot be read with certainty is refused with one sentence, never
guessed: split folders beside other image folders, two folders for one split, a
class named like a split, or class folders that all hold the same sub-folders
(`photos/batch1/{cats,dogs}`, where the classes are one level down).

The class index is the sorted list of class names, identical for all splits.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, UsageError
from .images import unreadable_reason

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = ("train", "val", "test")
# Folder names (compared in lower case) that mean a split, from the archives people download.
SPLIT_ALIASES = {
    "train": ("train", "training", "training_set", "trainset", "train_set"),
    "val": ("val", "valid", "validation", "dev", "val_set", "valset", "validation_set"),
    "test": ("test", "testing", "test_set", "testset"),
}
# Folders that archives add beside the data: never a class, never a split.
IGNORED_FOLDERS = {"__macosx"}
ACCEPTED_LAYOUTS = ("DATA/<class>/*.jpg, or DATA/train/<class>/ with DATA/val/<class>/ (optional DATA/test/<class>/; "
                    "split names such as training_set, valid, test_set work too), or a path,label CSV")


@dataclass
class Splits:
    """Samples per split as (path, class index) pairs, plus how they were found."""

    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[Path, int]]]
    layout: str  # "folders", "class-folders", "csv" or "shards"
    auto_split: dict = field(default_factory=dict)  # how val was made, when it was
    split_folders: dict[str, str] = field(default_factory=dict)  # split -> folder name, for the split layout
    multi_label: bool = False
    """A `path,labels` CSV: each sample's label is a tuple of class indices (any number, none included)."""

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {c: n for c, n in zip(self.classes, _class_counts(items, len(self.classes)))}
            for split, items in self.samples.items()
        }

    def describe(self) -> str:
        """The layout as understood, for a person to check before training: splits, classes, counts."""
        kinds = {"folders": "split folders", "class-folders": "class folders (no split folders)", "csv": "CSV",
                 "shards": "WebDataset shards"}
        lines = [f"{self.root}: {kinds[self.layout]}, {len(self.classes)} classes"
                 + (" (multi-label: an image counts once under each of its labels)" if self.multi_label else "")]
        counts = self.counts()
        width = max(len("total"), *(len(c) for c in self.classes))
        splits = list(self.samples)
        header = "  ".join(f"{s + ' (' + self.split_folders[s] + '/)' if s in self.split_folders else s:>14}"
                           for s in splits)
        lines.append(f"  {'class':{width}}  {header}")
        for c in self.classes:
            lines.append(f"  {c:{width}}  " + "  ".join(f"{counts[s][c]:>14}" for s in splits))
        lines.append(f"  {'total':{width}}  " + "  ".join(f"{len(self.samples[s]):>14}" for s in splits))
        if self.auto_split:
            source = "every image" if self.auto_split["val_from"] == "all" else "train"
            lines.append(f"  val: {self.auto_split['val_fraction']:.0%} of each class held out of {source}, "
                         f"seed {self.auto_split['seed']} (--val-fraction, --seed)")
        return "\n".join(lines)


def cross_split_duplicates(splits: Splits) -> list[list[tuple[str, Path, int]]]:
    """Groups of byte-identical files found in more than one split, as (split, path, label).

    A val or test image that is also a training image is a leak: it makes val accuracy look better than
    the model is. Files are compared by size first (a stat), and only sizes shared across splits are
    hashed, so a clean data set costs a stat per file.
    """
    by_size: dict[int, list[tuple[str, Path, int]]] = defaultdict(list)
    for split, items in splits.samples.items():
        for path, label in items:
            try:
                by_size[path.stat().st_size].append((split, path, label))
            except OSError:
                continue  # unreadable files are reported by the pass that reads them
    groups = []
    for same_size in by_size.values():
        if len({split for split, _, _ in same_size}) < 2:
            continue
        by_hash: dict[str, list[tuple[str, Path, int]]] = defaultdict(list)
        for entry in same_size:
            try:
                by_hash[hashlib.sha256(entry[1].read_bytes()).hexdigest()].append(entry)
            except OSError:
                continue
        groups += [group for group in by_hash.values() if len({split for split, _, _ in group}) > 1]
    return sorted(groups, key=lambda g: str(g[0][1]))


def _class_counts(items: list[tuple[Path, int]], num_classes: int) -> list[int]:
    """Images per class; a multi-label image counts once for each of its classes."""
    counter = Counter(c for _, label in items for c in (label if isinstance(label, tuple) else (label,)))
    return [counter.get(i, 0) for i in range(num_classes)]


LABEL_SEPARATOR = "|"  # between the labels of one image in a path,labels CSV (and in splits/*.csv)


def label_name(classes: list[str], label: int | tuple[int, ...]) -> str:
    """A sample's label as written in CSV files: the class, or the classes joined by |."""
    return LABEL_SEPARATOR.join(classes[c] for c in label) if isinstance(label, tuple) else classes[label]


def parse_label(classes: list[str], text: str, multi_label: bool) -> int | tuple[int, ...]:
    if not multi_label:
        return classes.index(text)
    return tuple(sorted(classes.index(c.strip()) for c in text.split(LABEL_SEPARATOR) if c.strip()))


def label_tensor(items: list[tuple[Path, int]], num_classes: int):
    """Class indices (int64), or for multi-label samples a multi-hot float32 matrix (N, classes)."""
    import torch

    if items and isinstance(items[0][1], tuple):
        hot = torch.zeros(len(items), num_classes)
        for row, (_, label) in enumerate(items):
            hot[row, list(label)] = 1.0
        return hot
    return torch.tensor([y for _, y in items])


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def images_in(folder: Path) -> list[Path]:
    # Sorted so that the order (and with it every seeded split and shuffle) does
    # not depend on the file system's listing order.
    return sorted(p for p in folder.rglob("*") if is_image_file(p) and not _hidden(p, folder))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def split_of(folder_name: str) -> str | None:
    """"train", "val" or "test" when a folder's name means that split, in any letter case."""
    name = folder_name.lower()
    return next((split for split, names in SPLIT_ALIASES.items() if name in names), None)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name.lower() not in IGNORED_FOLDERS)


@dataclass
class Layout:
    """Where the images of a data folder are: its real root and, for the split layout, each split's folder."""

    root: Path
    split_folders: dict[str, Path]  # e.g. {"train": root/"training_set", "test": root/"test_set"}; {} for class folders


def find_layout(data: Path, need_train: bool = True) -> Layout:
    """Look through wrapper folders, find split folders by name; refuse what is ambiguous.

    need_train=False for evaluation, where a folder with only test/ (or val/) is complete."""
    root = data
    for _ in range(3):  # archive/archive-name/data/... is as deep as wrappers go in practice
        subdirs = _visible_dirs(root)
        # One sub-folder, no images beside it, and folders inside it: a wrapper, not a single class.
        if (len(subdirs) == 1 and split_of(subdirs[0].name) is None and _visible_dirs(subdirs[0])
                and not any(is_image_file(p) for p in root.iterdir())):
            root = subdirs[0]
        else:
            break
    found: dict[str, Path] = {}
    others = []
    for d in _visible_dirs(root):
        split = split_of(d.name)
        if split is None:
            others.append(d)
        elif split in found:
            raise DataError(f"DATA {root}: both {found[split].name}/ and {d.name}/ look like the {split} split; "
                            f"keep one of them (rename or move the other).")
        else:
            found[split] = d
    if not found:
        return Layout(root, {})
    stray = [d.name for d in others if images_in(d)]
    if "train" not in found and stray:
        named = ", ".join(f"{d.name}/" for d in found.values())
        raise DataError(f"DATA {root}: {named} is named like a split but sits beside the class folders "
                        f"{', '.join(stray)}; rename that class folder, or arrange the images as {ACCEPTED_LAYOUTS}.")
    if need_train and "train" not in found:
        names = ", ".join(f"{d.name}/" for d in found.values())
        raise DataError(f"DATA {root}: has {names} but no training split; add a train/ folder of class folders "
                        f"(accepted: {ACCEPTED_LAYOUTS}).")
    if stray:
        raise DataError(f"DATA {root}: mixes split folders ({', '.join(d.name for d in found.values())}) with "
                        f"other image folders ({', '.join(stray)}); move those into a split or out of DATA.")
    return Layout(root, {s: found[s] for s in SPLIT_NAMES if s in found})


def class_folders(folder: Path) -> dict[str, list[Path]]:
    """{class name: its images} for the class folders in `folder`, refusing a tree that is not one."""
    classes = {d.name: images_in(d) for d in _visible_dirs(folder)}
    like_split = sorted(c for c, files in classes.items() if files and split_of(c))
    if like_split:
        raise DataError(f"DATA {folder}: has a class folder named like a split ({', '.join(like_split)}); a class "
                        f"cannot be called that (accepted: {ACCEPTED_LAYOUTS}).")
    # Sub-folders that hold images, per class folder, from the listing already made (no more I/O).
    inner = {c: {p.relative_to(folder / c).parts[0] for p in files if len(p.relative_to(folder / c).parts) > 1}
             for c, files in classes.items()}
    groups = sorted(c for c, names in inner.items() if len(names) >= 2)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            shared = sorted(inner[a] & inner[b])
            if len(shared) >= 2:
                raise DataError(
                    f"DATA {folder}: the folders {a} and {b} each hold the same folders ({', '.join(shared[:5])}), "
                    f"so the classes look one level down; point DATA at one of them or arrange the images as "
                    f"{ACCEPTED_LAYOUTS}.")
    return classes


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


def missing_data(root: Path) -> UsageError:
    return UsageError(f"DATA {root}: no such file or folder; pass a folder of class folders, a CSV, or a known dataset name.")


def discover(data: str | Path, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Find the images and splits of a data folder or CSV; raise a one-sentence error if unusable."""
    root = Path(data).expanduser()
    if not root.exists():
        raise missing_data(root)
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise UsageError(f"DATA {root}: is a file but not a .csv; pass a folder of class folders or a path,label CSV.")
        splits = _from_csv(root, val_fraction, seed)
    elif (root / "visiontune-shards.json").is_file():
        from .shards import read_shards

        splits = read_shards(root)
    else:
        layout = find_layout(root)
        if layout.split_folders:
            splits = _from_split_folders(layout, val_fraction, seed)
        else:
            splits = _from_class_folders(layout.root, val_fraction, seed)
    _check_usable(splits)
    return splits


def _from_split_folders(layout: Layout, val_fraction: float, seed: int) -> Splits:
    root = layout.root
    per_split = {s: class_folders(folder) for s, folder in layout.split_folders.items()}
    train_classes = sorted(c for c, files in per_split["train"].items() if files)
    if not train_classes:
        train = layout.split_folders["train"]
        raise DataError(f"DATA {train}: holds no images in class folders; put images in {train.name}/<class>/ "
                        f"(extensions {_ext_list()}).")
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
            raise DataError(f"DATA {layout.split_folders[split]}: class folders differ from train ({detail}); use the "
                            "same class folder names in every split.")
    index = {c: i for i, c in enumerate(train_classes)}
    samples = {
        split: [(p, index[c]) for c in train_classes for p in folders.get(c, [])]
        for split, folders in per_split.items()
    }
    splits = _with_val_split(root, train_classes, samples, "folders", val_fraction, seed)
    splits.split_folders = {split: folder.name for split, folder in layout.split_folders.items()}
    return splits


def _with_val_split(root: Path, classes: list[str], samples: dict, layout: str, val_fraction: float,
                    seed: int, multi_label: bool = False) -> Splits:
    """Splits in train/val/test order; without a val split, one is held out of train (stratified, seeded;
    multi-label: a seeded random share, as label sets are too many to stratify by)."""
    auto = {}
    if "val" not in samples:
        if multi_label:
            shuffled = list(samples["train"])
            random.Random(seed).shuffle(shuffled)
            n_held = max(1, round(len(shuffled) * val_fraction)) if len(shuffled) > 1 else 0
            samples["train"], samples["val"] = sorted(shuffled[n_held:]), sorted(shuffled[:n_held])
        else:
            samples["train"], samples["val"] = stratified_split(samples["train"], val_fraction, seed)
        auto = {"val_from": "train", "val_fraction": val_fraction, "seed": seed}
    ordered = {s: samples[s] for s in SPLIT_NAMES if s in samples}
    return Splits(root=root, classes=classes, samples=ordered, layout=layout, auto_split=auto)


def _from_class_folders(root: Path, val_fraction: float, seed: int) -> Splits:
    folders = class_folders(root)
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
    """path,label[,split] (one class per image) or path,labels[,split] (multi-label: classes joined by |)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if "path" not in columns or not ({"label", "labels"} & columns) or {"label", "labels"} <= columns:
            raise DataError(f"DATA {path}: needs a header with columns path,label (one class per image) or "
                            "path,labels (several, joined by |), optionally split.")
        rows = list(reader)
    multi = "labels" in columns
    records = []
    for line, row in enumerate(rows, start=2):
        file = Path(row["path"])
        file = file if file.is_absolute() else path.parent / file
        split = (row.get("split") or "train").strip() or "train"
        if split not in SPLIT_NAMES:
            raise DataError(f"DATA {path} line {line}: split {split!r} is not one of train, val, test.")
        if not file.is_file():
            raise DataError(f"DATA {path} line {line}: image {file} does not exist; fix the path or remove the row.")
        if multi:
            names = tuple(sorted({c.strip() for c in (row["labels"] or "").split(LABEL_SEPARATOR) if c.strip()}))
        else:
            names = (row["label"].strip(),)
        records.append((file, names, split))
    classes = sorted({c for _, names, split in records if split == "train" for c in names})
    if not classes:
        raise DataError(f"DATA {path}: has no labelled rows for the train split; add path,label rows.")
    unknown = sorted({c for _, names, _ in records for c in names if c not in classes})
    if unknown:
        raise DataError(f"DATA {path}: labels {', '.join(unknown)} appear outside train only; every class needs training images.")
    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, list[tuple[Path, int]]] = {}
    for file, names, split in records:
        label = tuple(index[c] for c in names) if multi else index[names[0]]
        samples.setdefault(split, []).append((file, label))
    splits = _with_val_split(path, classes, samples, "csv", val_fraction, seed, multi_label=multi)
    splits.multi_label = multi
    return splits


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
    """(uint8 CHW tensor, label) pairs: `decode` gives the resized image, `transform` crops it. A
    multi-label sample's label is its multi-hot float vector over `num_classes`."""

    def __init__(self, samples: list[tuple[Path, int]], decode, transform, num_classes: int = 0):
        self.samples, self.decode, self.transform = samples, decode, transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        """(image, label, None), or (None, label, reason) for an image that cannot be read: the batch
        goes on without it (collate_readable) and the loop leaves it out of later epochs."""
        path, label = self.samples[index]
        if isinstance(label, tuple):
            import torch

            hot = torch.zeros(self.num_classes)
            hot[list(label)] = 1.0
            label = hot
        try:
            return self.transform(self.decode(path)), label, None
        except Exception as exc:  # any failure to read or decode leaves the image out
            return None, label, (str(path), unreadable_reason(exc))


def collate_readable(samples: list[tuple]):
    """(images, labels, {path: reason}) of one batch: the readable images stacked, the others listed."""
    from torch.utils.data import default_collate

    good = [(image, label) for image, label, _ in samples if image is not None]
    failed = dict(why for image, _, why in samples if image is None)
    if not good:
        import torch

        return torch.zeros(0), torch.zeros(0), failed
    images, labels = default_collate(good)
    return images, labels, failed


# Loader workers start by fork(), PyTorch's default on Linux, not forkserver or spawn. Measured
# (docs/performance.md): forkserver re-imports the user's main script in every worker, so a plain
# script that calls visiontune.train() without an `if __name__ == "__main__":` guard fails with
# "DataLoader worker exited unexpectedly"; with the guard it gave the same batches and metrics as
# fork at the same speed (hymenoptera, 2 workers, 2 cores: 41.6 s vs 39.6 s).
WORKER_START_METHOD = "fork"


def _worker_context(workers: int):
    if workers == 0:
        return None
    import multiprocessing

    return multiprocessing.get_context(WORKER_START_METHOD)


def worker_count(cfg, rt) -> int:
    """DataLoader workers: --workers, else none on a CPU (decoding is cached and the cores are busy
    with the model), else up to 8 per GPU process, leaving a core for the process itself."""
    if cfg.workers is not None:
        return cfg.workers
    if rt.device.type == "cpu":
        return 0
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // local_processes - 1))


def train_loader(items: list[tuple[Path, int]], decode, transform, cfg, rt, generator, num_classes: int = 0):
    """Shuffled (or class-balanced) training batches of this process's share of `items`."""
    import torch

    from .recipes import make_sampler
    from .runtime import ShardSampler

    dataset = ImageDataset(items, decode, transform, num_classes)
    labels = label_tensor(items, num_classes)
    sampler = ShardSampler(make_sampler(cfg, dataset, labels, generator), rt.rank, rt.world_size)
    workers = worker_count(cfg, rt)
    return torch.utils.data.DataLoader(
        # The generator goes to the sampler only: given to the DataLoader it would also be drawn
        # from for worker seeds, and the order would differ from the cached-feature path's.
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_readable,
        # Not persistent: workers started each epoch are seeded from the global RNG at that epoch's
        # start, which last.ckpt saves, so a resumed run augments exactly as the uninterrupted one.
        # Persistent workers carry their random streams across epochs, where no checkpoint reaches.
        pin_memory=rt.device.type == "cuda", persistent_workers=False,
        multiprocessing_context=_worker_context(workers),
        # A last batch of one sample breaks BatchNorm in train mode; drop it then.
        drop_last=len(sampler) % cfg.batch_size == 1 and cfg.mode != "fixed")


def val_loader(items: list[tuple[Path, int]], decode, transform, cfg, rt, num_classes: int = 0):
    """Evaluation batches in file order. Each rank evaluates its own share, unpadded: summed over
    ranks, every image counts once."""
    import torch

    workers = worker_count(cfg, rt)
    return torch.utils.data.DataLoader(ImageDataset(rt.shard(items), decode, transform, num_classes),
                                       batch_size=cfg.eval_batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate_readable,
                                       pin_memory=rt.device.type == "cuda",
                                       multiprocessing_context=_worker_context(workers))
