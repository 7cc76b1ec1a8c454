"""Metric functions on cases small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctjoint.export.metrics import (
    OverlapCounts,
    average_ranks,
    confusion_matrix,
    dice_score,
    one_vs_rest_auc,
    overlap,
    roc_auc,
    sensitivity_specificity,
)


def test_dice_of_two_overlapping_masks() -> None:
    predicted = np.array([1, 1, 1, 0, 0], dtype=bool)
    truth = np.array([0, 1, 1, 1, 0], dtype=bool)
    # |P∩T| = 2, |P| = 3, |T| = 3 -> 4 / 6
    assert dice_score(predicted, truth) == pytest.approx(2 / 3)


def test_dice_of_two_empty_masks_is_one() -> None:
    empty = np.zeros((3, 3), dtype=bool)
    assert dice_score(empty, empty) == 1.0


def test_dice_of_a_missed_lesion_is_zero() -> None:
    assert dice_score(np.zeros(4, bool), np.array([0, 1, 1, 0], bool)) == 0.0


def test_pooled_counts_give_the_global_dice() -> None:
    a = overlap(np.array([1, 0], bool), np.array([1, 0], bool))  # 1, 1, 1
    b = overlap(np.array([1, 1], bool), np.array([0, 0], bool))  # 0, 2, 0
    assert (a + b) == OverlapCounts(1, 3, 1)
    assert (a + b).dice == pytest.approx(2 / 4)


def test_confusion_matrix_rows_are_true_classes() -> None:
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_sensitivity_and_specificity_one_vs_rest() -> None:
    matrix = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    sens_spec = sensitivity_specificity(matrix)
    # class 0: TP 1, FN 1, FP 1, TN 2 -> sens 1/2, spec 2/3
    assert sens_spec[0] == pytest.approx((0.5, 2 / 3))
    # class 1: TP 1, FN 0, FP 1, TN 3 -> sens 1, spec 3/4
    assert sens_spec[1] == pytest.approx((1.0, 0.75))


def test_sensitivity_is_nan_without_positive_cases() -> None:
    sens, spec = sensitivity_specificity(np.array([[2, 0], [0, 0]]))[1]
    assert math.isnan(sens)
    assert spec == 1.0


def test_roc_auc_counts_correctly_ordered_pairs() -> None:
    # Pairs (pos, neg): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, 0.1) ok, (0.8, 0.4) ok -> 3/4
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(scores, np.array([0, 0, 1, 1], bool)) == pytest.approx(0.75)


def test_roc_auc_counts_ties_as_half() -> None:
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1], bool)) == pytest.approx(0.5)


def test_roc_auc_is_nan_with_one_group_only() -> None:
    assert math.isnan(roc_auc(np.array([0.2, 0.3]), np.array([1, 1], bool)))


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_macro_auc_leaves_out_classes_without_both_groups() -> None:
    probabilities = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    truth = np.array([0, 1, 1])  # no class-2 case: its AUC is undefined
    macro, per_class = one_vs_rest_auc(probabilities, truth)
    assert per_class[0] == pytest.approx(1.0)
    assert per_class[1] == pytest.approx(1.0)
    assert math.isnan(per_class[2])
    assert macro == pytest.approx(1.0)
