"""Per-site classification metrics from COVID probabilities (scikit-learn), as fractions in [0, 1], and the
operating point: a decision threshold chosen on the validation split (Youden's J) with the test metrics at it."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score, roc_curve

METRIC_NAMES = ("accuracy", "f1", "sensitivity", "precision", "specificity", "auc")
ROC_POINTS = 101
ROC_FPR_GRID = np.linspace(0.0, 1.0, ROC_POINTS)
# the operating point: its threshold and the metrics at it (AUC does not depend on a threshold)
OPERATING_POINT_NAMES = ("threshold", "accuracy", "f1", "sensitivity", "precision", "specificity")
YOUDEN_TIE = 1e-12  # Youden's J values this close count as equal (tpr - fpr of different fractions)


def _checked(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """labels (N,) and probs (N,) as arrays (probs float64); ValueError unless equal-length 1-D, finite and of
    both classes."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 1:
        raise ValueError(f"labels and probs must be (N,) of equal length, got {labels.shape} and {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or Inf: the model diverged")
    if len(np.unique(labels)) < 2:
        raise ValueError("metrics need both classes in the evaluated set (AUC and specificity are undefined)")
    return labels, probs


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """labels: (N,) in {0, 1} (1 = COVID); probs: (N,) P(COVID); an image is COVID when its P(COVID) is at or
    above ``threshold``. Returns METRIC_NAMES plus ``n``."""
    labels, probs = _checked(labels, probs)
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


def operating_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The decision threshold that maximises Youden's J = sensitivity + specificity - 1 on ``labels`` (N,) in
    {0, 1} and ``probs`` (N,) P(COVID), meant for a validation split: one of the ROC curve's thresholds (COVID at or
    above it). Among thresholds of equal J the one closest to 0.5 wins, of two equally close the higher. roc_curve's
    threshold that calls nothing COVID (inf) is clipped to 1. ValueError with one class only."""
    labels, probs = _checked(labels, probs)
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)  # thresholds descending
    thresholds = np.clip(thresholds, 0.0, 1.0)
    youden = tpr - fpr
    best = np.flatnonzero(youden >= youden.max() - YOUDEN_TIE)
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


def operating_point(val_labels: np.ndarray, val_probs: np.ndarray, test_labels: np.ndarray,
                    test_probs: np.ndarray) -> dict[str, float] | None:
    """The operating point of a site: ``threshold`` chosen on its validation split (``operating_threshold`` of
    val_labels / val_probs, (N_val,)) and the test fold's accuracy, f1, sensitivity, precision and specificity at it
    (test_labels / test_probs, (N_test,)), keyed by OPERATING_POINT_NAMES. None when the validation split lacks a
    class (nothing to choose a threshold on)."""
    if len(np.unique(np.asarray(val_labels))) < 2:
        return None
    threshold = operating_threshold(val_labels, val_probs)
    at = binary_metrics(test_labels, test_probs, threshold)
    return {"threshold": threshold, **{k: at[k] for k in OPERATING_POINT_NAMES[1:]}}
