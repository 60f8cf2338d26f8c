"""Shared fixtures: tiny generated image folders and a tiny backbone for fast unit tests."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = (REPO / ".." / "shared" / "data" / "hymenoptera_data").resolve()

# Two cores: keep every test on the same small thread pool.
torch.set_num_threads(min(2, os.cpu_count() or 1))


# Prepended to a `python -c` script: any import of torch, torchvision or timm fails, so the script
# shows that what it runs (ONNX predict, ONNX serving) needs none of them.
WITHOUT_TORCH = (
    "import sys\n"
    "class NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.') or name in ('torchvision', 'timm'):\n"
    "            raise ImportError('torch is blocked in this test')\n"
    "sys.meta_path.insert(0, NoTorch())\n"
)


def approx_loss(expected: float):
    """A loss (a mean of float32 per-sample losses) compared to a relative tolerance.

    The float32 sum's rounding depends on the CPU's kernels (AVX-512 on Intel, AVX2 on AMD sum in
    other orders), so two x86 machines agree to about 1e-6 relative, not to a fixed number of
    decimals: 12488.574 vs 12488.579 is 4e-7 relative, far above any absolute 1e-5.
    """
    return pytest.approx(expected, rel=1e-5, abs=1e-6)


def without_timing(rows: list[dict]) -> list[dict]:
    """Metric rows less the wall-clock column, the one thing two identical runs never share."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def read_metrics(run_dir: Path, timing: bool = True) -> list[dict]:
    """A run's metrics.csv as dicts of strings; timing=False drops the seconds column."""
    with (Path(run_dir) / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows if timing else without_timing(rows)


class StopInEpoch(Exception):
    """Raised by `stop_in_epoch`: stands for a run killed in that epoch, before its row is written."""


def stop_in_epoch(monkeypatch, stop_at: int) -> None:
    """Make training raise StopInEpoch when epoch `stop_at` ends (before its row and checkpoint)."""
    from visiontune import training

    epoch_row = training._epoch_row

    def stopping(s, folder, loop, stage, epoch, *args):
        if epoch == stop_at:
            raise StopInEpoch
        return epoch_row(s, folder, loop, stage, epoch, *args)

    monkeypatch.setattr(training, "_epoch_row", stopping)


def train_stopped_in_epoch(monkeypatch, stop_at: int, data: Path, out: Path, settings: dict) -> None:
    """A run killed in epoch `stop_at`: its folder holds last.ckpt of the epoch saved before."""
    import visiontune

    with monkeypatch.context() as patch:
        stop_in_epoch(patch, stop_at)
        with pytest.raises(StopInEpoch):
            visiontune.train(data, out=str(out), **settings)


def train_stopped_at(monkeypatch, step: str, data: Path, out: Path, settings: dict) -> None:
    """A run stopped when it reaches training.`step` (e.g. "_choose_bn", "_plan_auto", "full_stage"):
    its folder holds what was saved before that point."""
    import visiontune
    from visiontune import training

    def stop(*args, **kwargs):
        raise StopInEpoch

    with monkeypatch.context() as patch:
        patch.setattr(training, step, stop)
        with pytest.raises(StopInEpoch):
            visiontune.train(data, out=str(out), **settings)


def assert_same_run(expected, actual) -> None:
    """Two finished runs are the same run: metrics.csv without its timing column, and every weight."""
    assert read_metrics(expected.path, timing=False) == read_metrics(actual.path, timing=False)
    for k, v in expected.model.state_dict().items():
        assert torch.equal(v, actual.model.state_dict()[k]), k


def needs_hymenoptera():
    return pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} not present")


@pytest.fixture(scope="session")
def hymenoptera_cache(tmp_path_factory) -> Path:
    """One cache for the hymenoptera runs of a session: the first run decodes the images cold, the
    later ones read them, as a user's second run does."""
    return tmp_path_factory.mktemp("hymenoptera-cache")


@pytest.fixture(scope="session")
def hymenoptera_fixed_run(tmp_path_factory, hymenoptera_cache):
    """The tutorial's fixed-feature scenario, 5 epochs, seed 0: made once, read-only for every test."""
    import visiontune

    out = tmp_path_factory.mktemp("hymenoptera-fixed") / "run"
    return visiontune.train(HYMENOPTERA, mode="fixed", epochs=5, seed=0, out=str(out),
                            cache_dir=str(hymenoptera_cache), quiet=True)


def make_image(path: Path, label: int, rng: np.random.Generator, size=(40, 32), fmt: str | None = None) -> None:
    """Class 0 is reddish, class 1 blueish, class 2 greenish, with noise: learnable in a few steps."""
    w, h = size
    base = np.zeros((h, w, 3), dtype=np.float64)
    base[..., label % 3] = 180
    pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def make_folder(root: Path, per_class: dict[str, int], layout: str = "split", seed: int = 0,
                val_per_class: int = 3, ext: str = ".png") -> Path:
    """layout "split": root/train/<c>, root/val/<c>; layout "flat": root/<c>."""
    rng = np.random.default_rng(seed)
    for label, (cls, n) in enumerate(sorted(per_class.items())):
        for i in range(n):
            folder = root / "train" / cls if layout == "split" else root / cls
            make_image(folder / f"{cls}_{i}{ext}", label, rng)
        if layout == "split":
            for i in range(val_per_class):
                make_image(root / "val" / cls / f"{cls}_v{i}{ext}", label, rng)
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", {"ants": 9, "bees": 8})


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A randomly initialised timm test_efficientnet (100k parameters, BatchNorm) saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet")
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def tiny_settings(tiny_weights: Path, tmp_path: Path) -> dict:
    """Settings for a fast run of the whole pipeline on the tiny backbone."""
    return {"model": "test_efficientnet", "weights": str(tiny_weights), "image_size": 48, "train_size": 48,
            "batch_size": 4, "epochs": 2, "cache_dir": str(tmp_path / "cache"), "quiet": True,
            "channels_last": False, "log": "none"}


@pytest.fixture
def tiny_run(tiny_data, tiny_settings, tmp_path):
    """A finished 3-epoch run of the tiny backbone on tiny_data (6 val images)."""
    import visiontune

    return visiontune.train(tiny_data, out=str(tmp_path / "run"), **{**tiny_settings, "epochs": 3})
