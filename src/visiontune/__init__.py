"""visiontune: fine-tune a pretrained image classifier on your own folder of images.

Attributes are imported on first use, so that `visiontune.load("model.onnx")`
and `visiontune predict model.onnx ...` work without importing torch.
"""

from .errors import DataError, UsageError, VisiontuneError

__all__ = ["train", "resume", "load", "Run", "TrainConfig", "VisiontuneError", "UsageError", "DataError"]
__version__ = "0.1.0"

_LAZY = {"train": "training", "resume": "training", "Run": "training", "TrainConfig": "config", "load": "predict"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'visiontune' has no attribute {name!r}")
