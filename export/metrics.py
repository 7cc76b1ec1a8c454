"""Evaluation metrics in plain numpy: Dice, confusion matrix, sensitivity / specificity,
rank-based ROC AUC. Used by validation during training and by `ctjoint evaluate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OverlapCounts:
    """Voxel counts behind a Dice score; sums of them give the global (pooled) Dice."""

    intersection: int
    predicted: int
    truth: int

    def __add__(self, other: OverlapCounts) -> OverlapCounts:
        return OverlapCounts(
            self.intersection + other.intersection,
            self.predicted + other.predicted,
            self.truth + other.truth,
        )

    @property
    def dice(self) -> float:
        """2|P∩T| / (|P| + |T|); 1.0 when both are empty (nothing to find, nothing found)."""
        total = self.predicted + self.truth
        return 1.0 if total == 0 else 2.0 * self.intersection / total


def overlap(predicted: np.ndarray, truth: np.ndarray) -> OverlapCounts:
    """Overlap counts of two boolean masks of one shape."""
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {truth.shape}")
    p = predicted.astype(bool, copy=False)
    t = truth.astype(bool, copy=False)
    return OverlapCounts(int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(t.sum()))


def dice_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks."""
    return overlap(predicted, truth).dice


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts; rows are the true class, columns the prediction."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def sensitivity_specificity(matrix: np.ndarray) -> list[tuple[float, float]]:
    """Per class, one-vs-rest (sensitivity, specificity) from a confusion matrix.

    NaN where undefined (no positive, or no negative, case of that class).
    """
    total = int(matrix.sum())
    out = []
    for k in range(matrix.shape[0]):
        tp = int(matrix[k, k])
        fn = int(matrix[k].sum()) - tp
        fp = int(matrix[:, k].sum()) - tp
        tn = total - tp - fn - fp
        out.append((_ratio(tp, tp + fn), _ratio(tn, tn + fp)))
    return out


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and sorted_values[stop] == sorted_values[start]:
            stop += 1
        # Positions start..stop-1 hold equal values: ranks start+1..stop, mean (start+1+stop)/2.
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0
        start = stop
    return ranks


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    NaN when only one of the two groups is present.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(average_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def one_vs_rest_auc(probabilities: np.ndarray, truth: np.ndarray) -> tuple[float, list[float]]:
    """Macro AUC over classes (one-vs-rest; classes without both groups are left out) and the
    per-class AUCs."""
    per_class = [
        roc_auc(probabilities[:, k], np.asarray(truth) == k) for k in range(probabilities.shape[1])
    ]
    defined = [a for a in per_class if not math.isnan(a)]
    macro = float(np.mean(defined)) if defined else math.nan
    return macro, per_class


def expected_calibration_error(
    probabilities: np.ndarray, truth: np.ndarray, bins: int = 15
) -> float:
    """ECE of the top-label confidence: sum over equal-width confidence bins of
    (cases in bin / cases) x |accuracy in bin - mean confidence in bin|."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if len(probs) == 0:
        return math.nan
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(truth)).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap = abs(float(correct[members].mean()) - float(confidence[members].mean()))
            total += members.mean() * gap
    return float(total)


def reliability_bins(
    probabilities: np.ndarray, truth: np.ndarray, bins: int = 15
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each non-empty confidence bin (the diagram)."""
    probs = np.asarray(probabilities, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(truth)).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        if members.any():
            out.append(
                (
                    float(confidence[members].mean()),
                    float(correct[members].mean()),
                    int(members.sum()),
                )
            )
    return out


def brier_score(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Multi-class Brier score: mean over cases of the squared distance to the one-hot truth."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if len(probs) == 0:
        return math.nan
    onehot = np.eye(probs.shape[1])[np.asarray(truth, dtype=np.int64)]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
