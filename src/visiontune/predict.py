"""Classify images with a run folder, an ONNX file or a TorchScript file.

`load(path)` picks the backend from what `path` is. The ONNX backend needs only
onnxruntime, numpy and Pillow: torch is never imported on that path, so an
exported model deploys without PyTorch. Preprocessing is the eval transform
recorded with the model (model.json, ONNX metadata or the TorchScript file).
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DEFAULT_TOP_K
from .data import is_image_file
from .errors import UsageError
from .images import eval_input

META_KEY = "visiontune"


def describe_input(item) -> str:
    """How a result names its input: the path, or what kind of in-memory image it was."""
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"<array {'x'.join(map(str, item.shape))} {item.dtype}>"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    size = getattr(item, "size", None)
    if isinstance(size, tuple):
        return f"<PIL image {item.mode} {size[0]}x{size[1]}>"
    return f"<{type(item).__name__}>"


def _is_single(inputs) -> bool:
    from PIL import Image

    if isinstance(inputs, np.ndarray):
        return inputs.ndim <= 3  # a 4-D array is a batch of HWC images
    return isinstance(inputs, (str, Path, bytes, bytearray, memoryview, Image.Image)) or hasattr(inputs, "read")


def top_k_list(classes: list[str], probs: np.ndarray, k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": classes[int(i)], "score": float(probs[i])} for i in order]


@dataclass
class Predictor:
    classes: list[str]
    preprocessing: dict
    backend: object  # callable: float32 NCHW array -> probabilities array
    source: str
    meta: dict = field(default_factory=dict)  # model.json of a run, the metadata of an exported file
    tta: bool = False  # average each image's probabilities with its mirror image's

    def probabilities(self, batch: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """Normalised NCHW float32 -> class probabilities (N, classes)."""
        probs = self.backend(batch)
        if self.tta if tta is None else tta:
            probs = (probs + self.backend(np.ascontiguousarray(batch[..., ::-1]))) / 2
        return probs

    @property
    def multi_label(self) -> bool:
        return self.meta.get("task") == "multi-label"

    def describe(self, probs: np.ndarray, top_k: int = DEFAULT_TOP_K) -> dict:
        """One image's answer from its probabilities: label, score, probs, top_k; multi-label runs add
        `labels` (every class at or above its threshold; `label` is them joined by |, `score` the top one)."""
        best = int(np.argmax(probs))
        answer = {"label": self.classes[best], "score": float(probs[best]),
                  "probs": {c: float(v) for c, v in zip(self.classes, probs)},
                  "top_k": top_k_list(self.classes, probs, top_k)}
        if self.multi_label:
            thresholds = self.meta.get("thresholds") or [0.5] * len(self.classes)
            labels = [c for c, v, t in zip(self.classes, probs, thresholds) if v >= t]
            answer = {"labels": labels, **answer, "label": "|".join(labels)}
        return answer

    def preprocess(self, item) -> np.ndarray:
        """One image (path, bytes, file object, PIL image, HWC uint8 array) -> normalised CHW float32."""
        return eval_input(item, self.preprocessing)

    def predict(self, inputs, batch_size: int = 64, top_k: int = DEFAULT_TOP_K, tta: bool | None = None):
        """Classify one image or a list of them: paths, bytes, file objects, PIL images or HWC uint8 arrays.

        One input gives one dict, a list gives a list: {path or input, label, score, probs, top_k}, or
        {path or input, error} for an image that cannot be read (the others are still classified).
        """
        single = _is_single(inputs)
        items = [inputs] if single else list(inputs)
        results: list[dict | None] = [None] * len(items)
        names = [describe_input(item) for item in items]
        key = ["path" if isinstance(item, (str, Path)) else "input" for item in items]

        def preprocessed(index: int) -> np.ndarray | Exception:
            try:
                return self.preprocess(items[index])
            except Exception as exc:  # any unreadable image: reported, the rest still classified
                return exc

        def classify(ready: list[tuple[int, np.ndarray]]) -> None:
            probs = self.probabilities(np.stack([x for _, x in ready]).astype(np.float32), tta)
            for (index, _), p in zip(ready, probs):
                results[index] = {key[index]: names[index], **self.describe(p, top_k)}

        # A batch at a time, so memory holds one batch of inputs however many images are given (the
        # whole list preprocessed first took 0.6 MB an image at 224 px: 6 GB for 10 000). Batches are made
        # of readable images, as many as batch_size. Files and bytes are decoded on several threads (Pillow
        # releases the GIL); PIL images and file objects on this one (one object may be given twice).
        workers = min(8, os.cpu_count() or 1, len(items))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="visiontune-decode") if workers > 1 else None
        try:
            ready: list[tuple[int, np.ndarray]] = []
            for start in range(0, len(items), batch_size):
                indices = range(start, min(start + batch_size, len(items)))
                ahead = {i: pool.submit(preprocessed, i) for i in indices
                         if pool and isinstance(items[i], (str, Path, bytes, bytearray))}
                for index in indices:
                    x = ahead[index].result() if index in ahead else preprocessed(index)
                    if isinstance(x, Exception):
                        results[index] = {key[index]: names[index], "error": f"cannot read image: {x}".splitlines()[0]}
                    else:
                        ready.append((index, x))
                    if len(ready) == batch_size:
                        classify(ready)
                        ready = []
            if ready:
                classify(ready)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return results[0] if single else results


def _torch_backend(model, device: str = "auto", multi_label: bool = False):
    import torch

    from .runtime import resolve_device

    target = resolve_device(device)
    model = model.to(target).eval()
    squash = torch.sigmoid if multi_label else (lambda x: torch.softmax(x, dim=1))

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return squash(model(torch.from_numpy(batch).to(target)).float()).cpu().numpy()

    return run


def _onnx_providers(device: str) -> list[str]:
    """--device for onnxruntime, without torch: cpu, or cuda when onnxruntime has its CUDA provider."""
    import onnxruntime as ort

    flag = (device or "auto").strip().lower()
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if flag == "cpu" or (flag == "auto" and not has_cuda):
        return ["CPUExecutionProvider"]
    if flag in ("auto", "cuda") or flag.startswith("cuda:"):
        if not has_cuda:
            raise UsageError(f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu), "
                             "or use --device cpu.")
        index = int(flag.split(":", 1)[1]) if ":" in flag and flag.split(":", 1)[1].isdigit() else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise UsageError(f"--device {device}: is not one of auto, cpu, cuda, cuda:N.")


def _onnx_backend(path: Path, device: str = "cpu"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=_onnx_providers(device))
    except UsageError:
        raise
    except Exception:
        raise UsageError(f"{path}: is not a readable ONNX model; export one with `visiontune export`.") from None
    name = session.get_inputs()[0].name
    meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    return (lambda batch: session.run(None, {name: batch})[0]), (json.loads(meta) if meta else None)


def _softmax_if_logits(run, meta: dict):
    """An exported model says whether it outputs probabilities or logits; predict always gives probabilities
    (a sigmoid per class for a multi-label model)."""
    if meta.get("output", "probs") == "probs":
        return run

    def probabilities(batch: np.ndarray) -> np.ndarray:
        logits = run(batch).astype(np.float64)
        if meta.get("task") == "multi-label":
            return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    return probabilities


def _sidecar(path: Path) -> dict | None:
    side = path.with_name(path.name + ".json")
    return json.loads(side.read_text()) if side.is_file() else None


def load(path: str | Path, device: str = "auto", tta: bool = False) -> Predictor:
    """A run folder, an exported .onnx file, or an exported TorchScript (.pt/.ts) file, ready to predict.

    device: auto (a GPU when one is visible), cpu, cuda, cuda:N. tta: average with the mirror image.
    """
    path = Path(path)
    if path.is_dir():
        from .runfolder import RunFolder

        model, meta = RunFolder(path).load_model()
        backend = _torch_backend(model, device, meta.get("task") == "multi-label")
        return Predictor(meta["classes"], meta["preprocessing"], backend, f"run:{path}", meta, tta)
    if not path.is_file():
        raise UsageError(f"{path}: no such run folder or model file; pass a run folder or an exported .onnx/.pt file.")
    if path.suffix == ".onnx":
        backend, meta = _onnx_backend(path, device)
        meta = meta or _sidecar(path)
        if meta is None:
            raise UsageError(f"{path}: has no visiontune metadata (classes, preprocessing); export it with `visiontune export`.")
        return Predictor(meta["classes"], meta["preprocessing"], _softmax_if_logits(backend, meta), f"onnx:{path}",
                         meta, tta)
    if path.suffix in (".pt", ".ts", ".torchscript"):
        import torch

        from .runtime import resolve_device

        target = resolve_device(device)
        extra = {f"{META_KEY}.json": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=FutureWarning)  # jit.load's deprecation notice
                model = torch.jit.load(str(path), map_location=target, _extra_files=extra)
        except Exception:
            raise UsageError(f"{path}: is not a TorchScript file; export one with `visiontune export --format torchscript`.") from None
        meta = json.loads(extra[f"{META_KEY}.json"]) if extra[f"{META_KEY}.json"] else _sidecar(path)
        if meta is None:
            raise UsageError(f"{path}: has no visiontune metadata; export it with `visiontune export`.")
        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(batch).to(target)).cpu().numpy()

        return Predictor(meta["classes"], meta["preprocessing"], _softmax_if_logits(run, meta), f"torchscript:{path}",
                         meta, tta)
    raise UsageError(f"{path}: unknown model file type; pass a run folder, a .onnx or a .pt file.")


def expand_inputs(specs: list[str]) -> tuple[list[Path], list[dict]]:
    """Files, folders (recursive, image extensions only) and globs -> paths; unmatched specs -> error rows."""
    paths: list[Path] = []
    errors: list[dict] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if is_image_file(q))
        elif p.exists():
            paths.append(p)
        elif any(ch in spec for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                errors.append({"path": spec, "error": "the pattern matches no file"})
            paths += matches
        else:
            errors.append({"path": spec, "error": "no such file or folder"})
    return paths, errors
