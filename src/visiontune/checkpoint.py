"""File formats of a run: weights (safetensors), JSON sidecars, the resumable state, RNG states.

Which file of a run folder holds what is said in one place, runfolder.py; this module says how
each kind of file is written and read.

Every write goes to a temporary file in the same folder, is fsynced, then
renamed over the target, so a kill at any moment leaves either the old file or
the new one, never half of one. Loading never unpickles: weights are read with
safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from .errors import UsageError
from .files import atomic_write

FORMAT_VERSION = 1


def write_json(path: Path, data) -> None:
    atomic_write(Path(path), lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    # contiguous clones: safetensors refuses views and shared storage.
    blob = save({k: v.detach().contiguous().clone() for k, v in state.items()})
    atomic_write(Path(path), lambda f: f.write(blob))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream a run draws from, in types `torch.load(weights_only=True)` accepts."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
        "sampler": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    generator.set_state(state["sampler"])


def save_training_state(path: Path, state: dict) -> None:
    """last.ckpt: atomically, so a kill at any moment leaves the previous one intact."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))


def load_training_state(path: Path) -> dict:
    """Read last.ckpt without executing code: `weights_only=True` refuses any pickled object."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(
            f"{path}: is not a checkpoint visiontune can load safely ({type(exc).__name__}); "
            "it may be damaged or not written by visiontune, so start a new run instead."
        ) from None
