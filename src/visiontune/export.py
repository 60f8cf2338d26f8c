"""`visiontune export`: ONNX or TorchScript, checked against PyTorch before it counts.

The exported graph takes a dynamic batch of normalised NCHW float32 images and
outputs probabilities (`--output probs`, the default: it ends in softmax) or
logits (`--output logits`, as timm's exporter gives them); which one is said in
the metadata ("output"), and `visiontune predict`/`serve` apply softmax to logits. Class names and preprocessing
travel with it: ONNX metadata (key "visiontune") or a TorchScript extra file,
and a sidecar `<file>.json` in both cases. After export the artifact is run on
real images of the run's val split and compared with PyTorch; a max absolute
difference of probabilities above 1e-4 deletes the file and fails.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import write_json
from .errors import UsageError, VisiontuneError
from .runfolder import RunFolder
from .images import eval_input

TOLERANCE = 1e-4
ONNX_OPSET = 17


class WithSoftmax(nn.Module):
    """The classifier ending in its probabilities: softmax, or a sigmoid per class for multi-label."""

    def __init__(self, model: nn.Module, multi_label: bool = False):
        super().__init__()
        self.model = model
        self.multi_label = multi_label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def _check_images(run: Path, meta: dict, limit: int | None) -> np.ndarray:
    items = RunFolder(run).read_split("val", meta["classes"])[:limit]
    return np.stack([eval_input(p, meta["preprocessing"]) for p, _ in items]).astype(np.float32)


OUTPUTS = ("probs", "logits")


def export_run(run: str | Path, fmt: str = "onnx", out: str | Path | None = None, check_images: int | None = 64,
               output: str = "probs") -> tuple[Path, float]:
    """Write the artifact; return its path and the max |p_artifact - p_torch| (probabilities) on real images."""
    if output not in OUTPUTS:
        raise UsageError(f"--output {output!r}: use probs (softmax probabilities) or logits.")
    with warnings.catch_warnings():
        # PyTorch deprecates both exporters' entry points; the user can do nothing about it.
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return _export(Path(run), fmt, out, check_images, output)


def _export(run: Path, fmt: str, out: str | Path | None, check_images: int | None, output: str) -> tuple[Path, float]:
    from .predict import META_KEY, load

    model, meta = RunFolder(run).load_model()
    suffix = {"onnx": ".onnx", "torchscript": ".pt"}.get(fmt)
    if suffix is None:
        raise UsageError(f"--format {fmt!r}: use onnx or torchscript.")
    out = Path(out) if out else RunFolder(run).export_file(suffix)
    if out.exists():
        raise UsageError(f"--out {out}: already exists; choose another file or delete it first.")
    multi = meta.get("task") == "multi-label"
    reference = WithSoftmax(model, multi).eval()
    wrapped = reference if output == "probs" else model.eval()
    artifact_meta = {"classes": meta["classes"], "preprocessing": meta["preprocessing"],
                     "architecture": meta["architecture"], "source_run": str(run.resolve()), "output": output,
                     "task": meta.get("task", "single-label")}
    if multi:
        artifact_meta["thresholds"] = meta.get("thresholds") or [0.5] * len(meta["classes"])
    size = meta["preprocessing"]["size"]
    example = torch.zeros(2, 3, size, size)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        if fmt == "onnx":
            _export_onnx(wrapped, example, tmp, artifact_meta, META_KEY, output)
        else:
            with torch.inference_mode():
                traced = torch.jit.trace(wrapped, example)
            traced.save(str(tmp), _extra_files={f"{META_KEY}.json": json.dumps(artifact_meta)})
        tmp.replace(out)
        write_json(out.with_name(out.name + ".json"), artifact_meta)
        images = _check_images(run, meta, check_images)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(images)).numpy()
        got = load(out).probabilities(images)
        diff = float(np.abs(got - expected).max())
    except VisiontuneError:
        raise
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise VisiontuneError(f"export to {fmt} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if diff > TOLERANCE:
        out.unlink(missing_ok=True)
        out.with_name(out.name + ".json").unlink(missing_ok=True)
        raise VisiontuneError(f"the {fmt} export differs from PyTorch by {diff:.2e} (> {TOLERANCE}) on real images; it was deleted.")
    return out, diff


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict, key: str, output: str) -> None:
    import onnx

    torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=[output],
                      dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}}, opset_version=ONNX_OPSET,
                      dynamo=False)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, json.dumps(meta)
    onnx.save(proto, str(path))
