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
