"""Per-task classification metrics from integer labels and predictions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision / recall / F1 and the confusion matrix.

    ``confusion[i][j]`` counts examples of true class i predicted as j. A class that is
    never predicted (or never present) gets precision (recall) 0, as scikit-learn does.
    """
    k = len(labels)
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    confusion = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    n = int(confusion.sum())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1.mean()),
        "precision": {name: float(p) for name, p in zip(labels, precision)},
        "recall": {name: float(r) for name, r in zip(labels, recall)},
        "f1": {name: float(f) for name, f in zip(labels, f1)},
        "support": {name: int(a) for name, a in zip(labels, actual)},
        "confusion": confusion.tolist(),
        "examples": n,
    }
