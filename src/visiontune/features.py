"""Fixed-extractor mode: backbone features computed once, cached on disk.

A frozen backbone in eval mode is a pure function of its input image, so
running it every epoch (as the tutorial's fixed scenario does) recomputes the
same numbers. Here every image is passed through the backbone once per view:
view 0 is the un-augmented eval crop, views 1..K-1 are random crops+flips drawn
from a generator seeded by (seed, view, file), so a view is the same whichever
order or run computes it. Each epoch draws one view per training image.

The cache, per (backbone, weights, preprocessing, view, seed), maps file identity
(path, size, mtime) -> feature vector, in parts written once (FeatureCache); an
edited file misses its entry and is extracted again, the rest are reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .files import atomic_write
from .folding import fold_batchnorm, pooled_features
from .images import file_identity, unreadable_reason
from .memory import release_freed_memory
from .preprocess import EvalTransform, Preprocessing, TrainTransform, normalize_batch


def _seed_for(seed: int, view: int, identity: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{view}|{identity}".encode()).digest()[:8], "little") >> 1


class FeatureCache:
    """One view's features, in parts written once: a pair of .npy files (identities, features) per part.

    A run adds a part holding only the entries it computed, and reads the parts memory-mapped, copying
    out only the rows it asks for: neither costs memory or time in proportion to what the cache already
    holds (rewriting one file per view loaded and restacked every entry it had).
    """

    MAX_PARTS = 32  # past this, the next save merges every part into one

    def __init__(self, directory: Path, model_key: dict):
        self.directory = Path(directory) / "features"
        self.model_key = json.dumps(model_key, sort_keys=True)

    def _stem(self, view: int, seed: int) -> str:
        augmented_seed = seed if view > 0 else None  # view 0 has no randomness
        return hashlib.sha256(f"{self.model_key}|{view}|{augmented_seed}|v2".encode()).hexdigest()

    def _parts(self, view: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(identities, features memory-mapped) of each complete, readable part."""
        parts = []
        for ids_file in sorted(self.directory.glob(f"{self._stem(view, seed)}.*.ids.npy")):
            try:
                identities = np.load(ids_file)
                features = np.load(ids_file.with_name(ids_file.name.replace(".ids.npy", ".npy")), mmap_mode="r")
            except (OSError, ValueError):
                continue  # a damaged part: its images are extracted again
            if features.ndim == 2 and len(features) == len(identities):
                parts.append((identities, features))
        return parts

    def load(self, view: int, seed: int, identities: list[str]) -> tuple[list[int], np.ndarray | None]:
        """Which of `identities` the cache holds (indices into them) and their rows, in that order."""
        wanted = {ident: i for i, ident in enumerate(identities)}
        found, blocks = [], []
        for names, features in self._parts(view, seed):
            hits = [(wanted.pop(name), row) for row, name in enumerate(names.tolist()) if name in wanted]
            if hits:
                found += [i for i, _ in hits]
                blocks.append(np.asarray(features[[row for _, row in hits]], dtype=np.float32))
        return found, (np.concatenate(blocks) if len(blocks) > 1 else blocks[0]) if blocks else None

    def save(self, view: int, seed: int, identities: list[str], rows: np.ndarray,
             which: list[int] | None = None) -> None:
        """A new part with these entries (none of them already in the cache): `rows`, or `rows[which]`."""
        stem = self._stem(view, seed)
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.directory.glob(f"{stem}.*.ids.npy"))
        if len(existing) >= self.MAX_PARTS:
            parts = self._parts(view, seed)
            identities = [n for names, _ in parts for n in names.tolist()] + list(identities)
            rows = np.concatenate([np.asarray(f) for _, f in parts] + [rows if which is None else rows[which]])
            which = None
        number = max((int(f.name.split(".")[1]) for f in existing), default=-1) + 1
        # Features first, identities last: a part is read only once its identities file exists.
        atomic_write(self.directory / f"{stem}.{number}.npy", lambda f: _write_rows(f, rows, which), durable=False)
        atomic_write(self.directory / f"{stem}.{number}.ids.npy", lambda f: np.save(f, np.array(identities)),
                     durable=False)
        if len(existing) >= self.MAX_PARTS:
            for ids_file in existing:
                ids_file.with_name(ids_file.name.replace(".ids.npy", ".npy")).unlink(missing_ok=True)
                ids_file.unlink(missing_ok=True)


def _write_rows(file, rows: np.ndarray, which: list[int] | None, block: int = 4096) -> None:
    """`np.save(file, rows if which is None else rows[which])` a block of rows at a time: `rows[which]`
    whole would be a second copy of nearly every row (256 MB at 50 000 images) at the memory peak."""
    count = len(rows) if which is None else len(which)
    np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(rows.dtype),
                                                "fortran_order": False, "shape": (count, *rows.shape[1:])})
    for start in range(0, count, block):
        chunk = rows[start : start + block] if which is None else rows[which[start : start + block]]
        file.write(np.ascontiguousarray(chunk).tobytes())


def extract_features(
    model: nn.Module,
    paths: list[Path],
    decode: Callable[[Path], np.ndarray],
    pre: Preprocessing,
    views: int,
    seed: int,
    cache: FeatureCache | None,
    batch_size: int = 64,
    channels_last: bool = True,
    progress: Callable[[Iterator, int, str], Iterator] = lambda it, total, desc: it,
    runtime=None,
) -> tuple[torch.Tensor, dict[str, str]]:
    """Features [views, images that could be read, dim] in eval mode (on the CPU), and {path: reason}
    of the images that could not be read (left out of the features). Cached entries are reused.

    This pass is where unreadable images are found: there is no separate pass over the files before
    it, so training starts after listing them, whatever their number (a bad file is remembered by the
    decode cache, so a later run skips it at once).
    With several processes (torchrun), rank 0's cache decides what is missing, each rank computes
    every world_size-th missing image, and the results are gathered on every rank: N devices extract
    N times faster, and all ranks end with the same features and the same failures.
    """
    from .runtime import Runtime

    rt = runtime or Runtime()
    device = next(model.parameters()).device
    model.eval()
    fast_model = None  # folded lazily: only when something is missing from the cache
    eval_tf, train_tf = EvalTransform(pre), TrainTransform(pre)
    identities = [file_identity(p) for p in paths]
    # One array for every view's rows, filled in place (at 50 000 images and 1280 dims a view is
    # 256 MB): no per-row arrays, dicts or stacks holding further copies.
    out: np.ndarray | None = None

    def rows_of(dim: int) -> np.ndarray:
        """`out`, allocated once the feature size is known (from the cache or the first batch)."""
        nonlocal out
        if out is None:
            out = np.zeros((views, len(paths), dim), np.float32)
        return out

    failed: dict[str, str] = {}
    for view in range(views):
        cached, cached_rows = rt.broadcast(cache.load(view, seed, identities) if cache and rt.is_main else ([], None))
        if cached:
            rows_of(cached_rows.shape[1])[view, cached] = cached_rows
        del cached_rows
        known = set(cached)
        missing = [i for i in range(len(paths)) if i not in known and str(paths[i]) not in failed]
        mine = rt.shard(missing)
        computed: list[int] = []  # indices into paths, rows already in out[view]
        found: dict[str, str] = {}
        chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
        for number, chunk in enumerate(progress(iter(chunks), len(chunks), f"features view {view}")):
            if number % 16 == 15:
                # glibc keeps freed decode and batch buffers: over 40 000 images at 96 px the resident
                # set grew by 0.3 GB more than the features. A trim per batch kept it lower still, but
                # its page faults cost 20% of the pass's speed; one per 16 batches does not show.
                release_freed_memory()
            images, kept = [], []
            for i in chunk:
                try:
                    if view == 0:
                        images.append(eval_tf(decode(paths[i])))
                    else:
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(_seed_for(seed, view, identities[i]))
                            images.append(train_tf(decode(paths[i])))
                    kept.append(i)
                except Exception as exc:  # any failure to read or decode leaves the image out
                    found[str(paths[i])] = unreadable_reason(exc)
            if not kept:
                continue
            fast_model = fast_model or fold_batchnorm(model, pre.size)
            with torch.inference_mode(), rt.autocast():
                batch = normalize_batch(torch.stack(images).to(device, non_blocking=True), pre, channels_last)
                feats = pooled_features(fast_model, batch).float().cpu().numpy()
            rows_of(feats.shape[1])[view, kept] = feats
            computed += kept
        if rt.distributed and missing:
            parts = rt.all_gather(({identities[i]: out[view, i] for i in computed}, found))
            by_identity = {k: v for part, _ in parts for k, v in part.items()}
            found = {k: v for _, part in parts for k, v in part.items()}
            computed = [i for i in missing if identities[i] in by_identity]
            for i in computed:
                rows_of(len(by_identity[identities[i]]))[view, i] = by_identity[identities[i]]
            del by_identity
        failed.update(found)
        if cache and computed and rt.is_main:
            every_row_new = len(computed) == len(paths)  # then out[view] is the rows, without a copy
            cache.save(view, seed, [identities[i] for i in computed], out[view], None if every_row_new else computed)
        if len(paths) > 4 * batch_size:
            release_freed_memory()  # the pass's decode and batch buffers, before the next view or the head
    keep = [i for i, p in enumerate(paths) if str(p) not in failed]
    if out is None or not keep:
        features = torch.zeros(views, 0, 0)
    else:
        features = torch.from_numpy(_drop_rows(out, keep))
    # In the order of `paths`, whichever rank found them.
    return features, {str(p): failed[str(p)] for p in paths if str(p) in failed}


def _drop_rows(out: np.ndarray, keep: list[int], block: int = 4096) -> np.ndarray:
    """`out[:, keep]` (keep ascending), moved forward inside `out` instead of copied: `out[:, keep]`
    would hold a second array of every row while the first still exists (at 50 000 images, 256 MB
    more at the peak for a few unreadable files)."""
    if len(keep) == out.shape[1]:
        return out
    keep_array = np.asarray(keep)
    # Rows move to lower indices only (keep[j] >= j), so block-wise copies front to back never read a
    # row already overwritten; each block's own overlap costs numpy at most one block-sized buffer.
    for start in range(0, len(keep_array), block):
        sources = keep_array[start : start + block]
        first, last = int(sources[0]), int(sources[-1])
        if last - first + 1 == len(sources):  # one contiguous run: a slice, not a gathered copy
            out[:, start : start + len(sources)] = out[:, first : last + 1]
        else:
            out[:, start : start + len(sources)] = out[:, sources]
    return out[:, : len(keep_array)]


class FeatureBatches:
    """Shuffled mini-batches of (features, label); each epoch draws one view per sample."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                 shuffle: bool = True, sampler=None):
        self.features, self.labels = features, labels
        self.batch_size, self.generator, self.shuffle = batch_size, generator, shuffle
        # Same sampler as the image DataLoader, so both paths see the same order.
        self.sampler = sampler or torch.utils.data.RandomSampler(range(labels.shape[0]), generator=generator)

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = self.labels.shape[0]
        order = torch.tensor(list(self.sampler)) if self.shuffle else torch.arange(n)
        views = self.features.shape[0]
        chosen = torch.randint(views, (n,), generator=self.generator) if views > 1 else torch.zeros(n, dtype=torch.long)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.features[chosen[idx], idx], self.labels[idx]
