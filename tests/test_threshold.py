import numpy as np
import pytest

from segfromxai.stages.threshold import THRESHOLDS, fixed, mean, otsu, otsu_value, percentile


def _otsu_brute(v):
    """Plain reference: try every distinct value as t, maximise between-class variance of {<= t} / {> t}."""
    v = np.ravel(v).astype(np.float64)
    best, best_t = -1.0, v.min()
    for t in np.unique(v)[:-1]:
        lo, hi = v[v <= t], v[v > t]
        w0, w1 = lo.size / v.size, hi.size / v.size
        b = w0 * w1 * (lo.mean() - hi.mean()) ** 2
        if b > best + 1e-15:
            best, best_t = b, t
    return best_t


def test_otsu_known_answer_two_levels():
    m = np.array([[0.1, 0.1, 0.9, 0.9]] * 4)
    assert otsu_value(m) == pytest.approx(0.1)
    assert otsu(m).tolist() == (m > 0.5).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    m = np.concatenate([rng.normal(0.2, 0.05, 40), rng.normal(0.7, 0.1, 24)]).reshape(8, 8)
    m = np.round(m, 2)  # ties
    assert otsu_value(m) == pytest.approx(_otsu_brute(m))


def test_otsu_constant_map_is_empty_and_batched_maps_are_independent():
    maps = np.stack([np.full((3, 3), 0.4), np.arange(9.0).reshape(3, 3)])
    out = otsu(maps)
    assert out.shape == (2, 3, 3) and not out[0].any() and out[1].any()
    assert np.array_equal(out[1], otsu(maps[1]))


def test_percentile_keeps_top_q_percent():
    m = np.arange(16.0).reshape(4, 4)
    assert percentile(m, q=25).sum() == 4 and percentile(m, q=25)[3].all()
    assert percentile(m, q=100).all()
    assert percentile(m, q=1).sum() == 1
    with pytest.raises(ValueError, match="q must be"):
        percentile(m, q=0)


def test_fixed_and_mean():
    m = np.array([[0.0, 0.2], [0.6, 1.0]])
    assert fixed(m, t=0.5).tolist() == [[False, False], [True, True]]
    assert mean(m).tolist() == [[False, False], [True, True]]  # mean 0.45
    assert mean(np.stack([m, 1 - m]))[1].tolist() == [[True, True], [False, False]]


def test_registry_names():
    assert set(THRESHOLDS) == {"otsu", "percentile", "fixed", "mean"}
