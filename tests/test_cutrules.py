"""TokenCut/MaskCut foreground rules and the per-image graph threshold (segfromxai.ops.cutrules, ncut's eigvec path)."""

import numpy as np
import pytest

from segfromxai.ops.cutrules import corner_veto, corners_held, eigvec_side, seed_component, similarity_quantile
from segfromxai.stages.refine import ncut


def test_similarity_quantile_is_the_quantile_of_the_off_diagonal_entries():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    s = a + a.T
    off = [s[i, j] for i in range(6) for j in range(6) if i != j]
    for q in (0.0, 0.3, 0.5, 1.0):
        assert similarity_quantile(s, q) == pytest.approx(np.quantile(off, q))
    with pytest.raises(ValueError, match="quantile"):
        similarity_quantile(s, 1.5)


def test_eigvec_side_holds_the_largest_magnitude_entry_and_maskcut_reverses_corner_sides():
    y = np.array([0.1, 0.2, -0.9, 0.3])  # largest |y| is negative: the low side is foreground
    fg = eigvec_side(y, float(y.mean()), np.arange(4), (2, 2), corners=False)
    assert fg.tolist() == [False, False, True, False]
    # on a 2 x 2 grid every token is a corner: three corners in the foreground side -> reversed by MaskCut's rule
    y = np.array([0.5, 0.4, 0.45, -0.1])
    assert eigvec_side(y, float(y.mean()), np.arange(4), (2, 2), corners=False).tolist() == [True, True, True, False]
    assert eigvec_side(y, float(y.mean()), np.arange(4), (2, 2), corners=True).tolist() == [False, False, False, True]
    assert corners_held(np.ones((3, 3), bool)) == 4 and corners_held(np.eye(3, dtype=bool)) == 2


def test_corner_veto_reverses_only_a_chosen_side_holding_two_corners_against_fewer():
    grid = (3, 3)
    ring = np.ones(9, bool)
    ring[4] = False  # y > split on the frame: every corner
    assert corner_veto(ring, True, np.arange(9), grid) is False  # the frame was chosen: reversed to the centre
    assert corner_veto(ring, False, np.arange(9), grid) is False  # the centre was chosen: kept
    half = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0], bool)  # two corners on each side: the explanation's choice stands
    assert corner_veto(half, True, np.arange(9), grid) is True and corner_veto(half, False, np.arange(9), grid) is False
    # later cuts see only the remaining tokens: removed corners count for neither side
    idx = np.array([1, 2, 3, 5, 7, 8])
    hi = np.array([True, True, False, False, False, True])  # tokens 1, 2, 8: corners 2 and 8 on the high side
    assert corner_veto(hi, True, idx, grid) is False and corner_veto(hi, False, idx, grid) is False


def test_seed_component_keeps_the_component_of_the_strongest_token():
    side = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]], bool)
    strength = np.zeros((3, 4))
    strength[2, 3] = 5.0
    assert seed_component(side, strength).tolist() == (np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]], bool)
                                                       ).tolist()
    assert not seed_component(np.zeros((2, 2), bool), strength[:2, :2]).any()


def _block_features(common=0.0, seed=0):
    """An 8 x 8 grid: a 3 x 3 object block (direction e0) in a background (direction e1), plus ``common`` (e2)."""
    rng = np.random.default_rng(seed)
    f = np.zeros((8, 8, 3))
    f[..., 1] = 1.0
    f[2:5, 3:6] = [1.0, 0.0, 0.0]
    f += 0.05 * rng.normal(size=f.shape)
    f[..., 2] += common
    return f


def test_tokencut_rule_finds_the_object_with_no_explanation():
    f = _block_features()
    zeros = np.zeros((8, 8))
    masks = ncut(zeros, zeros > 0, size=(8, 8), features=f, foreground="eigvec", components="seed")
    truth = np.zeros((8, 8), bool)
    truth[2:5, 3:6] = True
    assert len(masks) == 1 and (masks[0] == truth).all()


def test_near_parallel_features_need_the_per_image_threshold():
    """A large shared direction makes every cosine exceed 0.2: the fixed-tau graph is complete (no mask); tau at the
    median similarity recovers the object."""
    f = _block_features(common=3.0)
    zeros = np.zeros((8, 8))
    common = dict(size=(8, 8), features=f, foreground="eigvec", components="seed")
    assert ncut(zeros, zeros > 0, **common) == []
    (m,) = ncut(zeros, zeros > 0, tau_quantile=0.5, **common)
    truth = np.zeros((8, 8), bool)
    truth[2:5, 3:6] = True
    assert (m == truth).all()


def test_tokencut_with_a_large_key_bias_has_no_cut_and_dropping_the_bias_finds_the_object():
    """Known answer for ``[features] drop_key_bias`` (DINOv2's keys): a bias vector as long as the keys, added to
    every token, puts every cosine above tau = 0.2, so TokenCut's graph is complete and gives no mask; the keys less
    that bias give the object, exactly the block of tokens built as the object."""
    rng = np.random.default_rng(3)
    f = _block_features()
    bias = rng.normal(size=f.shape[-1])
    bias *= 3.0 * np.linalg.norm(f, axis=-1).max() / np.linalg.norm(bias)
    zeros = np.zeros((8, 8))
    common = dict(size=(8, 8), tau=0.2, foreground="eigvec", components="seed")
    x = (f + bias).reshape(64, -1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert (x @ x.T).min() > 0.2
    assert ncut(zeros, zeros > 0, features=f + bias, **common) == []
    (m,) = ncut(zeros, zeros > 0, features=(f + bias) - bias, **common)
    truth = np.zeros((8, 8), bool)
    truth[2:5, 3:6] = True
    assert (m == truth).all()


@pytest.mark.parametrize("components", ["overlap", "largest", "all", "seed"])
def test_explanation_free_rules_keep_components_without_reading_the_map(components):
    """With TokenCut's rule and an all-zero map (no thresholded token), every way of keeping components still
    finds the object: ``overlap`` and ``largest`` then count tokens, not explanation (was: an empty argmax)."""
    f = _block_features()
    zeros = np.zeros((8, 8))
    truth = np.zeros((8, 8), bool)
    truth[2:5, 3:6] = True
    (m,) = ncut(zeros, zeros > 0, size=(8, 8), features=f, foreground="corners", components=components)
    assert (m == truth).all()


def test_recut_corners_finds_the_object_inside_a_side_that_holds_corners():
    """Known answer, a street scene in miniature: a sky band (rows 0-2) against the ground (rows 3-9) that holds a
    small object (rows 6-7, columns 3-5) resembling the ground (cosine 0.71; adjacent tokens join through the
    position term). The first cut is sky against ground-and-object; both sides hold two corners, so MaskCut's rule
    cannot settle it and keeps the whole ground (70 tokens). One recut of that side isolates the object."""
    g = 10
    f = np.zeros((g, g, 3))
    f[:3] = [1.0, 0.0, 0.0]
    f[3:] = [0.0, 0.0, 1.0]
    f[6:8, 3:6] = [0.0, 1.0, 1.0]
    f += 0.02 * np.random.default_rng(0).normal(size=f.shape)
    zeros = np.zeros((g, g))
    common = dict(size=(g, g), features=f, foreground="corners", components="all", tau=0.8, position_weight=0.2,
                  position_sigma=0.1)
    truth = np.zeros((g, g), bool)
    truth[6:8, 3:6] = True
    (published,) = ncut(zeros, zeros > 0, **common)
    assert published.sum() == 70 and published[truth].all()
    (recut,) = ncut(zeros, zeros > 0, recut_corners=1, **common)
    assert (recut == truth).all()
    (twice,) = ncut(zeros, zeros > 0, recut_corners=3, **common)  # the object holds no corner: no further cut
    assert (twice == truth).all()


def test_retry_missed_cuts_again_after_a_side_that_misses_the_explanation():
    """Known answer: a band of odd tokens at the top edge (rows 0-2, columns 2-7, no grid corner, cosine 0 with
    the rest) and the explained object (rows 5-7, columns 4-6, cosine 0.71 with the background, joined to it only
    by the position term between adjacent tokens). The first cut splits off the band; the explanation picks the
    rest, which holds all four corners, so the corner veto reverses it to the band, which misses the explanation:
    no instance. With ``retry_missed=1`` the band leaves the graph and the next cut, not counted as a second
    instance, gives exactly the object."""
    g = 10
    f = np.zeros((g, g, 3))
    f[:, :] = [0.0, 0.0, 1.0]
    f[0:3, 2:8] = [1.0, 0.0, 0.0]
    f[5:8, 4:7] = [0.0, 1.0, 1.0]
    f += 0.02 * np.random.default_rng(0).normal(size=f.shape)
    fused = np.zeros((g, g))
    fused[5:8, 4:7] = 1.0
    common = dict(size=(g, g), features=f, tau=0.8, position_weight=0.2, position_sigma=0.1, foreground="mean",
                  corner_veto=True)
    assert ncut(fused, fused > 0.5, **common) == []
    (m,) = ncut(fused, fused > 0.5, retry_missed=1, **common)
    assert (m == (fused > 0.5)).all()
    assert len(ncut(fused, fused > 0.5, retry_missed=1, instances=2, **common)) == 1  # then only background is left
