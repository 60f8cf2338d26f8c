"""Preprocessing derived from the backbone's data config, never hard-coded.

Images arrive as uint8 HWC arrays whose shorter side is already the resize size
(`int(input_size / crop_pct)`, 256 for a 224 model). Eval = center crop. Train
= random resized crop + horizontal flip. Normalisation happens once per batch
on the float tensor (cheaper than per image), in `normalize_batch`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Preprocessing:
    size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float

    @classmethod
    def from_data_config(cls, cfg: dict, size: int | None = None) -> "Preprocessing":
        size = int(size or cfg["input_size"][-1])
        return cls(
            size=size,
            resize=int(math.floor(size / cfg["crop_pct"])),
            interpolation=cfg["interpolation"],
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            crop_pct=float(cfg["crop_pct"]),
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Preprocessing":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def to_chw_tensor(array: np.ndarray) -> torch.Tensor:
    # np.array copies out of a read-only memory map, which torch cannot wrap.
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1)


class EvalTransform:
    """Center crop of the resized image (the resized image comes from the decoder)."""

    def __init__(self, pre: Preprocessing):
        self.size = pre.size

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        return TF.center_crop(to_chw_tensor(array), [self.size, self.size])


class TrainTransform:
    """Random resized crop (scale 0.25-1: enough variety for small data without
    throwing away most of the object) and horizontal flip, on uint8 tensors."""

    def __init__(self, pre: Preprocessing, size: int | None = None, scale: tuple[float, float] = (0.25, 1.0),
                 strength: str = "light"):
        size = size or pre.size
        if strength == "none":
            steps = [v2.Resize(int(size / pre.crop_pct), antialias=True), v2.CenterCrop(size)]
        else:
            steps = [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()]
            if strength == "strong":
                steps.append(v2.TrivialAugmentWide())
        self.augment = v2.Compose(steps)

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        return self.augment(to_chw_tensor(array))


def normalize_batch(images: torch.Tensor, pre: Preprocessing, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> normalised float32, optionally channels_last (faster convolutions on CPU)."""
    # On the images' device: a GPU run moves uint8 pixels (4x fewer bytes) and normalises there.
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
