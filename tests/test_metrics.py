"""Per-site metrics against values worked out by hand, and the ROC curve on the fixed FPR grid."""

from __future__ import annotations

import numpy as np
import pytest

from fl_covid.metrics import METRIC_NAMES, ROC_FPR_GRID, ROC_POINTS, binary_metrics, roc_on_grid

# 4 COVID, 6 NonCOVID. At threshold 0.5: TP=3 (0.9, 0.8, 0.6), FN=1 (0.4), FP=2 (0.7, 0.55), TN=4.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PROBS = np.array([0.9, 0.8, 0.4, 0.6, 0.1, 0.2, 0.7, 0.3, 0.55, 0.05])


def test_binary_metrics_by_hand() -> None:
    m = binary_metrics(LABELS, PROBS)
    assert set(METRIC_NAMES) <= set(m)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # AUC = share of (COVID, NonCOVID) pairs ranked correctly: 0.9 and 0.8 beat all 6, 0.6 beats 5, 0.4 beats 4.
    assert m["auc"] == pytest.approx((6 + 6 + 5 + 4) / 24)


def test_threshold_is_inclusive() -> None:
    m = binary_metrics(np.array([1, 0, 1, 0]), np.array([0.5, 0.49, 0.9, 0.1]))
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_one_class_raises() -> None:
    with pytest.raises(ValueError, match="both classes"):
        binary_metrics(np.ones(5, dtype=int), np.linspace(0.1, 0.9, 5))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_probabilities_raise(bad: float) -> None:
    probs = PROBS.copy()
    probs[3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        binary_metrics(LABELS, probs)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="equal length"):
        binary_metrics(LABELS, PROBS[:-1])


def test_roc_on_grid_is_monotone_from_0_to_1() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(0.3 * labels + rng.normal(0.35, 0.2, 200), 0, 0.99)
    probs[np.argmax(probs)] = 1.0
    labels[np.argmax(probs)] = 0  # the top score is a NonCOVID image: TPR is 0 at FPR 0
    tpr = np.array(roc_on_grid(labels, probs))
    assert len(tpr) == ROC_POINTS == len(ROC_FPR_GRID)
    assert ROC_FPR_GRID[0] == 0.0 and ROC_FPR_GRID[-1] == 1.0
    assert tpr[0] == 0.0 and tpr[-1] == 1.0
    assert np.all(np.diff(tpr) >= 0)
    # Area under the gridded curve approximates the exact AUC.
    assert np.trapezoid(tpr, ROC_FPR_GRID) == pytest.approx(binary_metrics(labels, probs)["auc"], abs=0.01)


def test_roc_on_grid_of_hand_example() -> None:
    tpr = roc_on_grid(LABELS, PROBS)
    # Thresholds: 0.9, 0.8 (TPR 1/2, FPR 0) -> 0.7 (FPR 1/6) -> 0.6 (TPR 3/4) -> 0.55 (FPR 2/6) -> 0.4 (TPR 1)
    assert tpr[0] == pytest.approx(0.5)
    assert tpr[50] == pytest.approx(1.0)
    assert tpr[-1] == 1.0
