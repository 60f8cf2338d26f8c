"""visiontune: fine-tune a pretrained image classifier on your own folder of images."""

from .config import TrainConfig
from .errors import DataError, UsageError, VisiontuneError
from .training import Run, train

__all__ = ["train", "Run", "TrainConfig", "VisiontuneError", "UsageError", "DataError"]
__version__ = "0.1.0"
