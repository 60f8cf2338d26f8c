"""Classify images with a run folder, an ONNX file or a TorchScript file.

`load(path)` picks the backend from what `path` is. The ONNX backend needs only
onnxruntime, numpy and Pillow: torch is never imported on that path, so an
exported model deploys without PyTorch. Preprocessing is the eval transform
recorded with the model (model.json, ONNX metadata or the TorchScript file).
"""

from __future__ import annotations

import glob
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import is_image_file
from .errors import UsageError
from .images import eval_input

META_KEY = "visiontune"


@dataclass
class Predictor:
    classes: list[str]
    preprocessing: dict
    backend: object  # callable: float32 NCHW array -> probabilities array
    source: str

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.backend(batch)

    def predict(self, inputs, batch_size: int = 64, top_k: int = 1) -> list[dict]:
        """One result per input path: {path, label, score, probs, top_k} or {path, error}."""
        results: list[dict | None] = [None] * len(inputs)
        ready: list[tuple[int, np.ndarray]] = []
        for index, item in enumerate(inputs):
            try:
                ready.append((index, eval_input(item, self.preprocessing)))
            except Exception as exc:  # any unreadable file: reported, the rest still classified
                results[index] = {"path": str(item), "error": f"cannot read image: {exc}".splitlines()[0]}
        for start in range(0, len(ready), batch_size):
            chunk = ready[start : start + batch_size]
            probs = self.probabilities(np.stack([x for _, x in chunk]).astype(np.float32))
            for (index, _), p in zip(chunk, probs):
                order = np.argsort(-p, kind="stable")
                results[index] = {
                    "path": str(inputs[index]),
                    "label": self.classes[int(order[0])],
                    "score": float(p[order[0]]),
                    "probs": {c: float(v) for c, v in zip(self.classes, p)},
                    "top_k": [(self.classes[int(i)], float(p[i])) for i in order[:top_k]],
                }
        return results


def _torch_backend(model):
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(batch)).float(), dim=1).numpy()

    return run


def _onnx_backend(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    return (lambda batch: session.run(None, {name: batch})[0]), (json.loads(meta) if meta else None)


def _sidecar(path: Path) -> dict | None:
    side = path.with_name(path.name + ".json")
    return json.loads(side.read_text()) if side.is_file() else None


def load(path: str | Path) -> Predictor:
    """A run folder, an exported .onnx file, or an exported TorchScript (.pt/.ts) file."""
    path = Path(path)
    if path.is_dir():
        from .runfolder import RunFolder

        model, meta = RunFolder(path).load_model()
        return Predictor(meta["classes"], meta["preprocessing"], _torch_backend(model), f"run:{path}")
    if not path.is_file():
        raise UsageError(f"{path}: no such run folder or model file; pass a run folder or an exported .onnx/.pt file.")
    if path.suffix == ".onnx":
        backend, meta = _onnx_backend(path)
        meta = meta or _sidecar(path)
        if meta is None:
            raise UsageError(f"{path}: has no visiontune metadata (classes, preprocessing); export it with `visiontune export`.")
        return Predictor(meta["classes"], meta["preprocessing"], backend, f"onnx:{path}")
    if path.suffix in (".pt", ".ts", ".torchscript"):
        import torch

        extra = {f"{META_KEY}.json": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=FutureWarning)  # jit.load's deprecation notice
                model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception:
            raise UsageError(f"{path}: is not a TorchScript file; export one with `visiontune export --format torchscript`.") from None
        meta = json.loads(extra[f"{META_KEY}.json"]) if extra[f"{META_KEY}.json"] else _sidecar(path)
        if meta is None:
            raise UsageError(f"{path}: has no visiontune metadata; export it with `visiontune export`.")
        # The exported module already ends in softmax.
        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(batch)).numpy()

        return Predictor(meta["classes"], meta["preprocessing"], run, f"torchscript:{path}")
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
