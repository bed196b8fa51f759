"""R-Cut (Niu et al. 2023): the Cut against scipy's generalized eigensolver, R-Out against a one-forward-per-channel
loop, forward-pass counts, and the three weight variants through ``explain_with_logits``."""

import numpy as np
import pytest
import scipy.linalg
import torch

from segfromxai.models.hooks import capture, count_forwards
from segfromxai.explainers import explain_with_logits
from segfromxai.explainers.rcut import cut_map, rout_weights, topk_channels
from segfromxai.ops.resize import resize_bilinear

LAYER = "blocks.1"  # the default for the 2-block tiny ViT (scorecam, topk)
GRAD_LAYER = "blocks.1.norm1"  # the default for weights="gradient"


@pytest.fixture
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _shared(model, x, layer=LAYER):
    with torch.no_grad(), capture(model, layers=(layer,)) as got:
        logits = model(x)
    return got.outputs[layer][:, model.num_prefix_tokens:], logits.argmax(1)


def _ref_fiedler(f, grid, *, tau, eps, position_weight, position_sigma):
    """Plain numpy graph and scipy's eigh(D - W, D): the second smallest eigenvector and D."""
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    gh, gw = grid
    pos = np.array([(r, c) for r in range(gh) for c in range(gw)], dtype=np.float64) / np.hypot(gh, gw)
    d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    s = f @ f.T + position_weight * np.exp(-d2 / (2 * position_sigma**2))
    w = np.where(s > tau, 1.0, eps)
    d = np.diag(w.sum(1))
    vals, vecs = scipy.linalg.eigh(d - w, d)
    assert vals[2] - vals[1] > 1e-6  # a unique second eigenvector
    return vecs[:, 1], d


def _ref_map(f, sal, grid, output, **graph):
    """The documented sign and output rules applied to scipy's eigenvector."""
    y, _ = _ref_fiedler(f, grid, **graph)
    hi = y > y.mean()
    fg_hi = sal[hi].sum() > sal[~hi].sum() or (sal[hi].sum() == sal[~hi].sum() and hi.sum() <= (~hi).sum())
    o = y if fg_hi else -y
    return (o - o.min() if output == "shift" else np.maximum(o - o.mean(), 0)).reshape(grid)


def _clusters(grid, seed):
    """Tokens of two noisy clusters (a blob and the rest) and a saliency on the blob."""
    rng = np.random.default_rng(seed)
    gh, gw = grid
    blob = np.zeros(grid, dtype=bool)
    blob[1:gh // 2 + 1, 1:gw // 2 + 1] = True
    f = np.where(blob.ravel()[:, None], rng.normal(size=8), rng.normal(size=8)) + 0.5 * rng.normal(size=(gh * gw, 8))
    return f, blob.ravel() + 0.1 * rng.random(gh * gw)


GRAPH = {"tau": 0.6, "eps": 1e-5, "position_weight": 0.5, "position_sigma": 0.3}


@pytest.mark.parametrize("grid", [(4, 4), (6, 5)])
@pytest.mark.parametrize("solver", ["lanczos", "dense"])
def test_cut_is_scipy_second_eigenvector(grid, solver):
    f, sal = _clusters(grid, seed=grid[1])
    y_ref, d = _ref_fiedler(f, grid, **GRAPH)
    m = cut_map(f, sal, grid, solver=solver, output="shift", **GRAPH).ravel()
    # up to sign and shift: the centred map is +-y_ref, and |cosine| in the D-inner product is 1
    y = m - (m @ d).sum() / np.trace(d)  # remove the D-mean, as y_ref is D-orthogonal to 1
    cos = (y @ d @ y_ref) / np.sqrt((y @ d @ y) * (y_ref @ d @ y_ref))
    assert abs(cos) == pytest.approx(1.0, abs=1e-9)
    for output in ("shift", "clip"):
        np.testing.assert_allclose(cut_map(f, sal, grid, solver=solver, output=output, **GRAPH),
                                   _ref_map(f, sal, grid, output, **GRAPH), atol=1e-9)


def test_cut_sign_follows_saliency():
    grid = (4, 4)
    f, sal = _clusters(grid, seed=0)
    m = cut_map(f, sal, grid, output="clip", **GRAPH).ravel()
    m_flipped = cut_map(f, sal.max() - sal, grid, output="clip", **GRAPH).ravel()
    blob = sal > 0.5
    assert m[blob].min() > 0 and m[~blob].max() == 0  # the salient blob is the positive side
    assert m_flipped[blob].max() == 0 and m_flipped[~blob].min() > 0


def test_cut_without_a_cut_returns_saliency():
    f, sal = _clusters((4, 4), seed=0)
    np.testing.assert_array_equal(cut_map(f, sal, (4, 4), tau=-10.0), sal.reshape(4, 4))  # every pair joined
    with pytest.raises(ValueError, match="eps"):
        cut_map(f, sal, (4, 4), eps=1.0)


def _loop_weights(model, x, tokens, target, score):
    """One channel, one image, one forward at a time; masks resized by the float64 bilinear reference."""
    def s(logits, t):
        return (logits.softmax(-1) if score == "softmax" else logits)[0, t].item()

    with torch.no_grad():
        base = model(torch.zeros_like(x[:1]))
        out = np.zeros(tokens.shape[0::2])
        for b in range(x.shape[0]):
            for c in range(tokens.shape[2]):
                a = tokens[b, :, c].double().numpy().reshape(4, 4)
                a = (a - a.min()) / (a.max() - a.min())
                m = torch.from_numpy(resize_bilinear(a, (32, 32))).float()
                out[b, c] = s(model(x[b:b + 1] * m), target[b]) - s(base, target[b])
    return out


@pytest.mark.parametrize("score", ["softmax", "logit"])
def test_rout_weights_equal_loop(tiny_vit, x, score):
    x = x[:2]
    tokens, target = _shared(tiny_vit, x)
    w = rout_weights(tiny_vit, x, tokens, target, (4, 4), score=score, batch_size=7)  # chunks cross images
    ref = _loop_weights(tiny_vit, x, tokens, target, score)
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-5 if score == "softmax" else 1e-4, rtol=1e-4)
    top = tokens.mean(1).topk(5, dim=1).indices
    wk = rout_weights(tiny_vit, x, tokens, target, (4, 4), score=score, channels=top).numpy()
    keep = np.zeros_like(wk, dtype=bool)
    np.put_along_axis(keep, top.numpy(), True, axis=1)
    np.testing.assert_allclose(wk[keep], ref[keep], atol=1e-5 if score == "softmax" else 1e-4, rtol=1e-4)
    assert (wk[~keep] == 0).all()


def test_topk_channels_vary_most_over_the_patches_not_the_largest_mean():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 16, 6, generator=g) * torch.tensor([0.1, 3.0, 0.5, 2.0, 1.0, 0.2])
    tokens[:, :, 0] += 100.0  # a "massive activation": huge mean, nearly constant over the patches
    tokens[1, :, 5] *= 50.0  # image 1: channel 5 varies most
    top = topk_channels(tokens, 2)
    ref = [sorted(range(6), key=lambda c: -float(tokens[b, :, c].std()))[:2] for b in range(2)]
    assert [sorted(t.tolist()) for t in top] == [sorted(r) for r in ref]
    assert sorted(top[0].tolist()) == [1, 3] and 5 in top[1].tolist() and 0 not in top.flatten().tolist()
    assert topk_channels(tokens, 99).shape == (2, 6)


def test_gradient_variant_known_answer(tiny_vit, x):
    """The whole pipeline for weights="gradient": tokens and gradients by hand, graph and eigenvector by scipy."""
    graph = {"tau": 0.2, "eps": 1e-5, "position_weight": 1.0, "position_sigma": 0.1}
    with capture(tiny_vit, layers=(GRAD_LAYER,)) as got:
        logits = tiny_vit(x)
        t = logits.argmax(1)
        a = got.outputs[GRAD_LAYER]
        g = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)[0]
    tok, w = a[:, 1:].detach().double(), g[:, 1:].double().mean(1)
    assert (w.abs().amax(1) > 0).all()  # the default layer's patch tokens reach the logits
    maps, _ = explain_with_logits(tiny_vit, x, {"rcut": {"weights": "gradient", **graph}})
    for b in range(x.shape[0]):
        f = (tok[b] * w[b]).numpy()
        ref = _ref_map(f, np.maximum(f.sum(1), 0), (4, 4), "shift", **graph)
        np.testing.assert_allclose(maps["rcut"][b].numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weights, extra", [("scorecam", lambda b, c: b * c + 1), ("topk", lambda b, c: b * 10 + 1),
                                            ("gradient", lambda b, c: 0)])
def test_forward_count_matches_docstring(tiny_vit, x, weights, extra):
    with count_forwards(tiny_vit) as n:
        explain_with_logits(tiny_vit, x, {"rcut": {"weights": weights, "k": 10, "batch_size": 50}})
    assert n.images - x.shape[0] == extra(x.shape[0], tiny_vit.embed_dim)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("weights", ["scorecam", "topk", "gradient"])
def test_variants_through_explain(tiny_vit, x, weights):
    params = {"rcut": {"weights": weights, "k": 16, "tau": 0.2}}
    maps, _ = explain_with_logits(tiny_vit, x, params)
    m = maps["rcut"]
    assert m.shape == (3, 4, 4) and m.dtype == torch.float32
    assert torch.isfinite(m).all() and (m >= 0).all() and (m > 0).any()
    single = torch.cat([explain_with_logits(tiny_vit, x[i:i + 1], params)[0]["rcut"]
                        for i in range(3)])
    torch.testing.assert_close(m, single, rtol=1e-3, atol=1e-5)
    assert _hooks(tiny_vit) == 0 and not tiny_vit.training


def test_no_hooks_left_and_mode_restored_after_errors(tiny_vit, x):
    tiny_vit.train()
    try:
        for params in ({"layer": "blocks.9"}, {"weights": "topk", "k": 0}, {"layer": "patch_embed.proj"}):
            with pytest.raises(ValueError):
                explain_with_logits(tiny_vit, x, {"rcut": params})
            assert _hooks(tiny_vit) == 0 and tiny_vit.training
        explain_with_logits(tiny_vit, x[:1], {"rcut": {"weights": "topk", "k": 4}})
        assert _hooks(tiny_vit) == 0 and tiny_vit.training
    finally:
        tiny_vit.eval()
    with pytest.raises(ValueError, match="scorecam"):
        explain_with_logits(tiny_vit, x, {"rcut": {"weights": "nope"}})
