"""Fixed-extractor mode: backbone features computed once, cached on disk.

A frozen backbone in eval mode is a pure function of its input image, so
running it every epoch (as the tutorial's fixed scenario does) recomputes the
same numbers. Here every image is passed through the backbone once per view:
view 0 is the un-augmented eval crop, views 1..K-1 are random crops+flips drawn
from a generator seeded by (seed, view, file), so a view is the same whichever
order or run computes it. Each epoch draws one view per training image.

The cache is one file per (backbone, weights, preprocessing, view, seed),
mapping file identity (path, size, mtime) -> feature vector; an edited file
misses its entry and is extracted again, the rest are reused.
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
from .preprocess import EvalTransform, Preprocessing, TrainTransform, normalize_batch


def _seed_for(seed: int, view: int, identity: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{view}|{identity}".encode()).digest()[:8], "little") >> 1


class FeatureCache:
    def __init__(self, directory: Path, model_key: dict):
        self.directory = Path(directory) / "features"
        self.model_key = json.dumps(model_key, sort_keys=True)

    def _file(self, view: int, seed: int) -> Path:
        augmented_seed = seed if view > 0 else None  # view 0 has no randomness
        digest = hashlib.sha256(f"{self.model_key}|{view}|{augmented_seed}|v1".encode()).hexdigest()
        return self.directory / f"{digest}.npz"

    def load(self, view: int, seed: int) -> dict[str, np.ndarray]:
        path = self._file(view, seed)
        if not path.is_file():
            return {}
        try:
            with np.load(path) as data:
                return dict(zip(data["identities"].tolist(), data["features"]))
        except (OSError, ValueError, KeyError):
            return {}

    def save(self, view: int, seed: int, entries: dict[str, np.ndarray]) -> None:
        identities = np.array(sorted(entries))
        features = np.stack([entries[i] for i in identities.tolist()])
        atomic_write(self._file(view, seed), lambda f: np.savez(f, identities=identities, features=features),
                     durable=False)


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
    per_view = []
    failed: dict[str, str] = {}
    for view in range(views):
        known = rt.broadcast(cache.load(view, seed) if cache and rt.is_main else {})
        missing = [i for i, ident in enumerate(identities) if ident not in known and str(paths[i]) not in failed]
        mine = rt.shard(missing)
        computed = {}
        found: dict[str, str] = {}
        chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
        for chunk in progress(iter(chunks), len(chunks), f"features view {view}"):
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
            chunk = kept
            if not chunk:
                continue
            fast_model = fast_model or fold_batchnorm(model, pre.size)
            with torch.inference_mode(), rt.autocast():
                batch = normalize_batch(torch.stack(images).to(device, non_blocking=True), pre, channels_last)
                feats = pooled_features(fast_model, batch)
            for i, f in zip(chunk, feats.float().cpu().numpy()):
                computed[identities[i]] = f
        if rt.distributed and missing:
            parts = rt.all_gather((computed, found))
            computed = {k: v for part, _ in parts for k, v in part.items()}
            found = {k: v for _, part in parts for k, v in part.items()}
        failed.update(found)
        if cache and computed and rt.is_main:
            cache.save(view, seed, {**known, **computed})
        table = {**known, **computed}
        rows = [table[ident] for ident, path in zip(identities, paths) if str(path) not in failed]
        per_view.append(torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 0))
    # In the order of `paths`, whichever rank found them.
    return torch.stack(per_view), {str(p): failed[str(p)] for p in paths if str(p) in failed}


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
