"""Perturbation on Feature Coalition (Hu et al. 2024): clustering on known features, the losses against plain loops,
the perturbation on a model with a known answer, and the explainer through ``explain_with_logits``."""

import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

from segfromxai.models.hooks import count_forwards
from segfromxai.explainers.coalition import (
    coalition_consistency,
    coalition_perturbation,
    confidence_loss,
    feature_coalitions,
    gaussian_blur,
)
from segfromxai.explainers import explain_with_logits

FAST = {"steps": 4, "cluster_steps": 10, "max_clusters": 8}


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=5).eval()


class TinyVGG(nn.Module):
    """conv-relu-pool twice, then global average pooling and a linear head: VGG in miniature, no feature_info."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Energy(nn.Module):
    """Squared Laplacian of the red (channel 0) and green (channel 1) planes: local texture energy per pixel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0], self.conv.weight[1, 1] = lap, lap

    def forward(self, x):
        return self.conv(x) ** 2


class LeftTexture(nn.Module):
    """Class 0 scores the red texture energy of the left half (5 when intact, -5 when gone); class 1 is a constant 0.
    The right half never reaches the logits, so the only perturbation that must be avoided is on the left."""

    def __init__(self):
        super().__init__()
        self.energy = Energy()

    def forward(self, x):
        e = self.energy(x)
        z0 = 10 * e[:, 0, :, : x.shape[-1] // 2].mean((1, 2)) / 16 - 5
        return torch.stack([z0, torch.zeros_like(z0)], 1)


def texture_image():
    """Red checkerboard on the left half, green checkerboard on the right: two regions, only the left one matters."""
    i = torch.arange(32)
    board = ((i[:, None] + i[None]) % 2).float() - 0.5
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, :, :16] = board[:, :16]
    x[0, 1, :, 16:] = board[:, 16:]
    return x


def halves(seed, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(16, 1, 1, generator=g), torch.randn(16, 1, 1, generator=g)
    left = torch.arange(8) < 4
    return torch.where(left, a, b).expand(16, 8, 8)[None] + noise * torch.randn(1, 16, 8, 8, generator=g)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("seed", range(3))
def test_clustering_splits_two_halves(seed):
    labels, history = feature_coalitions(halves(seed), min_clusters=2, steps=200, seed=seed)
    lab = labels[0]
    assert (lab[:, :4] == lab[0, 0]).all() and (lab[:, 4:] == lab[0, 7]).all() and lab[0, 0] != lab[0, 7]
    assert sorted(lab.unique().tolist()) == [0, 1] and len(history) <= 201


def test_clustering_keeps_at_least_k_and_is_seeded():
    f = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    labels, history = feature_coalitions(f, max_clusters=20, min_clusters=4, steps=60, seed=1)
    again, _ = feature_coalitions(f, max_clusters=20, min_clusters=4, steps=60, seed=1)
    assert torch.equal(labels, again) and labels.dtype == torch.long and labels.shape == (2, 6, 6)
    for lab in labels:
        assert 4 <= len(lab.unique()) <= 20 and lab.max() == len(lab.unique()) - 1
    assert history[-1] < history[0]
    with pytest.raises(ValueError, match="min_clusters"):
        feature_coalitions(f, max_clusters=2, min_clusters=3)


def test_consistency_loss_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 5, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5, 6), generator=g)
    sigma = 0.8
    r = int(np.ceil(2 * sigma))
    want = []
    for b in range(2):
        num = den = 0.0
        for i in range(5):
            for j in range(6):
                for u in range(max(0, i - r), min(5, i + r + 1)):
                    for v in range(max(0, j - r), min(6, j + r + 1)):
                        if labels[b, i, j] == labels[b, u, v] and abs(u - i) <= r and abs(v - j) <= r:
                            w = np.exp(-((u - i) ** 2 + (v - j) ** 2) / (2 * sigma**2))
                            num += w * (p[b, i, j].item() - p[b, u, v].item()) ** 2
                            den += w
        want.append(num / den)
    np.testing.assert_allclose(coalition_consistency(p, labels, sigma).numpy(), want, rtol=1e-12)
    constant = labels.to(torch.float64) / 3  # one value per coalition: nothing to push together
    assert coalition_consistency(constant, labels, 1.0).abs().max() == 0


def test_blur_matches_a_plain_weighted_average():
    x = torch.rand(1, 2, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = 1.7
    want = np.zeros((1, 2, 7, 5))
    for i in range(7):
        for j in range(5):
            w = np.array([[np.exp(-((u - i) ** 2 + (v - j) ** 2) / (2 * s**2)) for v in range(5)] for u in range(7)])
            want[0, :, i, j] = (x[0].numpy() * w).sum((1, 2)) / w.sum()
    np.testing.assert_allclose(gaussian_blur(x, s).numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="blur_sigma"):
        gaussian_blur(x, 0.0)


def test_confidence_loss_is_zero_exactly_while_the_target_is_top1():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    t = torch.tensor([0, 0])
    np.testing.assert_allclose(confidence_loss(logits, t).numpy(), [0.0, (0 + 2 + 1) / 3])


def test_perturbation_lowers_its_loss_and_keeps_the_class_on_the_region_that_matters():
    model, x = LeftTexture().eval(), texture_image()
    target = model(x).argmax(1)
    assert target.item() == 0
    with torch.no_grad():
        labels, _ = feature_coalitions(model.energy(x), min_clusters=2, steps=100)
    p, history = coalition_perturbation(model, x, target, labels, steps=150, lr=0.1, substrate="blur", blur_sigma=2.0)
    assert history.shape == (151,) and history[-1] < history[0]
    blurred = gaussian_blur(x, 2.0)
    with torch.no_grad():
        kept = model(x + (blurred - x) * p[:, None])
    assert kept.argmax(1).item() == 0
    sal = 1 - p[0]
    assert sal[:, 1:15].mean() > 0.5 > 0.1 > sal[:, 17:31].mean()  # the left half stays, the right half goes


def _run(model, x, **params):
    return explain_with_logits(model, x, {"coalition": {**FAST, **params}})[0]["coalition"]


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_explainer_shapes_determinism_and_a_clean_model(kind):
    model = tiny_vit() if kind == "vit" else TinyVGG().eval()
    layer = None if kind == "vit" else "features.4"
    grid = (4, 4) if kind == "vit" else (16, 16)  # features.4: the second ReLU, before the last pool
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    next(model.parameters()).requires_grad_(False)
    model.train()
    flags = [t.requires_grad for t in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    hooks = hook_count(model)
    pixel = _run(model, x, layer=layer)
    feature = _run(model, x, layer=layer, grid="feature")
    assert pixel.shape == (2, 32, 32) and feature.shape == (2, *grid)
    for m in (pixel, feature):
        assert m.dtype == torch.float32 and torch.isfinite(m).all() and (m >= 0).all() and (m <= 1).all()
    assert torch.equal(pixel, _run(model, x, layer=layer))
    assert not torch.equal(pixel, _run(model, x, layer=layer, seed=1, steps=6))
    assert hook_count(model) == hooks and model.training
    assert [t.requires_grad for t in model.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(t.grad is None for t in model.parameters())


def test_forward_passes_are_steps_plus_one_after_the_shared_pass():
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with count_forwards(model) as n:
        _run(model, x, steps=5)
    assert (n.calls, n.images) == (1 + 6, 3 * 7)


def test_a_batch_gives_the_maps_of_single_calls():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    both = _run(model, x)
    singles = torch.cat([_run(model, x[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(both, singles, atol=1e-5, rtol=0)


def test_errors_name_the_choices_and_leave_no_hook():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="'pixel', 'feature'"):
        _run(model, x, grid="token")
    with pytest.raises(ValueError, match="no module named"):
        _run(model, x, layer="blocks.9.norm1")
    with pytest.raises(ValueError, match="cannot choose a Grad-CAM layer"):
        _run(TinyVGG().eval(), x)
    with pytest.raises(ValueError, match="'blur', 'zeros', 'noise'"):
        _run(model, x, substrate="mean")
    with pytest.raises(ValueError, match="init"):
        _run(model, x, init=1.0)
    assert hook_count(model) == 0
