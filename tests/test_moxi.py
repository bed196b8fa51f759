"""MoXI greedy insertion/deletion against a slow brute-force search, exact Shapley values and interactions against
hand-computed games, and forward-pass counts against the documented formula."""

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from segfromxai.models.hooks import count_forwards
from segfromxai.explainers import explain_with_logits
from segfromxai.explainers.moxi import exact_shapley, self_context_interaction, shapley_interaction

METHODS = ("moxi_insertion", "moxi_deletion")


def _vit(img_size, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, depth=1,
                          num_classes=3).eval()
    with torch.no_grad():
        m.head.weight.mul_(3.0)  # decisive, varied class scores on a random model
    return m


class PatchLinear(nn.Module):
    """A CNN-like model whose logits are a linear function of the mean colour of each 8 px patch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(3 * 4, 3)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1)) * 5.0


@pytest.fixture(scope="module")
def vit4():
    return _vit(16)  # 2 x 2 patch grid


@pytest.fixture(scope="module")
def vit9():
    return _vit(24)  # 3 x 3 patch grid


def _x(b, size, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ slow references
def _logits_kept(model, x1, kept, mode, patch=8):
    """Logits (C,) of one image (1, 3, H, W) with only the patches ``kept`` present, one forward per call.

    Tokens: an additive attention mask hides the dropped tokens from every query (equivalent to dropping them, since
    LayerNorm and MLP act per token). Pixels: the dropped patches' pixels are set to 0 by slicing.
    """
    gw = x1.shape[-1] // patch
    n = (x1.shape[-2] // patch) * gw
    with torch.no_grad():
        if mode == "tokens":
            p = model.num_prefix_tokens
            bias = torch.zeros(1, 1, p + n, p + n)
            for j in set(range(n)) - set(kept):
                bias[..., p + j] = float("-inf")
            return model(x1, attn_mask=bias)[0]
        xm = x1.clone()
        for j in set(range(n)) - set(kept):
            r, c = divmod(j, gw)
            xm[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0.0
        return model(xm)[0]


def _brute_greedy(logit_fn, n, target, insert, stop=True, tau=0.0, max_steps=None):
    """The greedy MoXI order by exhaustive search over the remaining patches, one candidate at a time."""
    present = set() if insert else set(range(n))
    order = []
    if stop and not insert and logit_fn(sorted(present)).argmax().item() != target:
        return order
    for _ in range(max_steps or n):
        best = None
        for i in sorted(set(range(n)) - present if insert else present):
            logits = logit_fn(sorted(present | {i} if insert else present - {i}))
            p = logits.softmax(0)[target].item()
            if best is None or (p > best[1] if insert else p < best[1]):
                best = (i, p, logits.argmax().item())
        i, p, top = best
        present = present | {i} if insert else present - {i}
        order.append(i)
        if stop and ((top == target and p >= tau) if insert else top != target):
            break
    return order


def _mixed_targets(model, x):
    """The top-1 class, except for image 1 (a class it is not classified as): deletion stops at once there."""
    with torch.no_grad():
        t = model(x).argmax(1)
    t[1] = (t[1] + 1) % 3
    return t


def _order_map(order, n):
    m = torch.zeros(n)
    for k, i in enumerate(order):
        m[i] = (n - k) / n
    return m


# ------------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("mode", ["tokens", "pixels"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stop,tau", [(True, 0.0), (True, 0.6), (False, 0.0)])
def test_greedy_matches_brute_force(vit4, mode, method, stop, tau):
    x = _x(3, 16)
    target = _mixed_targets(vit4, x)
    params = {"mode": mode, "stop": stop, "tau": tau, "batch_size": 5}
    got, _ = explain_with_logits(vit4, x, {method: params}, target)
    for b in range(3):
        order = _brute_greedy(lambda kept: _logits_kept(vit4, x[b:b + 1], kept, mode), 4, int(target[b]),
                              method == "moxi_insertion", stop, tau)
        assert torch.equal(got[method][b].flatten(), _order_map(order, 4)), (b, order)


def test_greedy_matches_brute_force_cnn_pixels():
    model, x, target = PatchLinear().eval(), _x(3, 16, seed=2), torch.tensor([2, 0, 1])
    for method in METHODS:
        got, _ = explain_with_logits(model, x, {method: {"mode": "pixels", "patch": 8, "stop": False}}, target)
        for b in range(3):
            order = _brute_greedy(lambda kept: _logits_kept(model, x[b:b + 1], kept, "pixels"), 4, int(target[b]),
                                  method == "moxi_insertion", stop=False)
            assert torch.equal(got[method][b].flatten(), _order_map(order, 4))


def test_token_dropping_reads_prefix_tokens_from_the_model():
    """Two register tokens besides the class token (4 prefix tokens in all): still the brute-force order."""
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                              num_classes=3, reg_tokens=3).eval()
    x = _x(2, 16, seed=6)
    got, logits = explain_with_logits(model, x, {"moxi_deletion": {"stop": False}})
    for b in range(2):
        order = _brute_greedy(lambda kept: _logits_kept(model, x[b:b + 1], kept, "tokens"), 4,
                              int(logits[b].argmax()), insert=False, stop=False)
        assert torch.equal(got["moxi_deletion"][b].flatten(), _order_map(order, 4))


def test_first_two_insertion_steps_follow_self_context_interactions(vit4):
    """Step 1 maximises v({i}) - v({}); step 2, after j, maximises v({i}) - v({}) + I_self(i, j) (paper's maths)."""
    x, t = _x(1, 16, seed=5), 1
    value = lambda s: _logits_kept(vit4, x, sorted(s), "tokens").softmax(0)[t].item()  # noqa: E731
    inter = self_context_interaction(value, 4)
    got, _ = explain_with_logits(vit4, x, {"moxi_insertion": {"stop": False, "max_steps": 2}}, t)
    order = torch.argsort(-got["moxi_insertion"].flatten())[:2].tolist()
    j = int(np.argmax(np.diag(inter)))
    assert order[0] == j
    gain = np.diag(inter) + inter[:, j]
    gain[j] = -np.inf
    assert order[1] == int(np.argmax(gain))


# ------------------------------------------------------------------------------------- Shapley and interactions
GAME = {(): 0.0, (0,): 1.0, (1,): 2.0, (2,): 0.0, (0, 1): 4.0, (0, 2): 1.0, (1, 2): 3.0, (0, 1, 2): 6.0}


def _game(s):
    return GAME[tuple(sorted(s))]


def test_exact_shapley_three_players_by_hand():
    # phi_0 = 1/3 * 1 + 1/6 * (4 - 2) + 1/6 * (1 - 0) + 1/3 * (6 - 3) = 11/6, and so on
    phi = exact_shapley(_game, 3)
    assert np.allclose(phi, [11 / 6, 20 / 6, 5 / 6])
    assert math.isclose(phi.sum(), GAME[(0, 1, 2)] - GAME[()])


def test_exact_shapley_efficiency_and_symmetry_on_random_games():
    rng = np.random.default_rng(0)
    table = {m: rng.normal() for m in range(1 << 5)}
    phi = exact_shapley(lambda s: table[sum(1 << i for i in s)], 5)
    assert math.isclose(phi.sum(), table[31] - table[0])
    by_size = rng.normal(size=6)  # v depends on |S| only: every player is alike
    assert np.allclose(exact_shapley(lambda s: by_size[len(s)], 5), (by_size[5] - by_size[0]) / 5)
    with pytest.raises(ValueError, match="n_players"):
        exact_shapley(_game, 0)


def test_interactions_by_hand():
    inter = shapley_interaction(_game, 3)
    # I(0, 1) = 1/2 * (4 - 1 - 2 + 0) + 1/2 * (6 - 1 - 3 + 0) = 1.5
    assert math.isclose(inter[0, 1], 1.5) and math.isclose(inter[1, 0], 1.5)
    assert np.allclose(np.diag(inter), exact_shapley(_game, 3))
    both = shapley_interaction(lambda s: float({0, 1} <= set(s)), 3)  # unanimity game of {0, 1}
    assert np.allclose(both, [[0.5, 1, 0], [1, 0.5, 0], [0, 0, 0]])
    additive = shapley_interaction(lambda s: sum([1.0, 2.0, 5.0][i] for i in s), 3)
    assert np.allclose(additive, np.diag([1.0, 2.0, 5.0]))
    selfc = self_context_interaction(_game, 3)
    assert np.allclose(selfc, [[1, 1, 0], [1, 2, 1], [0, 1, 0]])


# ------------------------------------------------------------------------------------------- forward counts
@pytest.mark.parametrize("mode", ["tokens", "pixels"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stop", [True, False])
def test_forward_count_matches_docstring(vit9, mode, method, stop):
    x, n, bs = _x(3, 24, seed=4), 9, 7
    target = _mixed_targets(vit9, x)
    with count_forwards(vit9) as count:
        got, _ = explain_with_logits(vit9, x, {method: {"mode": mode, "stop": stop, "batch_size": bs}}, target)
    steps = (got[method].flatten(1) > 0).sum(1).tolist()
    if not stop:
        assert steps == [n] * 3
    images = 3 + sum(s * n - s * (s - 1) // 2 for s in steps)  # + 3: the shared forward of explain_with_logits
    calls = 1 + sum(math.ceil(sum(s > k for s in steps) * (n - k) / bs) for k in range(max(steps)))
    assert (count.images, count.calls) == (images, calls)


# --------------------------------------------------------------------------------------- registered explainers
@pytest.mark.parametrize("mode", ["tokens", "pixels"])
@pytest.mark.parametrize("method", METHODS)
def test_registered_batch_equals_singles_and_leaves_no_hooks(vit9, mode, method):
    x, params = _x(3, 24, seed=4), {"mode": mode, "stop": False, "batch_size": 10}
    vit9.train()
    got, _ = explain_with_logits(vit9, x, {method: params})
    assert vit9.training
    vit9.eval()
    m = got[method]
    assert m.shape == (3, 3, 3) and m.dtype == torch.float32 and torch.isfinite(m).all() and (m >= 0).all()
    assert torch.equal(torch.sort(m.flatten(1), 1).values, torch.arange(1, 10).float().expand(3, 9) / 9)
    for b in range(3):
        one, _ = explain_with_logits(vit9, x[b:b + 1], {method: params})
        assert torch.equal(one[method][0], m[b])
    with pytest.raises(ValueError, match="batch_size"):
        explain_with_logits(vit9, x, {method: {"batch_size": 0}})
    for mod in vit9.modules():
        assert not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks), type(mod).__name__


def test_cnn_needs_pixels_and_a_patch_size():
    model, x = PatchLinear().eval(), _x(2, 16)
    with pytest.raises(TypeError, match="mode='pixels'"):
        explain_with_logits(model, x, "moxi_insertion")
    with pytest.raises(ValueError, match="patch="):
        explain_with_logits(model, x, {"moxi_deletion": {"mode": "pixels"}})
    with pytest.raises(ValueError, match="not one of"):
        explain_with_logits(model, x, {"moxi_deletion": {"mode": "pixel"}})
    with count_forwards(model) as count:
        got, _ = explain_with_logits(model, _x(2, 20), {"moxi_insertion": {"mode": "pixels", "patch": 8,
                                                                           "stop": False}})
    assert got["moxi_insertion"].shape == (2, 3, 3)  # ceil(20 / 8) = 3 patches per side
    assert count.images == 2 + 2 * 9 * 10 // 2
