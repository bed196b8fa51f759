"""R-Cut: Relationship Weighted Out and Cut (Niu et al. 2023, arXiv 2307.09050; Sensors 24(9) 2695, 2024).

Two stages on the patch tokens ``A`` (B, P, C) of one ViT layer, captured in the shared forward pass:

1. **Relationship Weighted Out** (R-Out): a class-aware weight ``w_c`` per channel; the class-aware tokens are
   ``A * w`` (channel-wise) and the R-Out saliency is ``relu(sum_c w_c A_pc)`` per patch.
2. **Cut**: a normalized cut of the graph over the class-aware tokens (cosine similarity plus a positional term,
   binarised at ``tau``), solved by :mod:`segfromxai.stages.refine`; the oriented second eigenvector is the map.

Forward passes beyond the shared one (counted in images through the ViT): ``weights="scorecam"``: ``B * C + 1``;
``"topk"``: ``B * min(k, C) + 1``; ``"gradient"``: 0. The ``+ 1`` is the baseline input (all zeros after
normalisation), the same for every image, so one image per call.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import nn

from ..ops.graphcut import Solver, affinity, fiedler, foreground_is_high, grid_positions, has_cut
from ..params import NonNegative, Positive, PositiveInt, Range
from ..ops.resize import upsample_maps
from .core import Explainer, explainer, Needs, Pass
from ..models.hooks import eval_mode

WEIGHTS = ("scorecam", "topk", "gradient")
SCORES = ("softmax", "logit")
SOLVERS = ("lanczos", "dense")
OUTPUTS = ("shift", "clip")


def default_layer(model: nn.Module, weights: str = "scorecam") -> str:
    """The layer R-Cut reads by default.

    ``"scorecam"``/``"topk"``: the last block's output ``blocks.{L-1}`` (the last layer's patch tokens, before the
    final norm). ``"gradient"``: the last block's first LayerNorm ``blocks.{L-1}.norm1`` (Grad-CAM's default here):
    with class-token pooling the patch tokens of the last block's output never reach the logits, so their gradient
    is exactly 0 and would weight every channel by 0.
    """
    last = f"blocks.{len(model.blocks) - 1}"
    return f"{last}.norm1" if weights == "gradient" else last


def _layer(model: nn.Module, params: dict[str, Any]) -> str:
    return params["layer"] or default_layer(model, params["weights"])


def _score(logits: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    out = logits.softmax(-1) if score == "softmax" else logits
    return out.gather(1, target[:, None])[:, 0]


def rout_weights(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor,
                 grid: tuple[int, int], *, score: str = "softmax", channels: torch.Tensor | None = None,
                 batch_size: int = 64) -> torch.Tensor:
    """R-Out channel weights by perturbation (Score-CAM's "increase of confidence", Wang et al., CVPRW 2020).

    For image ``b`` and channel ``c`` the token map ``A[b, :, c]`` (gh, gw) is min-max normalised to [0, 1] (a
    constant map gives the all-zero mask), upsampled bilinearly to the input size (``align_corners=False``) into
    ``M``, and ``x[b] * M`` (in the preprocessed, normalised space, so a mask of 0 gives the baseline) goes through
    the model. The weight is ``s(x[b] * M) - s(0)``, with ``s`` the target class's softmax probability
    (``score="softmax"``) or logit (``"logit"``), and ``0`` the all-zero (dataset-mean) input.

    Parameters
    ----------
    model : the ViT (run here in eval mode, restored afterwards; call under ``torch.no_grad()``).
    x : (B, 3, H, W) preprocessed batch.
    tokens : (B, P, C) patch tokens (prefix tokens removed), P = gh * gw in raster order.
    target : (B,) int64 class per image.
    grid : (gh, gw).
    score : {"softmax", "logit"}
    channels : (B, k) int64, optional
        The channels to weight per image; the others get 0. Default: all C.
    batch_size : perturbed images per forward pass.

    Returns
    -------
    Tensor, float32, shape (B, C); ``B * (k or C) + 1`` images go through the model.
    """
    b, _, c = tokens.shape
    if channels is None:
        channels = torch.arange(c, device=tokens.device).repeat(b, 1)
    k = channels.shape[1]
    img = torch.arange(b, device=tokens.device).repeat_interleave(k)
    chan = channels.reshape(-1)
    maps = tokens.transpose(1, 2)  # (B, C, P)
    out = torch.empty(b * k, device=x.device, dtype=torch.float32)
    with torch.no_grad(), eval_mode(model):
        base = _score(model(torch.zeros_like(x[:1])).expand(b, -1), target, score).float()
        for s in range(0, b * k, batch_size):
            i, ch = img[s:s + batch_size], chan[s:s + batch_size]
            m = maps[i, ch].float()
            lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
            m = torch.where(hi > lo, (m - lo) / (hi - lo).clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(m))
            m = upsample_maps(m.reshape(-1, *grid), tuple(x.shape[-2:]))[:, None]
            out[s:s + batch_size] = _score(model(x[i] * m.to(x.dtype)), target[i], score).float() - base[i]
    w = torch.zeros(b, c, device=x.device, dtype=torch.float32)
    return w.scatter_(1, channels, out.reshape(b, k))


def topk_channels(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` channels per image whose token maps vary most over the patches (standard deviation over P), as
    (B, min(k, C)) int64 indices of the (B, P, C) ``tokens``.

    Why not the largest mean activation: a ViT's large-mean channels (the "massive activations") are close to
    constant over the patches, so their min-max normalised masks carry no location; selecting them by the mean
    gave IoU 0.02 against 0.57 by the standard deviation (64 of 384 channels, embedded ViT-S/14, 8 synth images,
    full R-Out 0.66).
    """
    return tokens.float().std(1).topk(min(int(k), tokens.shape[-1]), dim=1).indices


def cut_map(features: np.ndarray, saliency: np.ndarray, grid: tuple[int, int], *, tau: float = 0.2,
            eps: float = 1e-5, position_weight: float = 1.0, position_sigma: float = 0.1, solver: str = "lanczos",
            output: str = "shift") -> np.ndarray:
    """The Cut module: normalized cut of the class-aware token graph, as a continuous map.

    Graph (:func:`segfromxai.stages.refine.affinity`): ``S_ij = cos(f_i, f_j) + position_weight * exp(-d_ij^2 / (2
    position_sigma^2))``, ``d_ij`` the distance of the patches on the grid divided by the grid diagonal
    (:func:`segfromxai.stages.refine.grid_positions`); ``W_ij = 1 if S_ij > tau else eps``. The generalized eigenvector
    ``y`` of the second smallest eigenvalue of ``(D - W) y = lambda D y`` (``y^T D y = 1``) comes from
    :func:`segfromxai.stages.refine.fiedler` with ``solver``.

    Sign rule: split the tokens at ``mean(y)`` (TokenCut's rule); the side with the larger ``saliency`` mass (sum
    over its tokens) is foreground, on a tie the side with fewer tokens, on a tie of both the side ``y > mean(y)``.
    ``o = y`` if the foreground is ``y > mean(y)`` else ``-y``, so foreground tokens have the larger ``o``.

    Output: ``"shift"``: ``o - min(o)`` (every token kept, ranking unchanged, minimum 0); ``"clip"``:
    ``max(o - mean(o), 0)`` (background exactly 0). A graph with no cut (every pair joined, or none) has no unique
    Fiedler vector: the map is then ``saliency`` itself.

    Parameters
    ----------
    features : ndarray, float, shape (P, C), the class-aware tokens in raster order, P = gh * gw >= 2.
    saliency : ndarray, float, shape (P,), non-negative (the R-Out saliency).
    grid : (gh, gw).
    tau, eps : float, edge threshold and the weight of non-edges, ``0 < eps < 1``. Defaults are TokenCut's
        (0.2, 1e-5), as in :func:`segfromxai.stages.refine.ncut`; R-Cut's own threshold value is not reproduced here.
    position_weight, position_sigma : float, the positional term (``position_weight=0`` switches it off).
    solver : {"lanczos", "dense"}, see :func:`segfromxai.stages.refine.ncut_bipartition`.
    output : {"shift", "clip"}

    Returns
    -------
    ndarray, float64, shape (gh, gw), finite and non-negative.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; valid: {', '.join(OUTPUTS)}")
    f = np.asarray(features, dtype=np.float64)
    s = np.asarray(saliency, dtype=np.float64).ravel()
    n = f.shape[0]
    if n != grid[0] * grid[1] or s.shape != (n,):
        raise ValueError(f"features {f.shape} and saliency {s.shape} do not match the grid {grid}")
    w = affinity(f, tau=tau, eps=eps, positions=grid_positions(grid), position_weight=position_weight,
                 position_sigma=position_sigma)
    edges = w == 1.0
    if not has_cut(edges):
        return s.reshape(grid).copy()
    y = fiedler(edges, eps=eps, solver=solver)
    o = y if foreground_is_high(y, s, rule="mass") else -y
    m = o - o.min() if output == "shift" else np.maximum(o - o.mean(), 0.0)
    return m.reshape(grid)


def class_weights(ps: Pass, tokens: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """R-Out channel weights (B, C) for ``params["weights"]``.

    ``"scorecam"``: :func:`rout_weights` on every channel (``B * C + 1`` forward images). ``"topk"``: the ``k``
    channels of :func:`topk_channels` (largest spread over the patch tokens, per image) get :func:`rout_weights`,
    the others 0 (``B * min(k, C) + 1`` images). ``"gradient"``: Grad-CAM weights, the gradient of the target
    logit at the layer averaged over the patch tokens (read from the shared backward pass, no extra forward).
    """
    name = _layer(ps.model, params)
    if params["weights"] == "gradient":
        return ps.output_grads[name][:, ps.num_prefix_tokens:].float().mean(1)
    for key in ("batch_size", "k"):
        if not (isinstance(params[key], (int, np.integer)) and params[key] >= 1):
            raise ValueError(f"rcut: {key} must be an integer >= 1, got {params[key]!r}")
    channels = None
    if params["weights"] == "topk":
        channels = topk_channels(tokens, int(params["k"]))
    return rout_weights(ps.model, ps.x, tokens, ps.target, ps.grid, score=params["score"], channels=channels,
                        batch_size=int(params["batch_size"]))


def rcut(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """R-Cut map (Niu et al. 2023): R-Out class-aware tokens, then the Cut module.

    ``A`` = the patch tokens (prefix tokens dropped) of ``layer``'s (B, N, C) output. Class-aware tokens ``A * w``
    with ``w`` from :func:`class_weights`; R-Out saliency ``relu(sum_c w_c A_pc)``; each image is cut separately by
    :func:`cut_map` (float64, on the CPU). Forward images beyond the shared pass: ``B * C + 1`` (scorecam),
    ``B * min(k, C) + 1`` (topk), 0 (gradient). Every variant asks the shared pass for ``layer`` (``Needs.layers``),
    so the shared pass also backpropagates the target logit into it (used only by ``"gradient"``).

    Parameters
    ----------
    ps : the shared pass.
    params : dict
        ``layer`` (None: :func:`default_layer`), ``weights`` ("scorecam" | "topk" | "gradient", default
        "scorecam"), ``k`` (64, topk only), ``score`` ("softmax" | "logit", default "softmax"), ``batch_size`` (64
        perturbed images per forward), and the Cut's ``tau`` (0.2), ``eps`` (1e-5), ``position_weight`` (1.0),
        ``position_sigma`` (0.1, in grid diagonals), ``solver`` ("lanczos" | "dense") and ``output`` ("shift" |
        "clip"), see :func:`cut_map`.

    Returns
    -------
    Tensor, float32, shape (B, gh, gw), finite and non-negative, not normalised.
    """
    name = _layer(ps.model, params)
    a = ps.captured.outputs[name]
    grid = ps.grid
    tokens = a[:, ps.num_prefix_tokens:] if a.ndim == 3 else a
    if a.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"rcut layer {name!r} gives shape {tuple(a.shape)}; expected ViT tokens (B, N, C) with "
                         f"{ps.num_prefix_tokens} prefix tokens and a {grid[0]}x{grid[1]} patch grid")
    w = class_weights(ps, tokens, params)
    weighted = tokens.float() * w[:, None, :]
    sal = torch.relu(weighted.sum(-1))
    keys = ("tau", "eps", "position_weight", "position_sigma", "solver", "output")
    maps = [cut_map(weighted[i].cpu().double().numpy(), sal[i].cpu().double().numpy(), grid,
                    **{k: params[k] for k in keys}) for i in range(a.shape[0])]
    return torch.from_numpy(np.stack(maps)).float().to(ps.x.device)


def _needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs(layers=(_layer(model, params),))


def rcut_params(*, layer: str | None = None, weights: Literal["scorecam", "topk", "gradient"] = "scorecam",
                k: PositiveInt = 64, score: Literal["softmax", "logit"] = "softmax", batch_size: PositiveInt = 64,
                tau: Annotated[float, Range(-1.0, lo_open=True)] = 0.2,
                eps: Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True)] = 1e-5,
                position_weight: NonNegative = 1.0, position_sigma: Positive = 0.1,
                solver: Solver = "lanczos", output: Literal["shift", "clip"] = "shift") -> None:
    """R-Out weighting (``layer``, ``weights``, ``k``, ``score``, ``batch_size``) and the Cut (``tau``, ``eps``,
    the positional term, ``solver``, ``output``); see :func:`rcut` and :func:`cut_map`."""


RCUT_EXPLAINERS: dict[str, Explainer] = {
    "rcut": explainer(rcut, _needs, rcut_params, vit_only=True,
                      summary="R-Cut: perturbation-weighted class-aware tokens, then a normalized cut"),
}
