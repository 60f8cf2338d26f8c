"""Why the model decided: class activation heatmaps through the `grad-cam` package.

`visiontune explain RUN IMAGES... --out DIR` writes, per image, the center crop the
model saw with the heatmap of the explained class laid over it, and one JSON line
with the prediction. The layer explained is found by running the model once: the
last module whose output is still a spatial map (N, C, H, W with H, W > 1), which
for timm's convolutional backbones is the final conv/BN/activation before global
pooling. Transformers (token outputs) are refused with a sentence, not explained
wrongly.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_TOP_K, EXPLAIN_METHODS
from .errors import UsageError
from .images import eval_crop, normalize_crop
from .predict import describe_input, top_k_list



def find_target_layer(model: nn.Module, size: int) -> nn.Module:
    """The last module, in the order the forward pass runs them, whose output is a spatial map."""
    seen: list[nn.Module] = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[-2:]) > 1:
            seen.append(module)

    hooks = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        raise UsageError("explain: this backbone has no spatial feature map before its head (a transformer?); "
                         "heatmaps work for convolutional backbones such as the default efficientnet_lite0.")
    return seen[-1]


def _cam_class(method: str):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM

    try:
        return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "layercam": LayerCAM}[method]
    except KeyError:
        raise UsageError(f"--method {method}: is not one of {', '.join(EXPLAIN_METHODS)}.") from None


def overlay(image: np.ndarray, heat: np.ndarray, weight: float = 0.45) -> np.ndarray:
    """uint8 HWC image with the [0, 1] heatmap laid over it in the jet colour map."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255.0, heat.astype(np.float32), use_rgb=True,
                             image_weight=1.0 - weight)


def png_data_url(image: np.ndarray) -> str:
    import base64

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Explanation:
    label: str  # the predicted class
    score: float
    probs: dict[str, float]
    top_k: list[dict]
    explained: str  # the class whose evidence the heatmap shows
    image: np.ndarray  # uint8 HWC: the crop the model saw
    heatmap: np.ndarray  # float32 HW in [0, 1], same size as image

    def overlay(self) -> np.ndarray:
        return overlay(self.image, self.heatmap)


class Explainer:
    """Heatmaps for one classifier. It works on its own copy of the model, so hooks and gradients
    never touch a model that is serving predictions at the same time."""

    def __init__(self, model: nn.Module, classes: list[str], preprocessing: dict, method: str = "gradcam",
                 device: str | torch.device = "cpu", multi_label: bool = False):
        self.squash = torch.sigmoid if multi_label else (lambda x: torch.softmax(x, dim=1))
        self.model = copy.deepcopy(model).to(device).eval().float()
        for p in self.model.parameters():
            p.requires_grad_(True)  # a frozen backbone still passes gradients to the explained layer
        self.classes = classes
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.layer = find_target_layer(self.model, preprocessing["size"])
        self.cam = _cam_class(method)(model=self.model, target_layers=[self.layer])

    @classmethod
    def from_run(cls, run: str | Path, method: str = "gradcam", device: str = "auto") -> "Explainer":
        from .runfolder import RunFolder
        from .runtime import resolve_device

        model, meta = RunFolder(run).load_model()
        return cls(model, meta["classes"], meta["preprocessing"], method, resolve_device(device),
                   meta.get("task") == "multi-label")

    def class_index(self, name: str | None) -> int | None:
        if name is None:
            return None
        if name not in self.classes:
            raise UsageError(f"--class {name!r}: is not a class of this model; its classes are "
                             f"{', '.join(self.classes)}.")
        return self.classes.index(name)

    def heatmaps(self, batch: torch.Tensor, class_indices: list[int]) -> np.ndarray:
        """Normalised NCHW batch -> (N, H, W) heatmaps in [0, 1], one per image for its class."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        return self.cam(input_tensor=batch.to(self.device), targets=[ClassifierOutputTarget(i) for i in class_indices])

    def explain(self, source, class_name: str | None = None, top_k: int = DEFAULT_TOP_K) -> Explanation:
        """One image (path, bytes, PIL image, HWC uint8 array): the prediction and its heatmap."""
        crop = eval_crop(source, self.preprocessing)
        x = torch.from_numpy(normalize_crop(crop, self.preprocessing).copy())[None]
        with torch.no_grad():
            probs = self.squash(self.model(x.to(self.device)).float())[0].cpu().numpy()
        predicted = int(np.argmax(probs))
        wanted = self.class_index(class_name)
        target = predicted if wanted is None else wanted
        heat = self.heatmaps(x, [target])[0]
        return Explanation(self.classes[predicted], float(probs[predicted]),
                           {c: float(p) for c, p in zip(self.classes, probs)}, top_k_list(self.classes, probs, top_k),
                           self.classes[target], np.ascontiguousarray(crop), heat.astype(np.float32))


def explain_images(run: str | Path, specs: list[str], out: str | Path, class_name: str | None = None,
                   method: str = "gradcam", device: str = "auto") -> tuple[Path, list[dict]]:
    """Write DIR/<n>_<stem>.png (heatmap over the image) per image and DIR/explanations.jsonl."""
    from PIL import Image

    from .predict import expand_inputs

    out = Path(out)
    paths, rows = expand_inputs(specs)
    if not paths and not rows:
        raise UsageError("explain: no images given; pass image files, folders or globs.")
    explainer = Explainer.from_run(run, method, device)
    explainer.class_index(class_name)  # a wrong --class fails before any file is written
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; pass a folder (new, or one to add heatmaps to).")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "explanations.jsonl"
    existing = len(log.read_text().splitlines()) if log.is_file() else 0
    for number, path in enumerate(paths, start=existing + 1):
        try:
            result = explainer.explain(path, class_name)
        except UsageError:
            raise
        except Exception as exc:  # an unreadable image is reported; the others are still explained
            rows.append({"path": describe_input(path), "error": f"cannot read image: {exc}".splitlines()[0]})
            continue
        # Numbered, so that two images with the same name in different folders never overwrite each other.
        heatmap_file = out / f"{number:04d}_{path.stem}.png"
        copy_number = 1
        while heatmap_file.exists():  # a file the user put there is never overwritten
            copy_number += 1
            heatmap_file = out / f"{number:04d}_{path.stem}-{copy_number}.png"
        Image.fromarray(result.overlay()).save(heatmap_file)
        rows.append({"path": str(path), "label": result.label, "score": result.score, "top_k": result.top_k,
                     "explained_class": result.explained, "method": method, "heatmap": str(heatmap_file)})
    with log.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return log, rows
