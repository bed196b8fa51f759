"""Boundary stage: known answers (a coarse square snaps to the image's edge), mask_soft against a brute-force
distance, determinism, odd sizes, and the registry feeding recipe validation and the pipeline."""

import numpy as np
import pytest

from segfromxai.stages.boundary import BOUNDARIES, mask_soft, refine_boundary
from segfromxai.run.pipeline import label_image
from segfromxai.recipe.recipe import RecipeError, parse_recipe

METHODS = sorted(BOUNDARIES)
EDGE_AWARE = [m for m in METHODS if m != "none"]


@pytest.fixture(autouse=True)
def _optional_libraries(request):
    """``crf`` needs the optional pydensecrf2 (the ``crf`` extra, installed by ``make install``)."""
    if "crf" in getattr(getattr(request.node, "callspec", None), "params", {}).values():
        pytest.importorskip("pydensecrf.densecrf")


def square_scene(h=224, w=224, top=60, left=70, bottom=150, right=170, grow=6):
    """An image with a bright square on a dark ground, the square's mask, and a coarse mask ``grow`` pixels
    larger on every side (what a cut on a 16-pixel token grid gives)."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(50, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    image[top:bottom, left:right] = np.clip(rng.normal(200, 4, (bottom - top, right - left, 3)), 0, 255)
    square = np.zeros((h, w), bool)
    square[top:bottom, left:right] = True
    coarse = np.zeros((h, w), bool)
    coarse[top - grow:bottom + grow, left - grow:right + grow] = True
    return image, square, coarse


def ring_scene():
    """A bright ring (radii 40-80) on a dark ground, the ring's mask, and the filled disc (radius 86) a token grid
    would cut."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:224, :224]
    r = np.hypot(yy - 112, xx - 112)
    ring = (r < 80) & (r >= 40)
    image = np.where(ring[..., None], rng.normal(200, 4, (224, 224, 3)), rng.normal(50, 4, (224, 224, 3)))
    return np.clip(image, 0, 255).astype(np.uint8), ring, r < 86


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _soft_slow(mask, cell, band):
    """Brute force: the signed distance of every pixel centre to the nearest pixel of the other class."""
    h, w = mask.shape
    pts = np.argwhere(np.ones_like(mask))
    out = np.empty(mask.shape)
    for (i, j) in pts:
        other = np.argwhere(mask != mask[i, j])
        d = np.sqrt(((other - (i, j)) ** 2).sum(1)).min()
        out[i, j] = d - 0.5 if mask[i, j] else 0.5 - d
    return np.clip(0.5 + out / (band * np.sqrt(cell[0] * cell[1])), 0, 1)


def test_mask_soft_matches_a_brute_force_distance_and_keeps_the_mask_exactly():
    rng = np.random.default_rng(1)
    mask = rng.random((9, 13)) > 0.6
    soft = mask_soft(mask, (2.0, 3.0), band=1.5)
    assert soft.dtype == np.float32 and soft.shape == mask.shape
    np.testing.assert_allclose(soft, _soft_slow(mask, (2.0, 3.0), 1.5), atol=1e-6)
    np.testing.assert_array_equal(soft > 0.5, mask)
    assert mask_soft(np.zeros((3, 4), bool), (1, 1)).max() == 0 and mask_soft(np.ones((3, 4), bool), (1, 1)).min() == 1


@pytest.mark.parametrize("method", EDGE_AWARE)
def test_a_coarse_square_snaps_to_the_image_edge(method):
    image, square, coarse = square_scene()
    assert iou(coarse, square) < 0.8
    out = refine_boundary([coarse], image, (16.0, 16.0), method)
    assert len(out) == 1 and out[0].dtype == bool
    assert iou(out[0], square) > 0.95, iou(out[0], square)


def test_grabcut_opens_a_ring_that_the_cut_filled_and_hole_filling_would_close_again():
    """Why the default keeps holes open: a bright ring on a dark ground, refined as the filled disc (a token grid
    cannot see the hole). GrabCut's colour models carve the hole; ``masks.clean(fill_holes=True)`` would undo it."""
    from segfromxai.ops.masks import clean

    image, ring, disc = ring_scene()
    (out,) = refine_boundary([disc], image, (16.0, 16.0), "grabcut", {"iterations": 2})
    assert iou(disc, ring) < 0.8 and iou(out, ring) > 0.95, iou(out, ring)
    assert iou(clean([out], fill_holes=False)[0], ring) > 0.95
    assert iou(clean([out], fill_holes=True)[0], ring) < 0.8


def test_none_is_the_identity():
    image, _, coarse = square_scene()
    assert refine_boundary([coarse], image, (16.0, 16.0), "none")[0].tolist() == coarse.tolist()


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_and_inputs_untouched(method):
    image, _, coarse = square_scene(97, 131, 20, 30, 70, 100, grow=5)
    soft = mask_soft(coarse, (7.0, 9.0))
    before = (soft.copy(), image.copy())
    a = BOUNDARIES[method](soft, image)
    b = BOUNDARIES[method](soft, image)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(soft, before[0])
    np.testing.assert_array_equal(image, before[1])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 301), (300, 5), (61, 43)])
def test_odd_sizes_and_aspect_ratios(method, shape):
    h, w = shape
    image = np.zeros((h, w, 3), np.uint8)
    image[: max(1, h // 2)] = 255
    mask = np.zeros((h, w), bool)
    mask[: max(1, h // 2)] = True
    out = BOUNDARIES[method](mask_soft(mask, (h / 14, w / 14)), image)
    assert out.shape == (h, w) and out.dtype == bool
    if h > 2:
        assert iou(out, mask) > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_are_rejected(method):
    with pytest.raises(ValueError, match="same H, W"):
        BOUNDARIES[method](np.zeros((4, 5)), np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        BOUNDARIES[method](np.zeros((4, 5)), np.zeros((4, 5, 3)))


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: " + ", ".join(METHODS)):
        refine_boundary([], np.zeros((2, 2, 3), np.uint8), (1, 1), "crf2")


def test_the_registry_feeds_recipe_validation():
    base = {"explainers": {"gradcam": {}}}
    assert parse_recipe(base).boundary.method == "none"
    with pytest.raises(RecipeError, match=r"\[boundary\]: unknown method 'snap'; valid: " + ", ".join(METHODS)):
        parse_recipe({**base, "boundary": {"method": "snap"}})
    for method in METHODS:
        r = parse_recipe({**base, "boundary": {"method": method}})
        assert r.boundary.method == method and parse_recipe(r.to_dict()) == r
    with pytest.raises(RecipeError, match="unknown key 'radius'"):
        parse_recipe({**base, "boundary": {"method": "none", "radius": 0.1}})


def test_a_recipe_without_the_stage_keeps_its_digest():
    base = {"explainers": {"gradcam": {}}}
    r = parse_recipe(base)
    assert "boundary" not in str(sorted(r.to_dict())) or r.digest() == parse_recipe(
        {**base, "boundary": {"method": "none"}}).digest()
    assert parse_recipe({**base, "boundary": {"method": EDGE_AWARE[0]}}).digest() != r.digest()


@pytest.mark.parametrize("method", EDGE_AWARE)
def test_label_image_runs_the_stage_with_the_image(method):
    image, square, _ = square_scene()
    fused = np.zeros((14, 14))
    fused[3:10, 4:11] = 1.0  # the square grown to whole 16-pixel tokens
    recipe = parse_recipe({"explainers": {"gradcam": {}}, "threshold": {"method": "fixed"},
                           "boundary": {"method": method}})
    plain = label_image(fused, (224, 224), parse_recipe({"explainers": {"gradcam": {}},
                                                         "threshold": {"method": "fixed"}}))
    with pytest.raises(ValueError, match="needs the image"):
        label_image(fused, (224, 224), recipe)
    snapped = label_image(fused, (224, 224), recipe, image=image)
    assert len(plain) == len(snapped) == 1
    assert iou(snapped[0], square) > iou(plain[0], square) + 0.05


@pytest.mark.parametrize("case", ["square", "ring"])
def test_grabcut_started_on_a_subsample_matches_opencvs_start_on_every_pixel(case):
    """``init_stride = 2`` (k-means start on a quarter of the pixels, every iteration refitting on all of them)
    against OpenCV's own start on every pixel (``init_stride = 1``): the same mask on the known-answer scenes."""
    if case == "square":
        image, truth, coarse = square_scene()
    else:
        rng = np.random.default_rng(1)
        yy, xx = np.mgrid[:200, :240]
        r = np.hypot(yy - 100, xx - 120)
        truth = (r < 70) & (r >= 30)
        image = np.where(truth[..., None], rng.normal(180, 10, (200, 240, 3)), rng.normal(60, 10, (200, 240, 3)))
        image, coarse = np.clip(image, 0, 255).astype(np.uint8), r < 76
    soft = mask_soft(coarse, (16.0, 16.0))
    full = BOUNDARIES["grabcut"](soft, image, iterations=2, init_stride=1)
    sub = BOUNDARIES["grabcut"](soft, image, iterations=2, init_stride=2)
    assert iou(full, truth) > 0.95 and iou(sub, truth) > 0.95
    assert (full != sub).mean() < 0.002


def test_labelling_a_batch_on_two_threads_gives_the_masks_of_one(tiny_card, synth_images):
    """The later stages of a batch run side by side on torch's threads (``pipeline.thread_map``); with GrabCut's
    per-thread generator reseeded before each use, the masks are those of one thread, in order."""
    import torch

    from segfromxai.io.images import find_images, load_image
    from segfromxai.models.model import load_model
    from segfromxai.run.pipeline import label_batch, thread_map

    assert thread_map(lambda i: i * i, list(range(7)), workers=3) == [i * i for i in range(7)]
    model = load_model(checkpoint=tiny_card)
    ims = [load_image(p) for p in find_images(synth_images / "images")[:6]]
    recipe = parse_recipe({"explainers": {"gradcam": {}}, "refine": {"method": "ncut", "tau": 0.0},
                           "boundary": {"method": "grabcut", "iterations": 2},
                           "masks": {"min_area": 0.0, "fill_holes": False}})
    x = model.preprocess.batch(ims)
    threads = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = label_batch(model, [recipe], x, [im.shape[:2] for im in ims], images=ims)[0].masks
    finally:
        torch.set_num_threads(threads)
    assert sum(len(ms) for ms in got[1]) >= 3
    assert [[m.tolist() for m in ms] for ms in got[1]] == [[m.tolist() for m in ms] for ms in got[2]]


def test_checked_is_grabcut_where_it_agrees_with_the_guided_filter_else_the_guided_filter():
    """The ring of the test above: GrabCut carves the hole, the guided filter keeps the disc; their IoU is the
    ring's share of the guided disc, about 0.75. At min_iou 0 the result is GrabCut's, above their IoU the guided
    filter's, exactly."""
    from segfromxai.stages.boundary import checked, grabcut, guided

    image, ring, disc = ring_scene()
    soft = mask_soft(disc, (16.0, 16.0))
    carved, snapped = grabcut(soft, image, iterations=2), guided(soft, image)
    agree = iou(carved, snapped)
    assert 0.6 < agree < 0.8 and iou(carved, ring) > 0.95
    assert np.array_equal(checked(soft, image, min_iou=0.0), carved)
    assert np.array_equal(checked(soft, image, min_iou=agree - 0.01), carved)
    assert np.array_equal(checked(soft, image, min_iou=agree + 0.01), snapped)
    with pytest.raises(ValueError, match="min_iou"):
        checked(soft, image, min_iou=1.5)
