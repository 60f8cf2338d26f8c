"""Decoding images to RGB at the size the model needs, and the decode cache.

Large photos are decoded with Pillow's JPEG draft mode: libjpeg's DCT scaling
decodes directly at 1/2, 1/4 or 1/8 scale, never below the size the transform
needs, which is several times cheaper than a full decode followed by a resize.
The result (shorter side = the transform's resize size, uint8 RGB) is stored
once per file in a disk cache, so later epochs and later runs only crop, flip
and normalise.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .files import atomic_write

MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb threshold
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels become white, not black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / high), 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resized_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side = short_side, as torchvision's Resize(int) computes it."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def open_image(source) -> tuple[Image.Image, bool]:
    """A path, encoded bytes, a binary file object, a PIL image or an HWC uint8 array -> (image, owned).

    `owned` is False for a PIL image the caller passed in: it is neither closed nor changed here.
    """
    if isinstance(source, Image.Image):
        return source, False
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or not (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3, 4))):
            raise ValueError(f"an array image must be uint8 HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA); got "
                             f"{source.dtype} {'x'.join(map(str, source.shape))}")
        array = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        return Image.fromarray(np.ascontiguousarray(array)), True
    if hasattr(source, "read_bytes") and not isinstance(source, (str, Path)):  # a member of a tar shard
        source = source.read_bytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ValueError("the image is empty (0 bytes)")
        source = io.BytesIO(bytes(source))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked by the caller, from the header
        try:
            return Image.open(source), True
        except Image.UnidentifiedImageError:
            raise ValueError("not an image Pillow can read (JPEG, PNG, WebP, BMP, GIF, TIFF, ...)") from None


def decode_rgb(source, short_side: int | None = None, interpolation: str = "bicubic") -> Image.Image:
    """Open `source` (see open_image), apply EXIF orientation, convert to RGB, optionally resize the
    shorter side. A path and its bytes decode identically; an already decoded PIL image or array
    skips JPEG draft mode, so a large JPEG given that way differs from its file by a few levels."""
    image, owned = open_image(source)
    try:
        w, h = image.size
        if w * h > MAX_PIXELS:  # checked from the header, before any pixel is allocated
            raise ValueError(f"decompression bomb: {w}x{h} pixels is over the {MAX_PIXELS:,} limit; refused")
        if owned and short_side is not None and image.format == "JPEG":
            # Ask libjpeg for the smallest DCT scale that keeps both sides at or
            # above the target; EXIF rotation may swap sides, so use the short one.
            scale = short_side / min(w, h)
            image.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        image.load()
        rgb = _to_rgb(ImageOps.exif_transpose(image))
    finally:
        if owned:
            image.close()
    if short_side is not None:
        size = resized_shape(*rgb.size, short_side)
        if size != rgb.size:
            rgb = rgb.resize(size, _RESAMPLE[interpolation])
    return rgb


def decode_array(source, short_side: int, interpolation: str = "bicubic") -> np.ndarray:
    """HWC uint8 RGB array, shorter side = short_side."""
    return np.asarray(decode_rgb(source, short_side, interpolation), dtype=np.uint8)


def file_identity(path: str | Path) -> str:
    """What makes a cached result of this file valid: its absolute path, size and mtime."""
    if hasattr(path, "identity"):  # a member of a tar shard: the shard's, plus the member's name
        return path.identity()
    # os.path.abspath, not Path.resolve: no symlink walk, 8x faster (0.09 s vs 0.72 s for 12 000
    # files here), which is most of the start-up of a 50 000-image run (bench/scale.py).
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def default_cache_dir() -> Path:
    if os.environ.get("VISIONTUNE_CACHE"):
        return Path(os.environ["VISIONTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "visiontune"


class DecodeCache:
    """Decoded, resized uint8 images on disk, one memory-mapped .npy per source file.

    Entries are keyed by file identity (path, size, mtime), resize size and
    interpolation, so an edited file is decoded again. Past `max_bytes` of new
    entries in this process, images are decoded on every access instead
    (streaming), so a huge data set cannot fill the disk.
    """

    def __init__(self, short_side: int, interpolation: str = "bicubic", directory: Path | None = None,
                 max_bytes: int = 8 << 30):
        self.short_side = short_side
        self.interpolation = interpolation
        self.directory = (directory or default_cache_dir()) / "decoded"
        self.max_bytes = max_bytes
        self.bytes_written = 0
        self._budget = threading.Lock()  # feature extraction decodes a batch on several threads

    def __getstate__(self) -> dict:  # a loader worker started by spawn gets a copy: a lock does not pickle
        return {k: v for k, v in self.__dict__.items() if k != "_budget"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._budget = threading.Lock()

    def _entry(self, path: str | Path) -> Path:
        key = hashlib.sha256(f"{file_identity(path)}|{self.short_side}|{self.interpolation}|v1".encode()).hexdigest()
        return self.directory / key[:2] / f"{key}.npy"

    def __call__(self, path: str | Path) -> np.ndarray:
        entry = self._entry(path)
        if entry.is_file():
            try:
                return np.load(entry, mmap_mode="r")
            except (ValueError, OSError):
                entry.unlink(missing_ok=True)  # damaged entry: decode again
        known_bad = entry.with_suffix(".bad")
        if known_bad.is_file():
            raise ValueError(known_bad.read_text())
        try:
            array = decode_array(path, self.short_side, self.interpolation)
        except Exception as exc:
            # Remember the failure (same key: path, size, mtime), so the next run does not decode it again.
            reason = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            try:
                known_bad.parent.mkdir(parents=True, exist_ok=True)
                known_bad.write_text(reason)
            except OSError:
                pass
            raise
        with self._budget:
            fits = self.bytes_written + array.nbytes <= self.max_bytes
            if fits:
                self.bytes_written += array.nbytes
        if fits:
            try:
                atomic_write(entry, lambda f: np.save(f, array), durable=False)
            except OSError:
                self.max_bytes = 0  # cache folder not writable: stream from now on
        return array


def center_crop_array(array: np.ndarray, size: int) -> np.ndarray:
    """HWC center crop, placed exactly as torchvision's center_crop places it."""
    h, w = array.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return array[top : top + size, left : left + size]


def eval_crop(source, pre: dict) -> np.ndarray:
    """What the model sees, before normalisation: the resized, center-cropped uint8 HWC image."""
    return center_crop_array(decode_array(source, pre["resize"], pre["interpolation"]), pre["size"])


def normalize_crop(crop: np.ndarray, pre: dict) -> np.ndarray:
    """uint8 HWC crop -> normalised float32 CHW, as the model takes it."""
    mean = np.asarray(pre["mean"], dtype=np.float32) * 255.0
    std = np.asarray(pre["std"], dtype=np.float32) * 255.0
    return ((crop.astype(np.float32) - mean) / std).transpose(2, 0, 1)


def eval_input(source, pre: dict) -> np.ndarray:
    """The eval preprocessing without torch: decode, resize, center crop, normalise -> float32 CHW."""
    return normalize_crop(eval_crop(source, pre), pre)


def unreadable_reason(exc: BaseException) -> str:
    """Why an image could not be used, in one line (for excluded.csv and the warning)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def screen_images(decode, paths: list[Path], progress, rt=None) -> dict[str, str]:
    # Used by --strict only (all or nothing before anything is written); otherwise the passes that
    # read the images anyway find the bad ones (features.extract_features, data.collate_readable).
    """Decode every image once (threads: Pillow releases the GIL); {path: reason} of the failures.

    With the decode cache, a good image is decoded only on the first run and a
    bad one is remembered as bad (keyed by size and mtime), so later runs screen
    from the cache. With several processes each screens its share.
    """
    from .runtime import Runtime

    rt = rt or Runtime()

    def attempt(path: Path) -> str | None:
        try:
            decode(path)
            return None
        except Exception as exc:  # any failure to read or decode leaves the image out
            return unreadable_reason(exc)

    mine = rt.shard(paths)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(progress(pool.map(attempt, mine), len(mine), "checking images"))
    found = {str(p): why for p, why in zip(mine, reasons) if why is not None}
    merged = {k: v for part in rt.all_gather(found) for k, v in part.items()}
    return {str(p): merged[str(p)] for p in paths if str(p) in merged}
