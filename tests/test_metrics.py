"""Per-site metrics against values worked out by hand, the ROC curve on the fixed FPR grid, and the operating point
chosen by Youden's J."""

from __future__ import annotations

import numpy as np
import pytest

from fl_covid.metrics import (
    METRIC_NAMES,
    OPERATING_POINT_NAMES,
    ROC_FPR_GRID,
    ROC_POINTS,
    binary_metrics,
    operating_point,
    operating_threshold,
    roc_on_grid,
)

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


def test_operating_threshold_of_hand_example() -> None:
    # Youden's J = TPR - FPR at each threshold: 0.9 -> 1/4, 0.8 -> 2/4, 0.7 -> 2/4 - 1/6, 0.6 -> 3/4 - 1/6,
    # 0.55 -> 3/4 - 2/6, 0.4 -> 1 - 2/6 (the largest), 0.3 -> 1 - 3/6, then smaller
    assert operating_threshold(LABELS, PROBS) == 0.4


def test_operating_threshold_of_separated_classes_is_the_lowest_covid_score() -> None:
    # 0.8 is the only threshold with TPR 1 and FPR 0 (J = 1)
    assert operating_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.8


def test_equal_youden_goes_to_the_threshold_closest_to_one_half() -> None:
    # J = 1/2 at 0.9 (TPR 1/2, FPR 0) and at 0.3 (TPR 1, FPR 1/2): 0.3 is closer to 0.5
    assert operating_threshold(np.array([0, 1, 0, 1]), np.array([0.2, 0.3, 0.6, 0.9])) == 0.3
    # J = 1/2 at 0.75 and at 0.25, both 0.25 away from 0.5: the higher
    assert operating_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.25, 0.5, 0.75])) == 0.75


def test_equal_youden_on_a_straight_piece_of_the_roc_curve() -> None:
    # tied pairs: every threshold has TPR = FPR (J = 0), 0.5 lies between the ends of a straight piece of the
    # curve (which roc_curve drops unless asked not to) and is the closest to 0.5
    labels = np.array([1, 0, 1, 0, 1, 0])
    assert operating_threshold(labels, np.array([0.8, 0.8, 0.5, 0.5, 0.2, 0.2])) == 0.5


def test_the_threshold_that_calls_nothing_covid_is_clipped_to_one() -> None:
    # inverted scores: J = 0 at inf (nothing COVID) and at 0.0 (everything COVID), J = -1 at 0.95; inf and 0.0
    # are equally far from 0.5 once inf is clipped to 1, and the higher wins
    threshold = operating_threshold(np.array([1, 0]), np.array([0.0, 0.95]))
    assert threshold == 1.0


def test_operating_threshold_refuses_one_class() -> None:
    with pytest.raises(ValueError, match="both classes"):
        operating_threshold(np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.3, 0.4]))


def test_operating_point_is_chosen_on_validation_and_measured_on_test() -> None:
    val_labels, val_probs = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])  # threshold 0.8
    point = operating_point(val_labels, val_probs, LABELS, PROBS)
    assert list(point) == list(OPERATING_POINT_NAMES) and point["threshold"] == 0.8
    # the test fold at 0.8: TP = 2 (0.9, 0.8), FN = 2, FP = 0, TN = 6
    assert point["sensitivity"] == pytest.approx(2 / 4) and point["specificity"] == 1.0
    assert point["accuracy"] == pytest.approx(8 / 10) and point["precision"] == 1.0
    assert point["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 2))


def test_no_operating_point_without_both_classes_in_validation() -> None:
    assert operating_point(np.ones(3, dtype=int), np.array([0.2, 0.6, 0.9]), LABELS, PROBS) is None
    assert operating_point(np.array([], dtype=int), np.array([]), LABELS, PROBS) is None
