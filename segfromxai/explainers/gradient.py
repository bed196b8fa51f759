"""Gradient explainers: Grad-CAM, HiResCAM, vanilla saliency and gradient x input.

All of them read the one shared backward pass of ``sum_b logit[b, target_b]`` (the target logit, not the
softmax probability).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.model import is_vit
from ..models.model import default_layer
from .core import Needs, Pass, Sign, explainer, signed


def _layer(model: nn.Module, params: dict[str, Any]) -> str:
    return params["layer"] or default_layer(model)


def _cam_inputs(ps: Pass, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Activations and gradients of the CAM layer as (B, positions, C), and the spatial shape of positions."""
    name = _layer(ps.model, params)
    a, g = ps.captured.outputs[name], ps.output_grads[name]
    if a.ndim == 4:  # CNN feature map (B, C, h, w)
        return a.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2), tuple(a.shape[-2:])
    if a.ndim == 3 and is_vit(ps.model):  # ViT tokens (B, N, C): patch tokens only
        p = ps.num_prefix_tokens
        return a[:, p:], g[:, p:], ps.grid
    raise ValueError(f"Grad-CAM layer {name!r} gives a tensor of shape {tuple(a.shape)}; "
                     "expected CNN (B, C, h, w) or ViT tokens (B, N, C)")


def gradcam(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017): relu(sum_c mean_pos(dy/dA_c) * A_c).

    On a ViT, A is the (B, N, C) output of ``layer`` (default: the last block's ``norm1``); the weights are the
    gradients averaged over the patch tokens only, prefix tokens (class, registers, distillation) are dropped.
    On a CNN, A is the layer's (B, C, h, w) feature map. Map: (B, gh, gw) on the layer's grid, unnormalised.
    """
    a, g, shape = _cam_inputs(ps, params)
    w = g.mean(1, keepdim=True)
    return torch.relu((a * w).sum(-1)).reshape(a.shape[0], *shape)


def hirescam(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """HiResCAM (Draelos and Gallagher, 2020): relu(sum_c dy/dA_c * A_c) per position (no gradient averaging).

    Same layer choice and grid as ``gradcam``.
    """
    a, g, shape = _cam_inputs(ps, params)
    return torch.relu((a * g).sum(-1)).reshape(a.shape[0], *shape)


def saliency(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """Vanilla gradient (Simonyan et al., 2014): max over colour channels of |dy/dx|, at pixel level (B, H, W).

    x is the preprocessed (normalised) input.
    """
    return ps.input_grad.abs().amax(1)


def gradxinput(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """Gradient x input (Shrikumar et al., 2016): s = sum_c x_c * dy/dx_c on the preprocessed input, (B, H, W).

    ``sign``: "positive" keeps relu(s) (evidence for the class), "absolute" keeps |s|.
    """
    return signed((ps.x * ps.input_grad).sum(1), params["sign"])


def _layer_needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs(layers=(_layer(model, params),))


def _input_needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs(input_grad=True)


def uniform(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """A constant map of ones on a 1 x 1 grid: no explanation, for explanation-free recipes (TokenCut's own
    foreground rule, ``[refine] foreground = "eigvec"``); class-agnostic, no backward pass."""
    return torch.ones(ps.x.shape[0], 1, 1, device=ps.x.device)


def _no_needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs()


def layer_params(*, layer: str | None = None) -> None:
    """``layer``: the module whose activations and gradients are read (None: :func:`default_layer`)."""


def no_params() -> None:
    """No parameters."""


def sign_params(*, sign: Sign = "positive") -> None:
    """``sign``: keep the positive part of the signed map, or its absolute value."""


GRADIENT_EXPLAINERS = {
    "uniform": explainer(uniform, _no_needs, no_params, vit_only=False, needs_class=False,
                         summary="no explanation: a constant map (for TokenCut/MaskCut's own foreground rule)"),
    "gradcam": explainer(gradcam, _layer_needs, layer_params, vit_only=False,
                         summary="Grad-CAM on a layer's activations (ViT tokens or CNN maps)"),
    "hirescam": explainer(hirescam, _layer_needs, layer_params, vit_only=False,
                          summary="HiResCAM: element-wise gradient x activation"),
    "saliency": explainer(saliency, _input_needs, no_params, vit_only=False,
                          summary="vanilla gradient, max |grad| over channels"),
    "gradxinput": explainer(gradxinput, _input_needs, sign_params, vit_only=False,
                            summary="gradient x input, summed over channels"),
}
