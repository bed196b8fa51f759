"""A student's probabilities to masks: the soft maps (known answers), the boundary stage on them, and which
boundary a student takes from its training run."""

from __future__ import annotations

import numpy as np
import pytest

from segfromxai.stages.boundary import BOUNDARIES
from segfromxai.student.predict import student_boundary
from segfromxai.student.masks import SOFT_MAPS, channel_masks, soft_probs, soft_ramp


def _probs(k: int = 3, size: int = 12, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 2, (k, size, size))
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def test_soft_probs_is_the_foreground_probability_in_binary_mode():
    p = _probs(k=2)
    assert np.allclose(soft_probs(p, 1, grid=(3, 3)), p[1], atol=1e-6)


@pytest.mark.parametrize("name", sorted(SOFT_MAPS))
def test_every_soft_map_is_above_one_half_exactly_where_the_channel_wins(name):
    p = _probs(k=3)
    for c in (1, 2):
        s = SOFT_MAPS[name](p, c, grid=(3, 3))
        assert s.dtype == np.float32 and s.shape == p.shape[1:] and 0 <= s.min() and s.max() <= 1
        assert np.array_equal(s > 0.5, p.argmax(0) == c)


def test_soft_probs_against_a_slow_reference():
    p = _probs(k=4, size=5)
    s = soft_probs(p, 2, grid=(1, 1))
    for y in range(5):
        for x in range(5):
            rival = max(p[j, y, x] for j in range(4) if j != 2)
            assert s[y, x] == pytest.approx(p[2, y, x] / (p[2, y, x] + rival), rel=1e-5)


def test_soft_ramp_falls_off_over_one_token_of_the_student_grid():
    p = np.zeros((2, 16, 16), np.float32)
    p[0], p[1, :, :8] = 1, 1
    p[0, :, :8] = 0
    s = soft_ramp(p, 1, grid=(2, 2))  # a token is 8 px: the ramp spans 8 px across the edge at x = 8
    assert s[0, 7] == pytest.approx(0.5 + 0.5 / 8) and s[0, 8] == pytest.approx(0.5 - 0.5 / 8)
    assert s[0, 0] == 1 and s[0, 15] == 0


def _square_scene():
    """A dark square [20, 44) on a light 64 px image, and a student that believes a blob 4 px too large all round,
    its belief falling off over about 3 px."""
    image = np.full((64, 64, 3), 220, np.uint8)
    image[20:44, 20:44] = 30
    truth = np.zeros((64, 64), bool)
    truth[20:44, 20:44] = True
    yy, xx = np.mgrid[:64, :64]
    d = np.maximum(np.abs(yy - 31.5), np.abs(xx - 31.5)) - 16.0  # > 0 outside a square of side 32
    fg = 1 / (1 + np.exp(d / 3.0))
    return image, truth, np.stack([1 - fg, fg]).astype(np.float32)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_boundary_none_keeps_the_winning_pixels():
    image, _, p = _square_scene()
    (m,) = channel_masks(p, None, grid=(4, 4), boundary="none")
    assert np.array_equal(m, p.argmax(0) == 1)


@pytest.mark.parametrize("soft", sorted(SOFT_MAPS))
def test_guided_moves_a_too_large_student_mask_onto_the_image_edge(soft):
    image, truth, p = _square_scene()
    (before,) = channel_masks(p, image, grid=(4, 4), boundary="none")
    (after,) = channel_masks(p, image, grid=(4, 4), boundary="guided", params={"radius": 0.12}, soft=soft)
    assert _iou(before, truth) < 0.6 < 0.9 < _iou(after, truth)


def test_a_channel_that_wins_nowhere_stays_empty_and_bad_names_are_refused():
    image, _, p = _square_scene()
    p3 = np.concatenate([p, np.zeros((1, 64, 64), np.float32)])
    assert not channel_masks(p3, image, grid=(4, 4), boundary="guided")[1].any()
    with pytest.raises(ValueError, match="needs the image"):
        channel_masks(p, None, grid=(4, 4), boundary="guided")
    with pytest.raises(ValueError, match="guided"):
        channel_masks(p, image, grid=(4, 4), boundary="snap")
    with pytest.raises(ValueError, match="probs"):
        channel_masks(p, image, grid=(4, 4), soft="blur")


def test_student_boundary_follows_the_run_recipe_unless_overridden():
    recipe = {"method": "guided", "radius": 0.2, "eps": 0.01}
    assert student_boundary(recipe) == ("guided", {"radius": 0.2, "eps": 0.01})
    assert student_boundary(recipe, "guided") == ("guided", {"radius": 0.2, "eps": 0.01})
    assert student_boundary(recipe, "none") == ("none", {})
    assert student_boundary(recipe, "grabcut") == ("grabcut", {})  # another method: its own defaults
    assert student_boundary({}) == ("none", {})  # a run from before the boundary stage
    assert set(BOUNDARIES) >= {"none", "guided"}
