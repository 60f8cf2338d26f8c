"""Any timm name: pretrained tags and hf-hub: names, resolved from a local Hugging Face cache offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<revision>/<files>}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


@pytest.fixture
def hub_cache(tmp_path):
    import timm

    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()}
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    config = {"architecture": "test_efficientnet", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                 "crop_pct": 1.0, "interpolation": "bilinear", "classifier": "classifier",
                                 "num_classes": 1000}}
    cache = tmp_path / "hf"
    cache_repo(cache, "visiontune-test/tiny", {"config.json": json.dumps(config).encode(),
                                               "model.safetensors": weights.read_bytes()})
    cache_repo(cache, "timm/test_efficientnet.r160_in1k", {"model.safetensors": weights.read_bytes()})
    return cache, state


def train(data: Path, out: Path, model: str, cache: Path, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache)}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "visiontune", "train", str(data), "--model", model, "--mode", "fixed",
                           "--epochs", "1", "--batch-size", "4", "--quiet", "--no-channels-last", "--out", str(out),
                           "--cache-dir", str(out.parent / "cache")],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("name, size", [("hf-hub:visiontune-test/tiny", 64), ("test_efficientnet.r160_in1k", 160)])
def test_hub_and_tag_names_load_from_the_local_cache(tiny_data, tmp_path, hub_cache, name, size):
    cache, state = hub_cache
    result = train(tiny_data, tmp_path / "run", name, cache)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["backbone"] == name and meta["architecture"] == "test_efficientnet"
    assert meta["weights_source"].startswith("hub:") and meta["preprocessing"]["size"] == size
    trained = load_file(str(tmp_path / "run" / "best.safetensors"))
    backbone = [k for k in state if not k.startswith("classifier.")]
    assert all(torch.equal(trained[k], state[k]) for k in backbone)  # fixed mode: the cached weights, untouched
    # The run rebuilds from model.json alone, without the hub.
    from visiontune.runfolder import RunFolder

    model, _ = RunFolder(tmp_path / "run").load_model()
    assert model.num_classes == 2


def test_missing_hub_weights_offline_is_one_sentence(tiny_data, tmp_path):
    result = train(tiny_data, tmp_path / "run", "test_efficientnet.r160_in1k", tmp_path / "empty", offline=True)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "timm/test_efficientnet.r160_in1k/model.safetensors is not in the local Hugging Face cache" in line
    assert "--weights FILE" in line
    result = train(tiny_data, tmp_path / "run2", "test_efficientnet.no_such_tag", tmp_path / "empty", offline=True)
    assert result.returncode == 2 and "no pretrained tag 'no_such_tag'" in result.stderr and "r160_in1k" in result.stderr
