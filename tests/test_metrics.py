import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score

from segfromxai.quality.metrics import METRICS, confusion, summarise

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
