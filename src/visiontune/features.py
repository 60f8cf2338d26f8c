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
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .files import atomic_write
from .folding import fold_batchnorm, pooled_features
from .images import file_identity, unreadable_reason
from .memory import release_freed_memory
from .prefix import FrozenPrefix, PrefixSplit
from .preprocess import EvalTransform, Preprocessing, TrainTransform, normalize_batch


def batch_decoder() -> ThreadPoolExecutor:
    """Threads that decode a batch's images before the batch goes through the model: as many as torch
    computes with (at most 8). Pillow decodes and resizes without the GIL. Decoded one after another, a
    core sat idle for a third of a first run's features pass (hymenoptera, 2 cores); decoding the next
    batch on one thread while the model ran on this one gained nothing, as the model keeps both cores
    busy (docs/performance.md)."""
    return ThreadPoolExecutor(max(1, min(8, torch.get_num_threads())), thread_name_prefix="visiontune-decode")


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

    def locate(self, view: int, seed: int, identities: list[str]) -> tuple[list[int], list[Path], np.ndarray, np.ndarray]:
        """Where the cache holds `identities`: (indices into them, the part files, and for each found
        identity in that order, its file's number and its row in it). Nothing is read but the names."""
        wanted = {ident: i for i, ident in enumerate(identities)}
        found, files, file_of, row_of = [], [], [], []
        for ids_file in self._part_files(view, seed):
            features_file = ids_file.with_name(ids_file.name.replace(".ids.npy", ".npy"))
            try:
                names = np.load(ids_file)
                shape = _npy_layout(features_file)[1]
            except (OSError, ValueError):
                continue  # a damaged part: its images are extracted again
            if len(shape) != 2 or shape[0] != len(names):
                continue
            hits = [(wanted.pop(name), row) for row, name in enumerate(names.tolist()) if name in wanted]
            if hits:
                found += [i for i, _ in hits]
                file_of += [len(files)] * len(hits)
                row_of += [row for _, row in hits]
                files.append(features_file)
        return found, files, np.array(file_of, dtype=np.int32), np.array(row_of, dtype=np.int64)

    def new_part(self, view: int, seed: int, count: int, dim: int) -> "PartWriter":
        """A part of `count` rows written as they are computed (see PartWriter)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return PartWriter(self, view, seed, count, dim)

    def _part_files(self, view: int, seed: int) -> list[Path]:
        return sorted(self.directory.glob(f"{self._stem(view, seed)}.*.ids.npy"))

    def _next_number(self, view: int, seed: int) -> int:
        return max((int(f.name.split(".")[1]) for f in self._part_files(view, seed)), default=-1) + 1

    def _merge_if_too_many(self, view: int, seed: int) -> None:
        """Past MAX_PARTS, every part becomes one, copied a block of rows at a time (never all in memory)."""
        existing = self._part_files(view, seed)
        if len(existing) <= self.MAX_PARTS:
            return
        parts = []
        for ids_file in existing:
            features_file = ids_file.with_name(ids_file.name.replace(".ids.npy", ".npy"))
            try:
                names, (offset, shape, dtype) = np.load(ids_file), _npy_layout(features_file)
            except (OSError, ValueError):
                continue
            if len(shape) == 2 and shape[0] == len(names):
                parts.append((names, features_file, offset, shape, dtype))
        if not parts:
            return
        keep = [names != "" for names, *_ in parts]  # a part's unreadable images left empty names
        total, dim = sum(int(k.sum()) for k in keep), parts[0][3][1]

        def write(file) -> None:
            np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                        "fortran_order": False, "shape": (total, dim)})
            for (names, features_file, offset, shape, dtype), mask in zip(parts, keep):
                for start in range(0, shape[0], 4096):
                    block = np.fromfile(features_file, dtype=dtype, count=min(4096, shape[0] - start) * dim,
                                        offset=offset + start * dim * dtype.itemsize).reshape(-1, dim)
                    file.write(np.ascontiguousarray(block[mask[start : start + 4096]], dtype=np.float32).tobytes())

        stem, number = self._stem(view, seed), self._next_number(view, seed)
        atomic_write(self.directory / f"{stem}.{number}.npy", write, durable=False)
        atomic_write(self.directory / f"{stem}.{number}.ids.npy",
                     lambda f: np.save(f, np.concatenate([names[mask] for (names, *_), mask in zip(parts, keep)])),
                     durable=False)
        for ids_file in existing:
            ids_file.with_name(ids_file.name.replace(".ids.npy", ".npy")).unlink(missing_ok=True)
            ids_file.unlink(missing_ok=True)

    def save(self, view: int, seed: int, identities: list[str], rows: np.ndarray,
             which: list[int] | None = None) -> None:
        """A new part with these entries (none of them already in the cache): `rows`, or `rows[which]`."""
        stem = self._stem(view, seed)
        self.directory.mkdir(parents=True, exist_ok=True)
        number = self._next_number(view, seed)
        # Features first, identities last: a part is read only once its identities file exists.
        atomic_write(self.directory / f"{stem}.{number}.npy", lambda f: _write_rows(f, rows, which), durable=False)
        atomic_write(self.directory / f"{stem}.{number}.ids.npy", lambda f: np.save(f, np.array(identities)),
                     durable=False)
        self._merge_if_too_many(view, seed)


class PartWriter:
    """A cache part written row by row as the pass computes them, so the rows need not be held in
    memory: a .npy file of `count` rows made at its final size; rows land at their position; rows
    never written (unreadable images) keep an empty name in the identities file, so they are never
    found. The part becomes visible only at `finish`, when its identities file appears."""

    def __init__(self, cache: FeatureCache, view: int, seed: int, count: int, dim: int):
        self.cache, self.view, self.seed, self.dim = cache, view, seed, dim
        self.names = [""] * count
        fd, self.tmp = tempfile.mkstemp(dir=cache.directory, prefix=".part.", suffix=".tmp")
        self.file = os.fdopen(fd, "r+b")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                         "fortran_order": False, "shape": (count, dim)})
        self.offset = self.file.tell()
        self.file.truncate(self.offset + count * dim * 4)

    def write(self, positions: list[int], names: list[str], rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        for position, name, row in zip(positions, names, rows):
            os.pwrite(self.file.fileno(), row.tobytes(), self.offset + position * self.dim * 4)
            self.names[position] = name

    def finish(self) -> None:
        self.file.close()
        stem, number = self.cache._stem(self.view, self.seed), self.cache._next_number(self.view, self.seed)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        os.replace(self.tmp, self.cache.directory / f"{stem}.{number}.npy")
        atomic_write(self.cache.directory / f"{stem}.{number}.ids.npy", lambda f: np.save(f, np.array(self.names)),
                     durable=False)
        self.cache._merge_if_too_many(self.view, self.seed)

    def discard(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(offset of the data, shape, dtype) of a .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order:
            raise ValueError(f"{path}: Fortran order")
        return f.tell(), shape, dtype


class FeaturesOnDisk:
    """Rows [views, images, dim] that stay in the cache's part files and are read a batch at a time.

    Used when the features are large (ON_DISK_MIN_ROWS): at 50 000 images they are 256 MB, which would
    otherwise be the whole growth of the process's memory with the data's size. Reads are os.pread
    calls, not a memory map: mapped pages count in the resident set as they are touched, read ones
    stay in the page cache. Gives exactly the rows extraction wrote (float32, bit for bit).
    Supports what FeatureBatches and the val batches use: `shape`, `features[view]` (that view in
    memory, as a tensor) and `features[views, indices]` (one row per pair)."""

    def __init__(self, files: list[Path], file_of: np.ndarray, row_of: np.ndarray, dim: int):
        # file_of, row_of: [views, images]
        self.files, self.file_of, self.row_of, self.dim = files, file_of, row_of, dim
        self.offsets = [_npy_layout(f)[0] for f in files]
        # Opened now: a part another run merges away later stays readable through its open descriptor.
        self._fds: list[int] | None = None
        self._descriptors()

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.file_of.shape, self.dim)

    def _descriptors(self) -> list[int]:
        if self._fds is None:
            self._fds = [os.open(f, os.O_RDONLY) for f in self.files]
        return self._fds

    def __del__(self):
        for fd in self._fds or []:
            os.close(fd)

    def __getstate__(self):  # picklable (no open descriptors)
        return {**self.__dict__, "_fds": None}

    def rows(self, views: np.ndarray, indices: np.ndarray) -> np.ndarray:
        files, rows = self.file_of[views, indices], self.row_of[views, indices]
        out = np.empty((len(indices), self.dim), np.float32)
        row_bytes, fds = self.dim * 4, self._descriptors()
        # Sorted by place on disk, runs of consecutive rows are one read (a whole view is a few reads).
        order = np.lexsort((rows, files))
        start = 0
        while start < len(order):
            end = start + 1
            while (end < len(order) and files[order[end]] == files[order[start]]
                   and rows[order[end]] == rows[order[end - 1]] + 1 and end - start < 4096):
                end += 1
            file, first = int(files[order[start]]), int(rows[order[start]])
            data = os.pread(fds[file], (end - start) * row_bytes, self.offsets[file] + first * row_bytes)
            out[order[start:end]] = np.frombuffer(data, np.float32).reshape(end - start, self.dim)
            start = end
        return out

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            count = self.file_of.shape[1]
            return torch.from_numpy(self.rows(np.full(count, key), np.arange(count)))
        views, indices = key
        return torch.from_numpy(self.rows(np.asarray(views), np.asarray(indices)))


def _write_rows(file, rows: np.ndarray, which: list[int] | None, block: int = 4096) -> None:
    """`np.save(file, rows if which is None else rows[which])` a block of rows at a time: `rows[which]`
    whole would be a second copy of nearly every row (256 MB at 50 000 images) at the memory peak."""
    count = len(rows) if which is None else len(which)
    np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(rows.dtype),
                                                "fortran_order": False, "shape": (count, *rows.shape[1:])})
    for start in range(0, count, block):
        chunk = rows[start : start + block] if which is None else rows[which[start : start + block]]
        file.write(np.ascontiguousarray(chunk).tobytes())


# From this many rows (views x images; 64 MB at 1280 dims) a single process keeps the features in the
# cache's files and reads them a batch at a time (FeaturesOnDisk), so memory does not grow with the set.
ON_DISK_MIN_ROWS = 12_500


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
    prefix: FrozenPrefix | None = None,
) -> tuple[torch.Tensor | FeaturesOnDisk, dict[str, str]]:
    """Features [views, images that could be read, dim] in eval mode (on the CPU), and {path: reason}
    of the images that could not be read (left out of the features). Cached entries are reused.

    This pass is where unreadable images are found: there is no separate pass over the files before
    it, so training starts after listing them, whatever their number (a bad file is remembered by the
    decode cache, so a later run skips it at once).
    With several processes (torchrun), rank 0's cache decides what is missing, each rank computes
    every world_size-th missing image, and the results are gathered on every rank: N devices extract
    N times faster, and all ranks end with the same features and the same failures.
    `prefix` (one process, --freeze's frozen layers: of the model being fine-tuned, or the pretrained
    model's, which are the same): view 0's images whose frozen layers' output it holds, or its store has
    from an earlier run, start after those layers, undecoded; the others' output is kept for the next
    pass, and written to its store.
    One process with a cache and at least ON_DISK_MIN_ROWS rows writes each batch's rows into a new
    cache part as it goes and returns FeaturesOnDisk over the parts: the rows are never all in memory.
    """
    from .runtime import Runtime

    rt = runtime or Runtime()
    device = next(model.parameters()).device
    model.eval()
    fast_model = None  # folded lazily: only when something is missing from the cache
    split: PrefixSplit | None = None
    if rt.distributed:
        prefix = None  # ranks would each keep a shard

    def fold() -> None:
        """`fast_model`, and with `prefix` its split, made on first need."""
        nonlocal fast_model, split
        fast_model = fast_model or fold_batchnorm(model, pre.size)
        # A model that could not be folded is the one being trained: no hook goes on it.
        if prefix and split is None and fast_model is not model:
            split = prefix.split(fast_model, pre.size, channels_last)
    eval_tf, train_tf = EvalTransform(pre), TrainTransform(pre)
    identities = [file_identity(p) for p in paths]
    on_disk = cache is not None and not rt.distributed and views * len(paths) >= ON_DISK_MIN_ROWS
    # In memory: one array for every view's rows, filled in place (no per-row arrays, dicts or stacks
    # holding further copies).
    out: np.ndarray | None = None
    dim: int | None = None

    def rows_of(size: int) -> np.ndarray:
        """`out`, allocated once the feature size is known (from the cache or the first batch)."""
        nonlocal out
        if out is None:
            out = np.zeros((views, len(paths), size), np.float32)
        return out

    failed: dict[str, str] = {}
    decoder = batch_decoder()

    def decoded_or_error(i: int) -> np.ndarray | Exception:
        try:
            return decode(paths[i])
        except Exception as exc:  # raised again on this thread, where failures are recorded
            return exc

    try:
        for view in range(views):
            if on_disk:
                cached = cache.locate(view, seed, identities)[0]
            else:
                loaded = cache.load(view, seed, identities) if cache and rt.is_main else ([], None)
                cached, cached_rows = rt.broadcast(loaded)
                del loaded
                if cached:
                    rows_of(cached_rows.shape[1])[view, cached] = cached_rows
                del cached_rows
            known = set(cached)
            missing = [i for i in range(len(paths)) if i not in known and str(paths[i]) not in failed]
            mine = rt.shard(missing)
            if view == 0 and prefix and prefix.store and mine:
                fold()  # the split's check gives the output's shape, which reading stored outputs needs
                if split is not None:
                    prefix.read_stored([identities[i] for i in mine])
            position = {i: n for n, i in enumerate(mine)}  # a computed row's place in a new on-disk part
            writer: PartWriter | None = None
            computed: list[int] = []  # indices into paths whose rows were computed here
            found: dict[str, str] = {}
            chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
            try:
                for number, chunk in enumerate(progress(iter(chunks), len(chunks), f"features view {view}")):
                    if number % 16 == 15:
                        # glibc keeps freed decode and batch buffers: over 40 000 images at 96 px the resident
                        # set grew by 0.3 GB more than the features. A trim per batch kept it lower still, but
                        # its page faults cost 20% of the pass's speed; one per 16 batches does not show.
                        release_freed_memory()
                    resumed = [i for i in chunk if view == 0 and prefix and prefix.has(identities[i])]
                    if resumed:
                        fold()
                    if split is not None and resumed:
                        with torch.inference_mode(), rt.autocast():
                            batch = prefix.batch([identities[i] for i in resumed], device)
                            feats = split.features_from(batch).float().cpu().numpy()
                        dim = feats.shape[1]
                        rows_of(dim)[view, resumed] = feats
                        computed += resumed
                        resumed_set = set(resumed)
                        chunk = [i for i in chunk if i not in resumed_set]
                    images, kept = [], []
                    # The transforms stay on this thread (the random ones draw from torch's global generator).
                    for i, image in zip(chunk, decoder.map(decoded_or_error, chunk)):
                        try:
                            if isinstance(image, Exception):
                                raise image
                            if view == 0:
                                images.append(eval_tf(image))
                            else:
                                with torch.random.fork_rng(devices=[]):
                                    torch.manual_seed(_seed_for(seed, view, identities[i]))
                                    images.append(train_tf(image))
                            kept.append(i)
                        except Exception as exc:  # any failure to read or decode leaves the image out
                            found[str(paths[i])] = unreadable_reason(exc)
                    if not kept:
                        continue
                    fold()
                    with torch.inference_mode(), rt.autocast():
                        batch = normalize_batch(torch.stack(images).to(device, non_blocking=True), pre, channels_last)
                        if view == 0 and split is not None:
                            feats, frozen_output = split.features_keeping(batch)
                            prefix.keep([identities[i] for i in kept], frozen_output)
                            feats = feats.float().cpu().numpy()
                        else:
                            feats = pooled_features(fast_model, batch).float().cpu().numpy()
                    dim = feats.shape[1]
                    if on_disk:
                        writer = writer or cache.new_part(view, seed, len(mine), dim)
                        writer.write([position[i] for i in kept], [identities[i] for i in kept], feats)
                    else:
                        rows_of(dim)[view, kept] = feats
                    computed += kept
            except BaseException:
                if writer is not None:
                    writer.discard()
                raise
            if writer is not None:
                writer.finish()
            if view == 0 and split is not None:
                prefix.write_new([identities[i] for i in computed])  # for the next run's passes
            if rt.distributed and missing:
                parts = rt.all_gather(({identities[i]: out[view, i] for i in computed}, found))
                by_identity = {k: v for part, _ in parts for k, v in part.items()}
                found = {k: v for _, part in parts for k, v in part.items()}
                computed = [i for i in missing if identities[i] in by_identity]
                for i in computed:
                    rows_of(len(by_identity[identities[i]]))[view, i] = by_identity[identities[i]]
                del by_identity
            failed.update(found)
            if not on_disk and cache and computed and rt.is_main:
                every_row_new = len(computed) == len(paths)  # then out[view] is the rows, without a copy
                cache.save(view, seed, [identities[i] for i in computed], out[view],
                           None if every_row_new else computed)
            if len(paths) > 4 * batch_size:
                release_freed_memory()  # the pass's decode and batch buffers, before the next view or the head
    finally:
        decoder.shutdown(wait=True, cancel_futures=True)
    keep = [i for i, p in enumerate(paths) if str(p) not in failed]
    # In the order of `paths`, whichever rank found them.
    failures = {str(p): failed[str(p)] for p in paths if str(p) in failed}
    if on_disk:
        return _located(cache, views, seed, [identities[i] for i in keep]), failures
    if out is None or not keep:
        return torch.zeros(views, 0, 0), failures
    return torch.from_numpy(_drop_rows(out, keep)), failures


def _located(cache: FeatureCache, views: int, seed: int, identities: list[str]) -> torch.Tensor | FeaturesOnDisk:
    """FeaturesOnDisk over the cache's parts for `identities` (each must be there, in every view)."""
    files: list[Path] = []
    file_of = np.zeros((views, len(identities)), np.int32)
    row_of = np.zeros((views, len(identities)), np.int64)
    for view in range(views):
        found, view_files, view_file_of, view_row_of = cache.locate(view, seed, identities)
        if len(found) != len(identities):
            raise RuntimeError(f"feature cache {cache.directory}: {len(identities) - len(found)} rows written in "
                               "this run are missing (was the folder cleaned while training?)")
        file_of[view, found] = view_file_of + len(files)
        row_of[view, found] = view_row_of
        files += view_files
    if not identities:
        return torch.zeros(views, 0, 0)
    return FeaturesOnDisk(files, file_of, row_of, _npy_layout(files[0])[1][1])


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
