"""`visiontune eval`: how good a trained run is, and where it fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import LABEL_SEPARATOR, class_folders, discover, find_layout, label_tensor
from .errors import DataError, UsageError
from .metrics import confusion_matrix, multilabel_report, per_class_report, wilson_interval
from .runfolder import RunFolder


def data_items(data: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """Images of DATA under the run's class index: DATA's `split` folder when DATA has split folders
    (any of the names training accepts), else DATA/<class>/, or the `split` rows of a CSV."""
    if data.is_dir():
        layout = find_layout(data, need_train=False)
        folder = layout.split_folders.get(split) if layout.split_folders else layout.root
        if folder is None:
            have = ", ".join(f"{name} ({d.name}/)" for name, d in layout.split_folders.items())
            raise UsageError(f"--split {split}: DATA {layout.root} has no {split} folder (it has {have}); "
                             f"use --split with one of those.")
        per_class = {c: files for c, files in class_folders(folder).items() if files}
        unknown = sorted(set(per_class) - set(classes))
        if unknown:
            raise DataError(f"DATA {folder}: class folders {', '.join(unknown)} are not classes of this run "
                            f"({', '.join(classes)}); remove them or evaluate a run trained on them.")
        return [(p, classes.index(c)) for c in sorted(per_class) for p in per_class[c]]
    splits = discover(data)
    if split not in splits.samples:
        raise UsageError(f"--split {split}: DATA {data} has no {split} split.")
    unknown = sorted(set(splits.classes) - set(classes))
    if unknown:
        raise DataError(f"DATA {data}: classes {', '.join(unknown)} are not classes of this run ({', '.join(classes)}).")
    def remap(y):
        return tuple(sorted(classes.index(splits.classes[c]) for c in y)) if isinstance(y, tuple) \
            else classes.index(splits.classes[y])

    return [(p, remap(y)) for p, y in splits.samples[split]]


def evaluate_run(run: str | Path, data: str | Path | None = None, split: str = "val", tta: bool = False,
                 batch_size: int = 64, top_n: int = 10, keep_items: bool = False, device: str = "auto") -> dict | None:
    """Metrics of a run's best weights on its own split or on DATA.

    Under torchrun each rank scores every world_size-th image; the per-image probabilities and
    losses are gathered on rank 0, which computes every metric once, in the images' order, exactly
    as one process does. Other ranks return None.
    """
    import torch

    from . import runtime
    from .engine import evaluate
    from .features import batch_decoder
    from .folding import fold_batchnorm
    from .images import decode_array
    from .preprocess import EvalTransform, Preprocessing, normalize_batch

    rt = runtime.start(device, "fp32")
    run = Path(run)
    folder = RunFolder(run)
    model, meta = folder.load_model()
    # As training's val pass runs it (its metrics.csv rows come from there): the run's memory layout,
    # BatchNorm folded: the loss then equals the best epoch's row to 2e-9 (hymenoptera), and the pass is faster.
    channels_last = bool(folder.read_config().get("config", {}).get("channels_last", False)) \
        if folder.config_file.is_file() else False
    model = model.to(rt.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    classes = meta["classes"]
    multi = meta.get("task") == "multi-label"
    items = RunFolder(run).read_split(split, classes) if data is None else data_items(Path(data), split, classes)
    if not items:
        raise DataError(f"the {split} split to evaluate holds no images.")
    if multi != isinstance(items[0][1], tuple):
        raise UsageError(f"DATA {data}: {'a path,labels CSV' if multi else 'one class per image'} is needed to "
                         f"evaluate this {'multi-label' if multi else 'single-label'} run.")
    pre = Preprocessing.from_json(meta["preprocessing"])
    transform = EvalTransform(pre)
    mine = rt.shard(range(len(items)))

    labels = label_tensor(items, len(classes))

    def batches():
        with batch_decoder() as pool:
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                decoded = pool.map(lambda i: decode_array(items[i][0], pre.resize, pre.interpolation), chunk)
                yield torch.stack([transform(image) for image in decoded]), labels[chunk]

    model = fold_batchnorm(model, pre.size)
    out = evaluate(model, batches(), lambda x: normalize_batch(x, pre, channels_last), keep_outputs=True,
                   device=rt.device, tta=tta,
                   multi_label=multi)
    scored = {i: (p, loss) for i, p, loss in zip(mine, out.probabilities.numpy(), out.losses.tolist())}
    if rt.distributed:
        scored = {i: v for part in rt.all_gather(scored) for i, v in part.items()}
        if not rt.is_main:
            return None
    probs = np.stack([scored[i][0] for i in range(len(items))])
    loss_sum = float(np.sum(np.array([scored[i][1] for i in range(len(items))], dtype=np.float64)))
    return _result(items, probs, loss_sum, meta, split, tta, top_n, keep_items)


def scores_result(run: str | Path, probabilities: np.ndarray, loss: float) -> dict | None:
    """evaluate_run's result (items kept) from the val probabilities and mean loss training already
    computed, in splits/val.csv's order; None when they do not match the run's val split."""
    folder = RunFolder(run)
    meta = folder.read_model_json()
    items = folder.read_split("val", meta["classes"])
    if len(items) != len(probabilities) or not items:
        return None
    return _result(items, np.asarray(probabilities), loss * len(items), meta, "val", False, 10, True)


def _result(items, probs: np.ndarray, loss_sum: float, meta: dict, split: str, tta: bool, top_n: int,
            keep_items: bool) -> dict:
    classes = meta["classes"]
    if meta.get("task") == "multi-label":
        labels = label_tensor(items, len(classes)).numpy()
        return _multilabel_result(items, probs, labels, loss_sum, meta, split, tta, top_n, keep_items)
    targets = np.array([label for _, label in items])
    predictions = probs.argmax(1)
    n, correct = len(items), int((predictions == targets).sum())
    matrix = confusion_matrix(targets, predictions, len(classes))
    report = per_class_report(matrix, classes)
    wrong = np.flatnonzero(predictions != targets)
    wrong = wrong[np.argsort(-probs[wrong, predictions[wrong]], kind="stable")][:top_n]
    result = {
        "accuracy": correct / n,
        "accuracy_ci": list(wilson_interval(correct, n)),
        "loss": loss_sum / n,
        "n": n,
        "correct": correct,
        "classes": classes,
        "per_class": report["per_class"],
        "macro_avg": report["macro_avg"],
        "weighted_avg": report["weighted_avg"],
        "confusion_matrix": matrix.tolist(),
        "top_mistakes": [{"path": str(items[i][0]), "true": classes[targets[i]], "predicted": classes[predictions[i]],
                          "probability": float(probs[i, predictions[i]])} for i in wrong],
        "split": split,
        "tta": tta,
    }
    if keep_items:
        result["items"] = [{"path": str(p), "true": classes[t], "predicted": classes[q], "probability": float(pr[q])}
                           for (p, _), t, q, pr in zip(items, targets, predictions, probs)]
    return result


def _multilabel_result(items, probs: np.ndarray, targets: np.ndarray, loss_sum: float, meta: dict, split: str,
                       tta: bool, top_n: int, keep_items: bool) -> dict:
    """A multi-label run's metrics at its stored per-class thresholds (0.5 where none are stored)."""
    classes = meta["classes"]
    thresholds = meta.get("thresholds") or [0.5] * len(classes)
    report = multilabel_report(probs, targets, thresholds, classes)
    n = len(items)
    predicted = probs >= np.asarray(thresholds)[None, :]
    truth = targets > 0.5
    wrong = np.flatnonzero((predicted != truth).any(axis=1))
    # Most confident mistakes: the wrong samples whose worst class decision was the surest.
    sureness = np.abs(probs - np.asarray(thresholds)[None, :]) * (predicted != truth)
    wrong = wrong[np.argsort(-sureness[wrong].max(axis=1), kind="stable")]

    def names(row: np.ndarray) -> str:
        return LABEL_SEPARATOR.join(c for c, on in zip(classes, row) if on) or "(none)"

    def item(i: int) -> dict:
        return {"path": str(items[i][0]), "true": names(truth[i]), "predicted": names(predicted[i]),
                "probability": float(probs[i].max())}

    correct = int(round(report["exact_match"] * n))
    result = {
        "task": "multi-label",
        "accuracy": report["exact_match"],
        "accuracy_ci": list(wilson_interval(correct, n)),
        "label_accuracy": report["label_accuracy"],
        "mAP": report["mAP"],
        "macro_f1": report["macro_f1"],
        "loss": loss_sum / n,
        "n": n,
        "correct": correct,
        "classes": classes,
        "thresholds": [float(t) for t in thresholds],
        "per_class": report["per_class"],
        "top_mistakes": [item(i) for i in wrong[:top_n]],
        "split": split,
        "tta": tta,
    }
    if keep_items:
        result["items"] = [item(i) for i in range(n)]
    return result


def format_table(result: dict) -> str:
    if result.get("task") == "multi-label":
        return _format_multilabel(result)
    lo, hi = result["accuracy_ci"]
    n = result["n"]
    lines = [
        f"accuracy {result['accuracy']:.4f} ({result['correct']}/{n}), 95% CI [{lo:.4f}, {hi:.4f}]; "
        f"on {n} images one image is {100 / n:.2f} points",
        f"loss {result['loss']:.4f} (mean per-sample cross-entropy){'  [TTA: flip]' if result['tta'] else ''}",
        "",
        f"{'class':20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}",
    ]
    for name, r in result["per_class"].items():
        lines.append(f"{name:20} {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} {r['support']:8d}")
    for label in ("macro_avg", "weighted_avg"):
        r = result[label]
        lines.append(f"{label.replace('_', ' '):20} {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} {n:8d}")
    width = max(len(c) for c in result["classes"]) + 2
    lines += ["", "confusion matrix (rows = true, columns = predicted)",
              " " * width + "".join(f"{c:>{width}}" for c in result["classes"])]
    for c, row in zip(result["classes"], result["confusion_matrix"]):
        lines.append(f"{c:{width}}" + "".join(f"{v:>{width}}" for v in row))
    if result["top_mistakes"]:
        lines += ["", "most confident mistakes"]
        for m in result["top_mistakes"]:
            lines.append(f"  {m['probability']:.3f}  {m['true']} -> {m['predicted']}  {m['path']}")
    return "\n".join(lines)


def _format_multilabel(result: dict) -> str:
    lo, hi = result["accuracy_ci"]
    n = result["n"]
    lines = [
        f"exact match {result['accuracy']:.4f} ({result['correct']}/{n}), 95% CI [{lo:.4f}, {hi:.4f}]: every label "
        "of the image right",
        f"mAP {result['mAP']:.4f}  macro F1 {result['macro_f1']:.4f}  label accuracy {result['label_accuracy']:.4f}",
        f"loss {result['loss']:.4f} (mean per-class binary cross-entropy){'  [TTA: flip]' if result['tta'] else ''}",
        "",
        f"{'class':20} {'precision':>9} {'recall':>9} {'f1':>9} {'AP':>9} {'threshold':>9} {'support':>8}",
    ]
    for name, r in result["per_class"].items():
        ap = f"{r['ap']:9.4f}" if r["ap"] is not None else f"{'-':>9}"
        lines.append(f"{name:20} {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} {ap} {r['threshold']:9.3f} "
                     f"{r['support']:8d}")
    if result["top_mistakes"]:
        lines += ["", "most confident mistakes (true -> predicted label sets)"]
        for m in result["top_mistakes"]:
            lines.append(f"  {m['true']} -> {m['predicted']}  {m['path']}")
    return "\n".join(lines)
