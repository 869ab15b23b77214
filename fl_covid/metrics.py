"""Per-site classification metrics from COVID probabilities (scikit-learn), as fractions in [0, 1]."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score, roc_curve

METRIC_NAMES = ("accuracy", "f1", "sensitivity", "precision", "specificity", "auc")
ROC_POINTS = 101
ROC_FPR_GRID = np.linspace(0.0, 1.0, ROC_POINTS)


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """labels: (N,) in {0, 1} (1 = COVID); probs: (N,) P(COVID). Returns METRIC_NAMES plus ``n``."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 1:
        raise ValueError(f"labels and probs must be (N,) of equal length, got {labels.shape} and {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or Inf: the model diverged")
    if len(np.unique(labels)) < 2:
        raise ValueError("metrics need both classes in the evaluated set (AUC and specificity are undefined)")
    pred = (probs >= threshold).astype(int)
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "f1": float(f1_score(labels, pred, zero_division=0)),
        "sensitivity": float(recall_score(labels, pred, zero_division=0)),
        "precision": float(precision_score(labels, pred, zero_division=0)),
        "specificity": float(recall_score(labels, pred, pos_label=0, zero_division=0)),
        "auc": float(roc_auc_score(labels, probs)),
        "n": len(labels),
    }


def roc_on_grid(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """True-positive rate at ROC_POINTS evenly spaced false-positive rates: an aggregate, no per-image data."""
    fpr, tpr, _ = roc_curve(labels, probs)
    return [float(v) for v in np.interp(ROC_FPR_GRID, fpr, tpr)]
