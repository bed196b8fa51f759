"""MoXI: greedy insertion and deletion of image patches (Kasahara et al., CVPR 2025, "Identifying Important Group
of Pixels using Interactions"), and the exact Shapley values and interactions it approximates.

The players are the image patches N (|N| = n). The value of a coalition S of present patches is the softmax
probability v(S) = P(target | x_S) of the target class. The paper's reward is the log-odds log(P / (1 - P)); it is
monotone in P, so every greedy choice below is the same. A greedy step adds (removes) the one patch whose insertion
(removal) raises (lowers) v the most; v(S + i) - v(S) is i's self-context Shapley value plus its interactions with
the patches already chosen (plus higher orders), all measured by one forward pass per candidate.

Absent patches are either dropped as tokens after the patch embedding and position embedding (``mode="tokens"``,
the paper's default, ViTs only) or have their pixels set to 0 in the normalised input, i.e. the dataset's mean
colour (``mode="pixels"``, any classifier).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from ..models.model import is_vit, token_grid
from ..params import Fraction, PositiveInt
from .core import Explainer, explainer, Needs, Pass
from ..models.hooks import eval_mode

MODES = ("tokens", "pixels")

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _values(value_fn: Callable[[frozenset[int]], float], n: int) -> np.ndarray:
    """v of every coalition, indexed by its bit mask (bit i set = player i present)."""
    if not 0 < n <= 20:
        raise ValueError(f"exact Shapley values enumerate 2^n coalitions; n_players must lie in [1, 20], got {n}")
    return np.array([float(value_fn(frozenset(i for i in range(n) if m >> i & 1))) for m in range(1 << n)])


def _sizes(n: int) -> np.ndarray:
    return np.array([bin(m).count("1") for m in range(1 << n)])


def exact_shapley(value_fn: Callable[[frozenset[int]], float], n_players: int) -> np.ndarray:
    """Exact Shapley values phi_i = sum_{S in N - i} |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S)).

    Parameters
    ----------
    value_fn : v(S) for a frozenset S of player indices in [0, n_players); called once per coalition (2^n calls).
    n_players : n, at most 20.

    Returns
    -------
    float64 (n,); the values sum to v(N) - v(empty set) (efficiency).
    """
    n = n_players
    v, size = _values(value_fn, n), _sizes(n)
    masks = np.arange(1 << n)
    phi = np.zeros(n)
    for i in range(n):
        s = masks[(masks >> i & 1) == 0]
        w = np.array([math.factorial(k) * math.factorial(n - k - 1) for k in size[s]]) / math.factorial(n)
        phi[i] = (w * (v[s | 1 << i] - v[s])).sum()
    return phi


def shapley_interaction(value_fn: Callable[[frozenset[int]], float], n_players: int) -> np.ndarray:
    """Exact pairwise Shapley interaction index (Grabisch and Roubens, 1999), the interaction MoXI builds on.

    I(i, j) = sum_{S in N - {i, j}} |S|! (n - |S| - 2)! / (n - 1)! * (v(S + i + j) - v(S + i) - v(S + j) + v(S)).

    Returns
    -------
    float64 (n, n), symmetric; the diagonal holds the Shapley values (the index of a singleton).
    """
    n = n_players
    v, size = _values(value_fn, n), _sizes(n)
    masks = np.arange(1 << n)
    out = np.diag(exact_shapley(lambda s: v[sum(1 << i for i in s)], n))
    for i in range(n):
        for j in range(i + 1, n):
            s = masks[(masks >> i & 1) + (masks >> j & 1) == 0]
            w = np.array([math.factorial(k) * math.factorial(n - k - 2) for k in size[s]]) / math.factorial(n - 1)
            bi, bj = 1 << i, 1 << j
            out[i, j] = out[j, i] = (w * (v[s | bi | bj] - v[s | bi] - v[s | bj] + v[s])).sum()
    return out


def self_context_interaction(value_fn: Callable[[frozenset[int]], float], n_players: int) -> np.ndarray:
    """Self-context Shapley values and interactions: the same quantities measured from the empty context only.

    Diagonal: v({i}) - v({}); off-diagonal: v({i, j}) - v({i}) - v({j}) + v({}). The second greedy insertion step
    after choosing j maximises v({i, j}) - v({j}) = out[i, i] + out[i, j] over i. Costs 1 + n + n(n - 1)/2 calls.

    Returns
    -------
    float64 (n, n), symmetric.
    """
    n = n_players
    v0 = float(value_fn(frozenset()))
    v1 = np.array([float(value_fn(frozenset({i}))) for i in range(n)])
    out = np.diag(v1 - v0)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = float(value_fn(frozenset({i, j}))) - v1[i] - v1[j] + v0
    return out


def _token_scorer(model: nn.Module, x: torch.Tensor) -> tuple[Scorer, tuple[int, int]]:
    """Logits of images ``img`` (M,) keeping only the patch tokens where ``keep`` (M, n) is True.

    Every row of ``keep`` must hold the same number of True entries (true within a greedy step).
    """
    if not is_vit(model):
        raise TypeError(f"mode='tokens' drops ViT patch tokens; {type(model).__name__} is not a Vision Transformer. "
                        "Use mode='pixels' with patch=<size in pixels>")
    missing = [a for a in ("_pos_embed", "norm_pre", "norm", "forward_head") if not hasattr(model, a)]
    if missing:
        raise NotImplementedError(f"mode='tokens' needs a timm VisionTransformer; {type(model).__name__} has no "
                                  f"{', '.join(missing)}. Use mode='pixels'")
    emb = model._pos_embed(model.patch_embed(x))
    if not isinstance(emb, torch.Tensor):
        raise NotImplementedError(f"{type(model).__name__}._pos_embed returns more than tokens (e.g. rotary "
                                  "embeddings); mode='tokens' cannot drop its tokens. Use mode='pixels'")
    p, grid = int(model.num_prefix_tokens), token_grid(model, tuple(x.shape[-2:]))
    if emb.shape[1] != p + grid[0] * grid[1]:
        raise ValueError(f"expected {p} prefix + {grid[0] * grid[1]} patch tokens, got {emb.shape[1]} tokens")

    def score(img: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        cols = keep.nonzero()[:, 1].reshape(len(img), -1)  # row-major: each row's kept patches, ascending
        t = emb[img]
        kept = t[:, p:].gather(1, cols[..., None].expand(-1, -1, t.shape[-1]))
        t = model.norm(model.blocks(model.norm_pre(torch.cat([t[:, :p], kept], 1))))
        return model.forward_head(t)

    return score, grid


def _pixel_scorer(model: nn.Module, x: torch.Tensor, patch: int | None) -> tuple[Scorer, tuple[int, int]]:
    """Logits of images ``img`` (M,) with the pixels of the patches where ``keep`` (M, n) is False set to 0."""
    h, w = x.shape[-2:]
    if patch is None:
        if not is_vit(model):
            raise ValueError(f"mode='pixels' on {type(model).__name__} (not a ViT) needs patch=<size in pixels>")
        ph, pw = model.patch_embed.patch_size
        grid = token_grid(model, (h, w))
    else:
        if int(patch) < 1:
            raise ValueError(f"patch must be a positive number of pixels, got {patch}")
        ph = pw = int(patch)
        grid = (-(-h // ph), -(-w // pw))

    def score(img: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        m = keep.reshape(-1, *grid).to(x.dtype).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
        m = nn.functional.pad(m, (0, max(0, w - m.shape[2]), 0, max(0, h - m.shape[1])), value=1.0)
        return model(x[img] * m[:, None, :h, :w])

    return score, grid


def _check(params: dict[str, Any]) -> None:
    if int(params["batch_size"]) < 1:
        raise ValueError(f"batch_size must be >= 1, got {params['batch_size']}")
    if params["max_steps"] is not None and int(params["max_steps"]) < 1:
        raise ValueError(f"max_steps must be None (all patches) or >= 1, got {params['max_steps']}")
    if not 0.0 <= float(params["tau"]) <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {params['tau']}")


def _greedy(ps: Pass, params: dict[str, Any], insert: bool) -> torch.Tensor:
    _check(params)
    model, x, target = ps.model, ps.x, ps.target
    with eval_mode(model):
        score, grid = _token_scorer(model, x) if params["mode"] == "tokens" else \
            _pixel_scorer(model, x, params["patch"])
        b, n, bs = x.shape[0], grid[0] * grid[1], int(params["batch_size"])
        keep = torch.full((b, n), not insert, dtype=torch.bool, device=x.device)  # the present patches
        rank = torch.zeros(b, n, dtype=torch.float32, device=x.device)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        if params["stop"] and not insert:  # deletion stops at the first misclassification, maybe before any step
            active &= ps.logits.argmax(1) == target
        steps = n if params["max_steps"] is None else min(int(params["max_steps"]), n)
        for k in range(steps):
            act = active.nonzero()[:, 0]
            if len(act) == 0:
                break
            cand = (keep[act] != insert).nonzero()  # (A * (n - k), 2): (row in act, patch), row-major
            trial = keep[act][cand[:, 0]]
            trial[torch.arange(len(cand), device=x.device), cand[:, 1]] = insert
            img = act[cand[:, 0]]
            logits = torch.cat([score(img[i:i + bs], trial[i:i + bs]) for i in range(0, len(img), bs)])
            prob = logits.float().softmax(1).gather(1, target[img][:, None])[:, 0].reshape(len(act), n - k)
            best = prob.argmax(1) if insert else prob.argmin(1)
            rows = torch.arange(len(act), device=x.device) * (n - k) + best
            chosen = cand[rows, 1]
            keep[act, chosen] = insert
            rank[act, chosen] = (n - k) / n
            if params["stop"]:
                hit = logits[rows].argmax(1) == target[act]
                done = hit & (prob.flatten()[rows] >= float(params["tau"])) if insert else ~hit
                active[act[done]] = False
        return rank.reshape(b, *grid)


_DOC = """
    Score: P(target | x_S), the target's softmax probability with only the patches S present (the paper's log-odds
    reward log(P / (1 - P)) is monotone in P and makes the same choices).

    Parameters (``params``)
    -----------------------
    mode : "tokens" (default; drop patch tokens after the patch and position embedding; ViTs only) or "pixels"
        (set the patch's pixels to 0 in the normalised input, the mean colour; any classifier).
    patch : pixel-mode patch size; None (default) = the ViT's patch size and token grid; required for CNNs, whose
        grid is (ceil(H / patch), ceil(W / patch)).
    stop : True (default, the paper) stops an image at the stopping rule above; False ranks every patch.
    tau : insertion only: also require P(target) >= tau to stop (default 0.0: the paper's plain rule).
    max_steps : at most this many steps (default None: up to all n patches).
    batch_size : images per forward pass (default 64); the candidates of all active images are chunked together.

    Returns
    -------
    float32 (B, gh, gw) on the patch grid: (n - k) / n for the patch chosen at step k = 0, 1, ... (earlier = more
    important, in (0, 1]), 0 for patches never chosen. The chosen set is the map's support.

    Forward passes: step k (0-based) evaluates the n - k candidates of every image still active, so an image that
    takes s steps costs sum_{k<s} (n - k) = s n - s (s - 1) / 2 images (n (n + 1) / 2 when all n patches are
    ranked), in ceil(A (n - k) / batch_size) forward calls per step for A active images (the shared forward of
    ``explain`` not included). The B images advance in
    lockstep; an image that has stopped contributes no candidates. Ties go to the lowest patch index.
    """


def moxi_insertion(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """MoXI greedy insertion: start from no patches; each step inserts the patch that maximises P(target | x_S+i).

    Stopping rule: after a step, stop once argmax_c P(c | x_S) == target and P(target | x_S) >= tau. At least one
    patch is inserted (the empty input is never evaluated).
    """
    return _greedy(ps, params, insert=True)


def moxi_deletion(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """MoXI greedy deletion: start from all patches; each step removes the patch that minimises P(target | x_S-i).

    Stopping rule: stop once argmax_c P(c | x_S) != target. An image whose full input is not classified as the
    target stops before the first step and gets an all-zero map (with ``stop=True``).
    """
    return _greedy(ps, params, insert=False)


moxi_insertion.__doc__ = (moxi_insertion.__doc__ or "") + _DOC
moxi_deletion.__doc__ = (moxi_deletion.__doc__ or "") + _DOC


def _no_needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs()


def moxi_params(*, mode: Literal["tokens", "pixels"] = "tokens", patch: PositiveInt | None = None,
                stop: bool = True, tau: Fraction = 0.0, max_steps: PositiveInt | None = None,
                batch_size: PositiveInt = 64) -> None:
    """``mode``: drop tokens after the embedding or mask pixels; ``patch``: pixel patch size (None: the model's);
    ``stop``: stop when the class is reached/lost; ``tau``: minimum confidence; ``max_steps``; ``batch_size``."""

MOXI_EXPLAINERS: dict[str, Explainer] = {
    "moxi_insertion": explainer(moxi_insertion, _no_needs, moxi_params, vit_only=False,
                                summary="MoXI greedy patch insertion until classified as the target "
                                        "(Kasahara et al., CVPR 2025)"),
    "moxi_deletion": explainer(moxi_deletion, _no_needs, moxi_params, vit_only=False,
                               summary="MoXI greedy patch deletion until misclassified (Kasahara et al., CVPR 2025)"),
}
