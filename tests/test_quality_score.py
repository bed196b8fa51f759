"""The mask-quality score (segfromxai.stages.quality): each term against a plain computation or a known answer, and
the score on a constructed good and bad mask; `run --min-score` leaves out the masks below it."""

import json

import numpy as np
import pytest

from segfromxai.models.model import load_model
from segfromxai.recipe.recipe import load_recipe, parse_recipe
from segfromxai.run.local import run
from segfromxai.stages.quality import (
    BIAS,
    TERMS,
    WEIGHTS,
    border_share,
    cohesion,
    quality_score,
    quality_terms,
)


def scene():
    """A 64 x 64 image whose object is the square [16, 48)^2: the fused map is 0.9 there and 0.1 elsewhere, the
    8 x 8 token grid has one feature direction inside the object and another outside (plus noise), and the refiner
    returned the square."""
    obj = np.zeros((64, 64), bool)
    obj[16:48, 16:48] = True
    fused_px = np.where(obj, 0.9, 0.1).astype(np.float32)
    rng = np.random.default_rng(0)
    grid = np.zeros((8, 8), bool)
    grid[2:6, 2:6] = True
    tokens = np.where(grid[..., None], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]) + 0.1 * rng.standard_normal((8, 8, 3))
    explained = grid.copy()
    return obj, fused_px, tokens, explained


def test_border_share_is_the_outer_ring_covered():
    m = np.zeros((10, 10), bool)
    assert border_share(m) == 0.0
    m[0, :] = True  # the top row: 10 of the 36 ring pixels
    assert border_share(m) == pytest.approx(10 / 36)
    assert border_share(np.ones((10, 10), bool)) == 1.0


def test_cohesion_matches_a_plain_loop_and_prefers_the_true_split():
    obj, _, tokens, _ = scene()
    t = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    inside = np.zeros((8, 8), bool)
    inside[2:6, 2:6] = True
    f, g = [v for v in t[inside]], [v for v in t[~inside]]
    mf, mg = sum(f) / len(f), sum(g) / len(g)
    mf, mg = mf / np.linalg.norm(mf), mg / np.linalg.norm(mg)
    plain = (np.mean([v @ mf for v in f]) + np.mean([v @ mg for v in g])) / 2 - np.mean([v @ mg for v in f])
    assert cohesion(obj, tokens) == pytest.approx(plain, abs=1e-4)
    half = np.zeros_like(obj)
    half[:, :32] = True  # cuts both the object and the background in two
    assert cohesion(obj, tokens) > 0.8 > 0.3 > cohesion(half, tokens)
    assert cohesion(obj, None) == 0.0 and cohesion(np.zeros_like(obj), tokens) == 0.0


def test_the_score_ranks_a_good_mask_above_a_bad_one():
    obj, _, tokens, _ = scene()
    frame = np.zeros_like(obj)  # the background along the frame: the classic wrong side of a cut
    frame[:8], frame[-8:], frame[:, :8], frame[:, -8:] = True, True, True, True
    terms = {name: quality_terms(m, confidence=0.5, refined=[obj], tokens=tokens)
             for name, m in [("good", obj), ("bad", frame)]}
    assert terms["good"] == pytest.approx({"border": 0.0, "area": 0.25, "confidence": 0.5,
                                           "cohesion": cohesion(obj, tokens), "kept": 1.0})
    assert terms["bad"] == pytest.approx({"border": 1.0, "area": 1 - 48 * 48 / 64 / 64, "confidence": 0.5,
                                          "cohesion": cohesion(frame, tokens), "kept": 0.0})
    good, bad = quality_score(terms["good"]), quality_score(terms["bad"])
    assert 0.0 <= bad < good <= 1.0 and good - bad > 0.5
    assert set(WEIGHTS) == set(TERMS)
    by_hand = BIAS + sum(WEIGHTS[t] * terms["good"][t] for t in TERMS)
    assert good == pytest.approx(min(max(by_hand, 0.0), 1.0))


def test_min_score_leaves_out_masks_below_it(tmp_path, synth_images, tiny_card):
    model = load_model(checkpoint=tiny_card)
    base = {"explainers": {"gradcam": {}}}
    every = run(parse_recipe(base), synth_images / "images", tmp_path / "all", model=model, limit=6)
    anns = json.loads((tmp_path / "all" / "pseudo_labels.json").read_text())["annotations"]
    assert anns and all(set(a["attributes"]["quality"]) == set(TERMS) for a in anns)
    assert all(a["score"] == pytest.approx(quality_score(a["attributes"]["quality"])) for a in anns)
    cut = sorted(a["score"] for a in anns)[len(anns) // 2]
    run(parse_recipe({**base, "output": {"min_score": cut}}), synth_images / "images", tmp_path / "some",
        model=model, limit=6)
    kept = json.loads((tmp_path / "some" / "pseudo_labels.json").read_text())["annotations"]
    assert sorted(a["score"] for a in kept) == sorted(a["score"] for a in anns if a["score"] >= cut)
    assert every["counts"]["annotations"] == len(anns)


def test_min_score_zero_keeps_the_digest_of_recipes_from_before_the_score():
    r = load_recipe("default")
    assert parse_recipe({**r.to_dict(), "output": {**r.output, "min_score": 0.0}}).digest() == r.digest()
    assert parse_recipe({**r.to_dict(), "output": {**r.output, "min_score": 0.5}}).digest() != r.digest()
