"""Attention explainers of Vision Transformers: attention rollout, gradient-weighted rollout, Chefer's LRP.

All maps are on the token grid (B, gh, gw), read out from the class-token row (models pooled by the class token)
or the mean over patch-token rows (average-pooled models); see ``Pass.readout``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from torch import nn

from ..params import Positive, Range
from .core import Needs, Pass, explainer
from .lrp import LRPConfig, lrp_pass
from .lrp_rules import AttentionMode, LayerNormMode, Rule


def _fuse_heads(a: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return a.mean(1)
    return a.amax(1) if how == "max" else a.amin(1)


def _discard(f: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the int(ratio * N * N) smallest entries of each (N, N) matrix."""
    b, n, _ = f.shape
    k = int(ratio * n * n)
    if k <= 0:
        return f
    flat = f.reshape(b, -1).clone()
    idx = flat.topk(k, dim=1, largest=False).indices
    return flat.scatter_(1, idx, 0.0).reshape(b, n, n)


def _check_start(ps: Pass, start: int) -> int:
    """``start`` as a block index; negative counts from the end (-1: the last block alone)."""
    depth = len(ps.model.blocks)
    if not -depth <= start < depth:
        raise ValueError(f"start_layer must lie in [-{depth}, {depth}) for this model, got {start}")
    return start % depth


def rollout(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema, ACL 2020); class-agnostic (the target is not used).

    Per block from ``start_layer``: fuse heads (``head_fusion`` mean/max/min), zero the ``discard_ratio`` share
    of smallest entries (per image), add the identity for the residual, normalise rows to sum 1; multiply the
    blocks' matrices with later blocks on the left, and read out the class-token row (see ``Pass.readout``).
    """
    start = _check_start(ps, params["start_layer"])
    if not 0 <= params["discard_ratio"] < 1:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {params['discard_ratio']}")
    rel = None
    for a in ps.captured.attention[start:]:
        f = _discard(_fuse_heads(a, params["head_fusion"]), params["discard_ratio"])
        f = f + torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        f = f / f.sum(-1, keepdim=True)
        rel = f if rel is None else f @ rel
    return ps.readout(rel)


def _weighted_rollout(ps: Pass, weights: list[torch.Tensor], start: int) -> torch.Tensor:
    """R = I; R += mean_h(relu(w_l)) @ R for each block l >= start in forward order; class-token read-out."""
    rel = None
    for w in weights[start:]:
        cam = torch.relu(w).mean(1)
        rel = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device).expand_as(cam) if rel is None else rel
        rel = rel + cam @ rel
    return ps.readout(rel)


def grad_rollout(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer et al., ICCV 2021, "Generic Attention-model Explainability").

    Ā_l = mean over heads of relu(dy/dA_l * A_l); R = I; R <- R + Ā_l R for l = start_layer .. L-1; read out the
    class-token row. A_l are the softmax probabilities; y the target logit.
    """
    start = _check_start(ps, params["start_layer"])
    w = [g * a for g, a in zip(ps.attention_grads, ps.captured.attention)]
    return _weighted_rollout(ps, w, start)


def lrp(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """Transformer attribution (Chefer et al., CVPR 2021): relevance x gradient of attention, rolled out.

    Ā_l = mean over heads of relu(dy/dA_l * R_A_l), with R_A_l the LRP relevance at block l's attention
    probabilities (``rule``, default alpha1beta0, with ``epsilon`` 1e-6, from a one-hot start at the target;
    ``attention`` and ``layernorm`` as in ``LRPConfig``), rolled out as in ``grad_rollout``. Differences from the
    authors' code: LayerNorm and softmax follow our ``LRPConfig`` choices instead of passing relevance unchanged,
    and rows are not re-normalised.
    """
    cfg = LRPConfig(params["rule"], float(params["epsilon"]), params["attention"], params["layernorm"], "onehot")
    rel_a = lrp_pass(ps, cfg, record_attention=True, pixels=False).attention
    w = [g * r[0] for g, r in zip(ps.attention_grads, rel_a)]
    return _weighted_rollout(ps, w, _check_start(ps, params["start_layer"]))


def _attention_needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs(attention=True)


def _gradient_attention_needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs(attention=True, attention_grad=True)


def _lrp_needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs(attention=True, attention_grad=True, blocks=True)


def rollout_params(*, head_fusion: Literal["mean", "max", "min"] = "mean",
                   discard_ratio: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.0, start_layer: int = 0) -> None:
    """``head_fusion``: how heads are merged; ``discard_ratio``: share of the lowest attentions dropped;
    ``start_layer``: the first block rolled out."""


def grad_rollout_params(*, start_layer: int = 0) -> None:
    """``start_layer``: the first block rolled out."""


def lrp_params(*, rule: Rule = "alpha1beta0", epsilon: Positive = 1e-6,
               attention: AttentionMode = "full", layernorm: LayerNormMode = "center",
               start_layer: int = 0) -> None:
    """The LRP rule and its ``epsilon``, how attention and LayerNorm pass relevance (see ``LRPConfig``), and
    ``start_layer``, the first block rolled out."""


ATTENTION_EXPLAINERS = {
    "rollout": explainer(rollout, _attention_needs, rollout_params, vit_only=True, needs_class=False,
                         summary="attention rollout (class-agnostic)"),
    "grad_rollout": explainer(grad_rollout, _gradient_attention_needs, grad_rollout_params, vit_only=True,
                              summary="gradient-weighted attention rollout (Chefer et al., ICCV 2021)"),
    "lrp": explainer(lrp, _lrp_needs, lrp_params, vit_only=True,
                     summary="transformer attribution: LRP relevance x attention gradient, rolled out "
                             "(Chefer et al., CVPR 2021)"),
}
