import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score

from segfromxai.quality.metrics import METRICS, confusion, summarise
from segfromxai.quality.paired import paired_bootstrap

# 4x4 known answers: TP=2, FP=1, FN=3, TN=10
PRED = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
GT = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)


def test_known_answers_on_a_4x4_case():
    assert confusion(PRED, GT) == (2, 1, 3, 10)
    assert METRICS["iou"](PRED, GT) == pytest.approx(2 / 6)
    assert METRICS["dice"](PRED, GT) == pytest.approx(4 / 8)
    assert METRICS["precision"](PRED, GT) == pytest.approx(2 / 3)
    assert METRICS["recall"](PRED, GT) == pytest.approx(2 / 5)
    assert METRICS["pixel_accuracy"](PRED, GT) == pytest.approx(12 / 16)  # (TP+TN)/N, not recall
    assert METRICS["miou"](PRED, GT) == pytest.approx((2 / 6 + 10 / 14) / 2)  # foreground and background IoU


def test_ignored_pixels_leave_every_count():
    ignore = np.zeros((4, 4), bool)
    ignore[0, 0] = ignore[3, 3] = True  # one TP and one TN
    assert confusion(PRED, GT, ignore) == (1, 1, 3, 9)


def test_pooled_and_per_image_averages():
    empty = np.zeros((4, 4), bool)
    s = summarise([confusion(PRED, GT), confusion(empty, empty), confusion(GT, GT)])
    assert s["iou"]["n"] == 2 and s["iou"]["per_image_mean"] == pytest.approx((2 / 6 + 1) / 2)
    assert s["iou"]["pooled"] == pytest.approx((2 + 5) / (6 + 5))
    assert s["pixel_accuracy"]["n"] == 3 and s["miou"]["n"] == 3


def test_empty_cases_are_nan_where_undefined_never_a_silent_hit():
    empty = np.zeros((4, 4), bool)
    assert math.isnan(METRICS["iou"](empty, empty)) and math.isnan(METRICS["dice"](empty, empty))
    assert math.isnan(METRICS["precision"](empty, GT)) and METRICS["recall"](empty, GT) == 0
    assert math.isnan(METRICS["recall"](PRED, empty)) and METRICS["precision"](PRED, empty) == 0
    assert METRICS["iou"](PRED, empty) == 0
    assert METRICS["pixel_accuracy"](empty, empty) == 1


@pytest.mark.parametrize("seed", range(5))
def test_agree_with_sklearn_and_pycocotools_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    p, g = rng.uniform(size=(2, 24, 24)) < rng.uniform(0.2, 0.6, (2, 1, 1))
    assert METRICS["iou"](p, g) == pytest.approx(jaccard_score(g.ravel(), p.ravel()))
    assert METRICS["dice"](p, g) == pytest.approx(f1_score(g.ravel(), p.ravel()))
    assert METRICS["precision"](p, g) == pytest.approx(precision_score(g.ravel(), p.ravel()))
    assert METRICS["recall"](p, g) == pytest.approx(recall_score(g.ravel(), p.ravel()))
    assert METRICS["pixel_accuracy"](p, g) == pytest.approx(accuracy_score(g.ravel(), p.ravel()))
    assert METRICS["miou"](p, g) == pytest.approx(jaccard_score(g.ravel(), p.ravel(), average="macro"))
    rp, rg = (mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in (p, g))
    assert METRICS["iou"](p, g) == pytest.approx(mask_utils.iou([rp], [rg], [0])[0, 0])


def test_shape_mismatch_and_directions():
    with pytest.raises(ValueError, match="shapes differ"):
        METRICS["iou"](PRED, GT[:3])
    assert all(m.higher_is_better for m in METRICS.values())


def _bootstrap_reference(d, resamples, seed):
    """The paired bootstrap written out slowly: the same index draw, then each resample's mean and the two
    percentiles (linear interpolation between order statistics) by hand."""
    idx = np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))
    means = sorted(sum(d[i] for i in row) / len(d) for row in idx)

    def percentile(q):
        pos = q / 100 * (len(means) - 1)
        k = int(pos)
        return means[k] + (pos - k) * (means[min(k + 1, len(means) - 1)] - means[k])

    return sum(d) / len(d), percentile(2.5), percentile(97.5)


def test_paired_bootstrap_constant_differences_give_a_zero_width_interval_at_that_value():
    a = np.array([0.2, 0.5, 0.9, 0.0])
    p = paired_bootstrap(a, a + 0.05, resamples=500)
    assert p.mean_diff == pytest.approx(0.05) and p.lo == pytest.approx(0.05) and p.hi == pytest.approx(0.05)
    assert (p.wins, p.losses) == (4, 0)


def test_paired_bootstrap_two_images_span_their_two_differences():
    # resampled means are d1, (d1 + d2) / 2, d2 with chances 1/4, 1/2, 1/4: the 2.5th and 97.5th percentiles are
    # d1 and d2 once there are many resamples
    p = paired_bootstrap([0.5, 0.5], [0.4, 0.8], resamples=10_000)
    assert (p.lo, p.hi) == (pytest.approx(-0.1), pytest.approx(0.3)) and p.mean_diff == pytest.approx(0.1)
    assert (p.wins, p.losses) == (1, 1)


@pytest.mark.parametrize("seed", [0, 7])
def test_paired_bootstrap_agrees_with_a_plain_loop_on_random_data(seed):
    rng = np.random.default_rng(100 + seed)
    a, b = rng.random(23), rng.random(23)
    d = b - a
    p = paired_bootstrap(a, b, resamples=2000, seed=seed)
    mean, lo, hi = _bootstrap_reference(list(d), 2000, seed)
    assert (p.mean_diff, p.lo, p.hi) == (pytest.approx(mean), pytest.approx(lo), pytest.approx(hi))
    assert lo < mean < hi
    assert p == paired_bootstrap(a, b, resamples=2000, seed=seed)  # the same seed, the same interval


def test_paired_bootstrap_counts_wins_and_losses_beyond_the_margin_and_drops_undefined_pairs():
    a = [0.5, 0.5, 0.5, 0.5, 0.5, np.nan, 0.5]
    b = [0.53, 0.515, 0.47, 0.40, 0.5, 0.9, np.nan]  # +0.03 win, +0.015 not, -0.03 and -0.10 losses, 0 a tie
    p = paired_bootstrap(a, b, resamples=100)
    assert (p.wins, p.losses) == (1, 2)
    assert p.mean_diff == pytest.approx((0.03 + 0.015 - 0.03 - 0.10 + 0) / 5)  # the NaN pairs left out
    assert paired_bootstrap(a, b, resamples=100, margin=0.0).wins == 2
    empty = paired_bootstrap([np.nan], [0.3])
    assert math.isnan(empty.mean_diff) and math.isnan(empty.lo) and (empty.wins, empty.losses) == (0, 0)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([0.1, 0.2], [0.1])
