"""Global Attribution Evaluation (segfromxai.quality.gae): baselines, a constructed model with a known relevant region,
contrastiveness known answers, batch-size independence, forward counts."""

import numpy as np
import pytest
import torch
from torch import nn

from segfromxai.explainers import explain_with_logits
from segfromxai.quality.gae import SCORES, contrastiveness, gae, make_mosaics

# Five colour directions: an object of colour U[j] has <colour, U[k]> = delta_jk after the ReLU.
U = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -1, 0]])


class ColourModel(nn.Module):
    """logit_k = scale * mean over pixels of relu(<x_ij, U[k]>): class k is the evidence of colour U[k]."""

    def __init__(self, scale: float = 50.0):
        super().__init__()
        self.register_buffer("u", U.clone())
        self.scale = scale

    def forward(self, x):
        return self.scale * torch.relu(torch.einsum("bchw,kc->bkhw", x, self.u)).mean((2, 3))


def colour_images(target, size=32, side=12, noise=0.1, seed=0):
    """A square of side ``side`` px and colour U[target] at a seeded place on small uniform colour noise."""
    g = torch.Generator().manual_seed(seed)
    x = noise * (2 * torch.rand(len(target), 3, size, size, generator=g) - 1)
    for b, k in enumerate(target.tolist()):
        r, c = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        x[b, :, r:r + side, c:c + side] = U[k][:, None, None]
    return x


def perfect(x, t):
    """The true evidence of the target class: relu(<x_ij, U[t]>)."""
    return torch.relu(torch.einsum("bchw,bc->bhw", x, U[t]))


def reversed_map(x, t):
    m = perfect(x, t)
    return m.amax((1, 2), keepdim=True) - m


TARGET = torch.tensor([0, 1, 2, 3, 4, 0])


def test_constant_map_scores_exactly_zero(tiny_vit):
    # A constant map never changes along the curves: d^A = 0, LC_R = -1 exactly, LC = max(0, (LC_F - 1) / 2) = 0.
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    r = gae(tiny_vit, lambda a, t: torch.full((len(a), 4, 4), 3.7), x, target)
    assert np.all(r["robustness"] == -1.0)
    assert np.all(r["similarity_curves"] == 1.0)
    assert np.all(r["local_consistency"] == 0.0) and np.all(r["gae"] == 0.0)
    assert r["mean"]["gae"] == 0.0
    np.testing.assert_allclose(r["positive_share"], 0.25, atol=1e-12)  # uniform map, equal quadrants
    np.testing.assert_allclose(r["contrastiveness"], np.maximum(r["quadrant_scores"].mean(1), 0), atol=1e-12)
    assert set(SCORES) <= set(r) and all(r[k].shape == (8,) for k in SCORES)


def test_random_map_scores_near_zero(tiny_vit):
    # A map independent of the input barely changes along the curves (|d^A| small against |d^o|), and
    # LC <= 2 |d^A|_1 / (|d^o|_1 + |d^A|_1) since LC_F <= 1; C <= 1, so this also bounds GAE per image.
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    g = torch.Generator().manual_seed(1)
    r = gae(tiny_vit, lambda a, t: torch.randn(len(a), 32, 32, generator=g), x, target)
    d_o = np.abs(r["output_curves"][:, 1, 1:] - r["output_curves"][:, 0, 1:]).sum(1)
    d_a = np.abs(r["similarity_curves"][:, 1, 1:] - r["similarity_curves"][:, 0, 1:]).sum(1)
    bound = 2 * d_a / (d_o + d_a)
    assert np.all(r["gae"] <= bound + 1e-12)
    assert np.all(r["local_consistency"] <= bound + 1e-12)
    assert abs(r["mean"]["gae"]) < 0.05


def test_perfect_map_beats_reversed_map():
    model = ColourModel().eval()
    x = colour_images(TARGET)
    good = gae(model, perfect, x, TARGET)
    bad = gae(model, reversed_map, x, TARGET)
    # The perfect map: LC_R ~ 0.95, LC_F ~ 0.2 (object pixels masked in MoRF's second step weigh more there than
    # in LeRF's sum, so part of the object has a negative combined-impact sign), C ~ 0.75 (noise in the negatives).
    assert good["mean"]["gae"] > 0.3 and bad["mean"]["gae"] < 0.05
    assert np.all(good["gae"] > bad["gae"])
    assert np.all(good["faithfulness"] > 0) and np.all(bad["faithfulness"] < 0)
    assert np.all(good["contrastiveness"] > bad["contrastiveness"])
    # MoRF removes the object first: the output falls faster than under LeRF.
    assert np.all(good["output_curves"][:, 0, 1:].sum(1) < good["output_curves"][:, 1, 1:].sum(1))


def test_contrastiveness_known_answers_on_mosaics():
    # Without noise the perfect map is 0 outside the positive quadrant: share 1, contrastiveness 1 (the maximum).
    model = ColourModel().eval()
    x = colour_images(TARGET, noise=0.0)
    r = gae(model, perfect, x, TARGET)
    np.testing.assert_allclose(r["positive_share"], 1.0, atol=1e-12)
    np.testing.assert_allclose(r["contrastiveness"], 1.0, atol=1e-12)
    # A confident model that sees none of the negatives' classes in the positive: S = -1 outside the positive.
    pos = r["quadrant_scores"][np.arange(6), r["positive_quadrant"]]
    np.testing.assert_array_equal(pos, 1.0)
    assert np.all(np.sort(r["quadrant_scores"], 1)[:, :3] < -0.99)
    # Uniform map: share 0.25, contrastiveness = max(0, mean of S) ~ 0.
    u = gae(model, lambda a, t: torch.ones(len(a), 8, 8), x, TARGET)
    np.testing.assert_allclose(u["positive_share"], 0.25, atol=1e-12)
    np.testing.assert_allclose(u["contrastiveness"], 0.0, atol=1e-12)


def test_contrastiveness_formula():
    maps = torch.zeros(3, 4, 4)
    maps[0, 2:, :2] = 1.0                     # all in quadrant 2 (bottom left), the positive
    maps[1] = 1.0                             # uniform
    maps[2, :2, 2:], maps[2, 2:, :2] = 3.0, 1.0  # 3/4 in quadrant 1 (score 0.5), 1/4 in quadrant 2
    maps[2, 0, 0] = -5.0                      # negative values do not count
    scores = np.array([[-1, -1, 1, -1], [1, 1, 1, -1], [-1, 0.5, 1, -1]])
    c, share = contrastiveness(maps, scores, np.array([2, 0, 2]))
    np.testing.assert_allclose(c, [1.0, 0.5, 0.75 * 0.5 + 0.25])
    np.testing.assert_allclose(share, [1.0, 0.25, 0.25])
    c, share = contrastiveness(torch.zeros(1, 4, 4), np.ones((1, 4)), np.array([0]))
    assert np.isnan(c).all() and np.isnan(share).all()


def test_mosaic_layout_and_size():
    quads = torch.stack([torch.full((1, 3, 9, 7), float(q)) for q in range(4)], 1)
    m = make_mosaics(quads)
    assert m.shape == (1, 3, 9, 7)
    for q, (rows, cols) in enumerate([(slice(0, 4), slice(0, 3)), (slice(0, 4), slice(3, 7)),
                                      (slice(4, 9), slice(0, 3)), (slice(4, 9), slice(3, 7))]):
        torch.testing.assert_close(m[0, :, rows, cols], torch.full_like(m[0, :, rows, cols], float(q)))


def test_batch_size_independence_and_determinism():
    model = ColourModel().eval()
    x = colour_images(TARGET)
    runs = [gae(model, perfect, x, TARGET, batch_size=n) for n in (64, 4, 1)]
    for r in runs[1:]:
        for k in (*SCORES, "output_curves", "similarity_curves", "quadrant_scores"):
            # float32 model: sums over batches of other sizes may differ in the last bits
            np.testing.assert_allclose(r[k], runs[0][k], rtol=1e-6, atol=1e-9, err_msg=k)
        np.testing.assert_array_equal(r["negative_index"], runs[0]["negative_index"])
    other = gae(model, perfect, x, TARGET, seed=5)
    assert not np.array_equal(other["positive_quadrant"], runs[0]["positive_quadrant"]) or \
        not np.array_equal(other["negative_index"], runs[0]["negative_index"])


def test_negatives_drawn_from_other_classes_and_given_negatives():
    model = ColourModel().eval()
    target = torch.tensor([0, 0, 1, 1])
    x = colour_images(target)
    r = gae(model, perfect, x, target, steps=3)
    t = target.numpy()
    assert np.all(t[r["negative_index"]] != t[:, None])  # fewer than 3 candidates: drawn with replacement
    same = gae(model, perfect, x, torch.zeros(4, dtype=torch.long), steps=3)
    assert np.isnan(same["contrastiveness"]).all() and np.isnan(same["gae"]).all()
    assert np.isfinite(same["local_consistency"]).all()
    negs = colour_images(torch.tensor([2, 3, 4] * 4), noise=0.0, seed=1).view(4, 3, 3, 32, 32)
    given = gae(model, perfect, colour_images(target, noise=0.0), target, steps=3, negatives=negs)
    assert np.all(given["negative_index"] == -1)
    np.testing.assert_allclose(given["contrastiveness"], 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="negatives"):
        gae(model, perfect, x, target, negatives=negs[:, :2])
    with pytest.raises(ValueError, match="steps"):
        gae(model, perfect, x, target, steps=1)


def test_registered_explainer_and_forward_count(tiny_vit):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3])
    fn = lambda a, t: explain_with_logits(tiny_vit, a, {"gradcam": {}}, t)[0]["gradcam"]  # noqa: E731
    r = gae(tiny_vit, fn, x, target, steps=4, batch_size=8)
    assert all(np.isfinite(r[k]).all() and ((r[k] >= 0) & (r[k] <= 1)).all() for k in ("gae", "contrastiveness"))
    # Masking: B at state 0 + 2 (T - 1) B; explain_fn: one forward per map (intact, mosaic, 2 (T - 1) states).
    assert r["forward_images"] == 4 * (1 + 2 * 3) + 4 * (2 + 2 * 3)
    assert not any(p.grad is not None for p in tiny_vit.parameters())


def test_precomputed_maps_of_the_intact_images_give_the_same_scores_with_fewer_forwards(tiny_vit):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 1, 2, 3])
    fn = lambda a, t: explain_with_logits(tiny_vit, a, {"gradcam": {}}, t)[0]["gradcam"]  # noqa: E731
    full = gae(tiny_vit, fn, x, target, steps=4, batch_size=8)
    given = gae(tiny_vit, fn, x, target, steps=4, batch_size=8, maps=fn(x, target))
    for k in (*SCORES, "output_curves", "similarity_curves", "quadrant_scores"):
        np.testing.assert_allclose(given[k], full[k], rtol=1e-6, atol=1e-9, err_msg=k)
    assert full["forward_images"] - given["forward_images"] == 4  # the intact images are not explained again
    with pytest.raises(ValueError, match="maps hold 3 images"):
        gae(tiny_vit, fn, x, target, steps=4, maps=fn(x, target)[:3])
