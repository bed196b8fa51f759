"""Mask metrics: plain functions of a predicted and a ground-truth bool mask, each with a declared direction.

Conventions (stated, never silent): TP, FP, FN, TN count pixels; a ratio whose denominator is zero is NaN
(undefined), never 0 or 1. So IoU and Dice are NaN when both masks are empty, precision is NaN for an empty
prediction, recall is NaN for an empty ground truth. Pixel accuracy is (TP + TN) / N, the fraction of all pixels
labelled correctly (not recall). ``miou`` is the mean of the foreground IoU and the background IoU (TN / (TN + FP +
FN)), over those of the two that are defined.

Every metric is a function of the four counts, so the same definition gives both averages used in reports:

- **per image**: the metric of each image's counts, then the mean over images where it is defined (NaN skipped,
  the number of images counted is reported beside it);
- **pooled**: the metric of the counts summed over the whole dataset (large objects weigh more).

Pixels marked ``ignore`` (e.g. 255 in a PNG label map) are left out of every count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..registry import Entry

Counts = tuple[int, int, int, int]


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def finite_mean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN and inf, i.e. undefined, skipped); NaN when there is none."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")


@dataclass(frozen=True, kw_only=True)
class Metric(Entry):
    """A metric of the confusion counts (an :class:`~segfromxai.registry.Entry` whose ``fn`` maps TP, FP, FN, TN
    to a float), and whether a higher value is better. Called on two masks, it counts them first."""

    higher_is_better: bool = True

    @property
    def from_counts(self) -> Callable[[int, int, int, int], float]:
        return self.fn

    def __call__(self, pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
        return self.fn(*confusion(pred, gt, ignore))


def confusion(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> Counts:
    """(TP, FP, FN, TN) pixel counts of two bool masks of the same shape, leaving out ``ignore`` pixels."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    n = pred.size
    if ignore is not None:
        keep = ~np.asarray(ignore, bool)
        pred, gt, n = pred & keep, gt & keep, int(np.count_nonzero(keep))
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred & ~gt))
    fn = int(np.count_nonzero(~pred & gt))
    return tp, fp, fn, n - tp - fp - fn


def _miou(tp: int, fp: int, fn: int, tn: int) -> float:
    parts = [v for v in (_ratio(tp, tp + fp + fn), _ratio(tn, tn + fp + fn)) if not math.isnan(v)]
    return sum(parts) / len(parts) if parts else float("nan")


METRICS: dict[str, Metric] = {
    "iou": Metric(lambda tp, fp, fn, tn: _ratio(tp, tp + fp + fn),
                  "TP / (TP + FP + FN); NaN when both masks are empty"),
    "dice": Metric(lambda tp, fp, fn, tn: _ratio(2 * tp, 2 * tp + fp + fn),
                   "F1 = 2 TP / (2 TP + FP + FN); NaN when both masks are empty"),
    "precision": Metric(lambda tp, fp, fn, tn: _ratio(tp, tp + fp), "TP / (TP + FP); NaN for an empty prediction"),
    "recall": Metric(lambda tp, fp, fn, tn: _ratio(tp, tp + fn), "TP / (TP + FN); NaN for an empty ground truth"),
    "pixel_accuracy": Metric(lambda tp, fp, fn, tn: _ratio(tp + tn, tp + fp + fn + tn),
                             "(TP + TN) / N over all (not ignored) pixels"),
    "miou": Metric(_miou, "mean of foreground and background IoU, over those defined"),
}


def summarise(counts: Iterable[Counts], names: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """Per-image mean and pooled value of each metric over a list of per-image counts.

    Returns ``{name: {"per_image_mean": float, "pooled": float, "n": images where defined}}``; the mean is NaN when
    no image defines the metric.
    """
    counts = [tuple(int(v) for v in c) for c in counts]
    total = tuple(sum(c[i] for c in counts) for i in range(4)) if counts else (0, 0, 0, 0)
    out = {}
    for name in names or METRICS:
        metric = METRICS[name]
        values = [metric.from_counts(*c) for c in counts]
        out[name] = {"per_image_mean": finite_mean(values), "pooled": metric.from_counts(*total),
                     "n": sum(not math.isnan(v) for v in values)}
    return out


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the values of ``x`` (1-D), tied values given the mean of their ranks, float64."""
    values, inverse, counts = np.unique(np.asarray(x, np.float64), return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts + 1) / 2.0)[inverse.reshape(-1)]


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman's rank correlation of paired values (Pearson's correlation of their :func:`ranks`, ties averaged),
    in [-1, 1]: 1 when ``b`` rises with ``a``. Pairs where either value is NaN or infinite are left out; NaN when
    fewer than two pairs remain or either side's ranks are all equal (undefined). Neither direction is better: it
    says how well one ordering predicts the other."""
    x, y = np.asarray(list(a), np.float64), np.asarray(list(b), np.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs paired values, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    rx, ry = ranks(x[ok]), ranks(y[ok])
    if ok.sum() < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))
