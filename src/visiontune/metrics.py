"""Pure metric functions on plain lists and arrays: no I/O, no torch."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: sane at 0, 1 and small n, unlike the normal one."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def per_class_report(matrix: np.ndarray, classes: list[str]) -> dict:
    """Precision, recall, F1 and support per class, plus macro and support-weighted averages."""
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(matrix[i, i])
        predicted = int(matrix[:, i].sum())
        support = int(matrix[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = sum(v["support"] for v in per_class.values())
    keys = ("precision", "recall", "f1")
    macro = {k: sum(v[k] for v in per_class.values()) / len(classes) for k in keys}
    weighted = {k: sum(v[k] * v["support"] for v in per_class.values()) / total if total else 0.0 for k in keys}
    return {"per_class": per_class, "macro_avg": macro, "weighted_avg": weighted}


# --- multi-label ------------------------------------------------------------------------------------


def choose_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per class, the probability threshold with the best F1 on these (val) predictions.

    A class is predicted when its probability is >= the threshold. Each cut between two neighbouring
    probabilities of the class is tried; the threshold is put midway between them, never on a val
    image's own probability (where a rounding difference of 1e-7, e.g. a BatchNorm-folded copy, would
    flip that image). Ties go to the higher threshold (fewer false positives). A class with no
    positive in val keeps 0.5: nothing here says where its boundary is.
    """
    thresholds = []
    for c in range(targets.shape[1]):
        truth = targets[:, c] > 0.5
        if not truth.any():
            thresholds.append(0.5)
            continue
        values = sorted(set(probs[:, c].tolist()), reverse=True)
        best_f1, best_t = -1.0, 0.5
        for k, value in enumerate(values):
            predicted = probs[:, c] >= value
            tp = int((predicted & truth).sum())
            f1 = 2 * tp / (int(predicted.sum()) + int(truth.sum()))
            if f1 > best_f1:
                lower = values[k + 1] if k + 1 < len(values) else 0.0
                best_f1, best_t = f1, (value + lower) / 2
        thresholds.append(float(best_t))
    return thresholds


def multilabel_report(probs: np.ndarray, targets: np.ndarray, thresholds: list[float], classes: list[str]) -> dict:
    """Per-class precision/recall/F1/AP at `thresholds`, mAP, exact-match and per-label accuracy."""
    from sklearn.metrics import average_precision_score

    truth = targets > 0.5
    predicted = probs >= np.asarray(thresholds)[None, :]
    per_class = {}
    aps = []
    for c, name in enumerate(classes):
        tp = int((predicted[:, c] & truth[:, c]).sum())
        fp = int((predicted[:, c] & ~truth[:, c]).sum())
        fn = int((~predicted[:, c] & truth[:, c]).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        ap = float(average_precision_score(truth[:, c], probs[:, c])) if truth[:, c].any() else None
        if ap is not None:
            aps.append(ap)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "ap": ap, "support": int(truth[:, c].sum()),
                           "threshold": float(thresholds[c])}
    return {
        "per_class": per_class,
        "mAP": float(np.mean(aps)) if aps else 0.0,
        "exact_match": float((predicted == truth).all(axis=1).mean()),
        "label_accuracy": float((predicted == truth).mean()),
        "macro_f1": float(np.mean([r["f1"] for r in per_class.values()])),
    }
