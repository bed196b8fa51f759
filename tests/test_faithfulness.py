"""Faithfulness metrics: hand-computed curves on a constructed model, a slow per-step reference on a tiny ViT."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from segfromxai.quality.faithfulness import (
    MAP_METRICS,
    SUBSTRATES,
    auc,
    average_drop_increase,
    deletion_auc,
    deletion_curve,
    drop_increase_summary,
    insertion_auc,
    insertion_curve,
    pointing_game,
)

A = 2 * math.log(3)  # logit scale: sigmoid(A) = 0.9, sigmoid(A / 2) = 0.75, sigmoid(0) = 0.5


def region_model(x: torch.Tensor) -> torch.Tensor:
    """Class 0 logit = A * mean of channel 0 over R (the top-left 4x4 pixels), class 1 logit = 0."""
    z = A * x[:, 0, :4, :4].mean(dim=(1, 2))
    return torch.stack([z, torch.zeros_like(z)], dim=1)


def region_image(value: float = 1.0, seed: int = 0) -> torch.Tensor:
    """(1, 3, 8, 8): random everywhere except channel 0 on R, which is `value`."""
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    x[:, 0, :4, :4] = value
    return x


R = torch.zeros(8, 8)  # |R| = 16 of 64 pixels: with steps=4, R goes in exactly one step
R[:4, :4] = 1
PERFECT, REVERSED = R[None], 1 - R[None]
TARGET0 = torch.tensor([0])


def test_deletion_known_values_perfect_versus_reversed_map():
    x = region_image()
    perfect = deletion_curve(region_model, x, PERFECT, TARGET0, steps=4)
    reversed_ = deletion_curve(region_model, x, REVERSED, TARGET0, steps=4)
    np.testing.assert_allclose(perfect, [[0.9, 0.5, 0.5, 0.5, 0.5]])
    np.testing.assert_allclose(reversed_, [[0.9, 0.9, 0.9, 0.9, 0.5]])
    np.testing.assert_allclose(auc(perfect), [0.25 * (0.45 + 1.5 + 0.25)])
    assert deletion_auc(region_model, x, PERFECT, TARGET0, steps=4) < deletion_auc(
        region_model, x, REVERSED, TARGET0, steps=4)
    # Eight pixels a step: R is half deleted at step 1.
    np.testing.assert_allclose(deletion_curve(region_model, x, PERFECT, TARGET0, steps=8)[0, :3], [0.9, 0.75, 0.5])


def test_tie_rule_is_ascending_pixel_index():
    # A constant map deletes in raster order: rows 0-1 (half of R), then rows 2-3 (the rest of R).
    curve = deletion_curve(region_model, region_image(), torch.zeros(1, 8, 8), TARGET0, steps=4)
    np.testing.assert_allclose(curve, [[0.9, 0.75, 0.5, 0.5, 0.5]])


def test_step_counts_round_half_up():
    # 64 pixels, 128 steps: step i deletes floor(i / 2 + 1/2) pixels (Python's round() would give 0, 2, 2, 4, ...).
    curve = deletion_curve(region_model, region_image(), PERFECT, TARGET0, steps=128)
    deleted = [0, 1, 1, 2, 2, 3, 3, 4]
    np.testing.assert_allclose(curve[0, :8], [1 / (1 + math.exp(-A * (1 - n / 16))) for n in deleted])


def test_insertion_known_values():
    x = region_image()
    np.testing.assert_allclose(insertion_curve(region_model, x, PERFECT, TARGET0, steps=4, substrate="zeros"),
                               [[0.5, 0.9, 0.9, 0.9, 0.9]])
    np.testing.assert_allclose(insertion_curve(region_model, x, REVERSED, TARGET0, steps=4, substrate="zeros"),
                               [[0.5, 0.5, 0.5, 0.5, 0.9]])
    blurred = gaussian_blur(x, [11, 11], [5.0, 5.0])
    b = torch.softmax(region_model(blurred).double(), 1)[0, 0].item()
    np.testing.assert_allclose(insertion_curve(region_model, x, PERFECT, TARGET0, steps=4), [[b, 0.9, 0.9, 0.9, 0.9]])
    np.testing.assert_allclose(insertion_curve(region_model, x, REVERSED, TARGET0, steps=4), [[b, b, b, b, 0.9]])
    assert insertion_auc(region_model, x, PERFECT, TARGET0, steps=4) > insertion_auc(
        region_model, x, REVERSED, TARGET0, steps=4)


def test_auc_known_answers():
    np.testing.assert_allclose(auc(np.full((2, 11), 0.3)), [0.3, 0.3])
    np.testing.assert_allclose(auc(np.linspace(1, 0, 21)[None]), [0.5])
    np.testing.assert_allclose(auc(np.array([[0.0, 1.0]])), [0.5])


def reference_curve(model, x, maps, target, steps, substrate, deletion):
    """One image, one step at a time; ranking by Python's sorted() on (-value, index)."""
    h, w = x.shape[-2:]
    out = np.zeros((x.shape[0], steps + 1))
    for b in range(x.shape[0]):
        m = maps[b][None, None].float()
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        values = m.flatten().tolist()
        order = sorted(range(h * w), key=lambda p: (-values[p], p))
        img = x[b]
        sub = torch.zeros_like(img) if substrate == "zeros" else gaussian_blur(img[None], [11, 11], [5.0, 5.0])[0]
        for i in range(steps + 1):
            n = math.floor(i * h * w / steps + 0.5)
            switched = torch.zeros(h * w, dtype=torch.bool)
            switched[order[:n]] = True
            switched = switched.view(1, h, w)
            pert = torch.where(switched, sub, img) if deletion else torch.where(switched, img, sub)
            with torch.no_grad():
                out[b, i] = torch.softmax(model(pert[None]).double(), 1)[0, target[b]].item()
    return out


def random_maps(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "grid":
        return torch.randint(0, 3, (3, 4, 4), generator=g).float() / 2  # few values: many ties
    return torch.randint(0, 4, (3, 32, 32), generator=g).float()  # pixel level, heavy ties


@pytest.fixture(scope="module")
def vit_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 3, 4])


@pytest.mark.parametrize("kind", ["grid", "pixel"])
@pytest.mark.parametrize("deletion,substrate", [(True, "zeros"), (True, "blur"), (False, "blur"), (False, "zeros")])
def test_batched_curve_matches_reference(tiny_vit, vit_batch, kind, deletion, substrate):
    x, target = vit_batch
    maps = random_maps(kind)
    fn = deletion_curve if deletion else insertion_curve
    got = fn(tiny_vit, x, maps, target, steps=7, substrate=substrate, batch_size=10)
    want = reference_curve(tiny_vit, x, maps, target, 7, substrate, deletion)
    assert got.shape == (3, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_batch_size_independence(tiny_vit, vit_batch):
    x, target = vit_batch
    maps = random_maps("grid")
    for fn in (deletion_curve, insertion_curve):
        np.testing.assert_allclose(fn(tiny_vit, x, maps, target, steps=5, batch_size=1),
                                   fn(tiny_vit, x, maps, target, steps=5, batch_size=64), atol=1e-5)
    one = average_drop_increase(tiny_vit, x, maps, target, batch_size=1)
    many = average_drop_increase(tiny_vit, x, maps, target, batch_size=64)
    np.testing.assert_allclose(one[0], many[0], atol=1e-3)
    np.testing.assert_array_equal(one[1], many[1])


def test_pointing_game_hand_cases():
    gt = np.zeros((1, 8, 8), bool)
    gt[0, 1:4, 1:4] = True

    def peak(r, c):
        m = torch.zeros(1, 8, 8)
        m[0, r, c] = 1.0
        return m

    assert pointing_game(peak(2, 2), gt)[0] == 1.0
    assert pointing_game(peak(6, 6), gt)[0] == 0.0
    # (5, 2) is 2 px below the box: a hit from tolerance 2 on.
    assert pointing_game(peak(5, 2), gt, tolerance=1)[0] == 0.0
    assert pointing_game(peak(5, 2), gt, tolerance=2)[0] == 1.0
    # (5, 5) is 2 px from the box corner in each axis (distance sqrt(8)): a disk of radius 2 misses, 3 hits.
    assert pointing_game(peak(5, 5), gt, tolerance=2)[0] == 0.0
    assert pointing_game(peak(5, 5), gt, tolerance=3)[0] == 1.0
    assert np.isnan(pointing_game(peak(2, 2), np.zeros((1, 8, 8), bool))[0])


def test_pointing_game_ties_batch_and_upsampling():
    gt = np.zeros((3, 8, 8), bool)
    gt[:, 1:4, 1:4] = True
    maps = torch.zeros(3, 8, 8)
    maps[0, 6, 6] = maps[0, 2, 2] = 1.0  # two maxima, one inside: a hit
    maps[1] = 1.0  # a constant map: every pixel is a maximum, so a hit
    maps[2, 6, 6] = maps[2, 7, 7] = 1.0  # two maxima, both outside: a miss
    np.testing.assert_array_equal(pointing_game(maps, gt), [1.0, 1.0, 0.0])
    grid = torch.zeros(1, 4, 4)
    grid[0, 0, 0] = 1.0  # upsampled to 8x8, the maximum is pixel (0, 0) only
    corner = np.zeros((1, 8, 8), bool)
    corner[0, 0, 0] = True
    assert pointing_game(grid, corner)[0] == 1.0
    corner[0, 0, 0], corner[0, 1, 1] = False, True
    assert pointing_game(grid, corner)[0] == 0.0
    assert pointing_game(grid, corner, tolerance=2)[0] == 1.0


def test_average_drop_increase_known_answers():
    x = torch.cat([region_image(1.0), region_image(1.0), region_image(1.0), region_image(-1.0), region_image(1.0)])
    half = R * 0.5
    half[7, 7] = 1.0  # min-max: R -> 0.5, so O = sigmoid(A / 2) = 0.75
    maps = torch.stack([2 * R + 1, 1 - R, half, 1 - R, torch.ones(8, 8)])
    drop, increase = average_drop_increase(region_model, x, maps, torch.zeros(5, dtype=torch.long))
    # keeps R; deletes R (0.9 -> 0.5); halves R (0.9 -> 0.75); deletes R of an image scoring 0.1; constant map.
    np.testing.assert_allclose(drop, [0.0, 40 / 0.9, 15 / 0.9, 0.0, np.nan])
    np.testing.assert_array_equal(increase, [0.0, 0.0, 0.0, 1.0, np.nan])
    avg_drop, inc_pct = drop_increase_summary(drop, increase)
    assert avg_drop == pytest.approx((40 / 0.9 + 15 / 0.9) / 4)
    assert inc_pct == pytest.approx(25.0)
    assert all(math.isnan(v) for v in drop_increase_summary([np.nan], [np.nan]))


def test_registry_directions_and_calls():
    assert {k: (m.higher_is_better, m.needs_model) for k, m in MAP_METRICS.items()} == {
        "deletion_auc": (False, True), "insertion_auc": (True, True), "pointing_game": (True, False),
        "average_drop": (False, True), "increase_in_confidence": (True, True)}
    x = torch.cat([region_image(), region_image(seed=1)])
    maps, target = torch.cat([PERFECT, REVERSED]), torch.zeros(2, dtype=torch.long)
    gt = np.broadcast_to(R.bool().numpy(), (2, 8, 8))
    for name, metric in MAP_METRICS.items():
        args = (region_model, x, maps, target) if metric.needs_model else (maps, gt)
        values = metric(*args)
        assert values.shape == (2,), name
        better = values[0] > values[1] if metric.higher_is_better else values[0] < values[1]
        assert better or name == "increase_in_confidence", name  # both 0 there


@pytest.mark.parametrize("call,match", [
    (lambda: deletion_curve(region_model, region_image(), PERFECT, TARGET0, steps=0), "steps"),
    (lambda: deletion_curve(region_model, region_image(), PERFECT, TARGET0, substrate="noise"), "zeros, blur"),
    (lambda: insertion_curve(region_model, region_image(), PERFECT, TARGET0, batch_size=0), "batch_size"),
    (lambda: deletion_curve(region_model, region_image(), torch.ones(2, 8, 8), TARGET0), "maps hold 2"),
    (lambda: deletion_curve(region_model, region_image(), torch.ones(8, 8), TARGET0), r"\(B, h, w\)"),
    (lambda: deletion_curve(region_model, region_image()[0], PERFECT, TARGET0), "x must be"),
    (lambda: deletion_curve(region_model, region_image(), PERFECT, torch.tensor([0.0])), "target"),
    (lambda: average_drop_increase(region_model, region_image(), PERFECT * np.nan, TARGET0), "finite"),
    (lambda: pointing_game(PERFECT, np.ones((1, 8, 8))), "bool"),
    (lambda: pointing_game(PERFECT, np.ones((2, 8, 8), bool)), "maps hold 1"),
    (lambda: pointing_game(PERFECT, np.ones((1, 8, 8), bool), tolerance=-1), "tolerance"),
    (lambda: auc(np.ones((2, 1))), "T >= 2"),
])
def test_invalid_inputs_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_blur_needs_images_larger_than_the_kernel_radius():
    with pytest.raises(ValueError, match="blur"):
        insertion_curve(region_model, torch.zeros(1, 3, 5, 5), torch.ones(1, 5, 5), TARGET0)
    assert SUBSTRATES == ("zeros", "blur")
