"""Mask metrics: plain functions of a predicted and a ground-truth bool mask, each with a declared direction.

Conventions (stated, never silent): TP, FP, FN, TN count pixels; a ratio whose denominator is zero is NaN
(undefined), never 0 or 1. So IoU and Dice are NaN when both masks are empty, precision is NaN for an empty
prediction, recall is NaN for an empty ground truth. Pixel accuracy is (TP + TN) / N, the fraction of all pixels
labelled correctly (not recall). These are per-image values; averaging over images is the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Metric:
    """A metric function and whether a higher value is better."""

    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool

    def __call__(self, pred: np.ndarray, gt: np.ndarray) -> float:
        return self.fn(pred, gt)


def confusion(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) pixel counts of two bool masks of the same shape."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred & ~gt))
    fn = int(np.count_nonzero(~pred & gt))
    return tp, fp, fn, pred.size - tp - fp - fn


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """TP / (TP + FP + FN); NaN when both masks are empty."""
    tp, fp, fn, _ = confusion(pred, gt)
    return _ratio(tp, tp + fp + fn)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """F1 = 2 TP / (2 TP + FP + FN); NaN when both masks are empty."""
    tp, fp, fn, _ = confusion(pred, gt)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """TP / (TP + FP); NaN for an empty prediction."""
    tp, fp, _, _ = confusion(pred, gt)
    return _ratio(tp, tp + fp)


def recall(pred: np.ndarray, gt: np.ndarray) -> float:
    """TP / (TP + FN); NaN for an empty ground truth."""
    tp, _, fn, _ = confusion(pred, gt)
    return _ratio(tp, tp + fn)


def pixel_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """(TP + TN) / N over all pixels."""
    tp, fp, fn, tn = confusion(pred, gt)
    return _ratio(tp + tn, tp + fp + fn + tn)


METRICS: dict[str, Metric] = {
    "iou": Metric(iou, True),
    "dice": Metric(dice, True),
    "precision": Metric(precision, True),
    "recall": Metric(recall, True),
    "pixel_accuracy": Metric(pixel_accuracy, True),
}
