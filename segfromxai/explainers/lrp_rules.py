"""The LRP rules of :mod:`segfromxai.explainers.lrp`, one function per operation of a timm ViT's data flow.

Each takes the pass's :class:`LRPConfig`, the operation's input ``x``, its output ``z`` and the relevance ``r`` at
the output, and returns the relevance at the input: ``epsilon``, ``alpha1beta0`` and ``abslrp`` as the module
docstring of :mod:`segfromxai.explainers.lrp` states them, for linear maps, the patch convolution, LayerNorm,
LayerScale, element-wise products and residual adds. Pure tensor functions: no hooks, no model forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Fn = Callable[[torch.Tensor, int], torch.Tensor]
RULES = ("epsilon", "alpha1beta0", "abslrp")
ATTENTION_MODES = ("full", "constant")
LAYERNORM_MODES = ("center", "detach")
Rule = Literal[RULES]
AttentionMode = Literal[ATTENTION_MODES]
LayerNormMode = Literal[LAYERNORM_MODES]
EPSILON = {"epsilon": 1e-6, "alpha1beta0": 1e-9, "abslrp": 1e-9}


@dataclass(frozen=True)
class LRPConfig:
    """Settings of one LRP pass.

    rule : "epsilon", "alpha1beta0" or "abslrp".
    epsilon : the stabiliser of the rule's denominator.
    attention : "full" propagates through the attention probabilities into q and k (softmax denominator
        detached, relevance passed unchanged through the exponential); "constant" treats the probabilities as
        fixed weights of the value path (Ali et al., 2022), which conserves relevance.
    layernorm : both keep sigma = sqrt(var + eps) detached. "center" keeps the mean subtraction inside the linear
        map (I - 11^T/D)/sigma (Ali et al., 2022; conserves relevance); "detach" also detaches the mean, making
        LayerNorm an element-wise affine map with bias -mu/sigma (the absLRP paper).
    start : relevance at the logits: "logit" (the target logit, for conservation), "onehot" (1 at the target),
        "contrastive" (Gu et al., 2019, used by absLRP): two passes, one from the target class and one spread
        evenly over the other classes; each is rescaled to unit L1 norm per image at the pixels and the second is
        subtracted from the first. The paper states the start as 1 for the target and -1/N for the others; the
        rule divides by |z|, which amplifies small logits, so without the rescaling the non-target classes
        dominate and the map is all negative. The authors' released code does the same two-pass subtraction.
    """

    rule: str
    epsilon: float
    attention: str
    layernorm: str
    start: str


# ------------------------------------------------------------------------------------------------ rules
def part(w: torch.Tensor, part: int) -> torch.Tensor:
    return w if part == 0 else (w.clamp(min=0) if part > 0 else w.clamp(max=0))


def denominator(cfg: LRPConfig, z: torch.Tensor, positive: torch.Tensor | None) -> torch.Tensor:
    """The rule's denominator for the output z of an operation (a new tensor); ``positive``: the sum of its positive
    contributions (alpha1beta0 only)."""
    if cfg.rule == "epsilon":  # z + eps sign(z), sign(+-0) = +1: z + 0.0 turns -0.0 into +0.0 (copysign is cheap)
        return torch.copysign(z.new_tensor(cfg.epsilon), z + 0.0).add_(z)
    return positive + cfg.epsilon if cfg.rule == "alpha1beta0" else z.abs().add_(cfg.epsilon)


def numerator(cfg: LRPConfig, c: torch.Tensor) -> torch.Tensor:
    """The part of a contribution c that the rule's numerator keeps (epsilon: all of it; the others: c+)."""
    return c if cfg.rule == "epsilon" else c.clamp(min=0)


def scale(cfg: LRPConfig, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor, fwd: Fn) -> torch.Tensor:
    """s = R_z / denominator of the rule (``fwd(v, part)``: the map with the weights' part applied to v)."""
    positive = fwd(x.clamp(min=0), 1) + fwd(x.clamp(max=0), -1) if cfg.rule == "alpha1beta0" else None
    return r / denominator(cfg, z, positive)


def apply_rule(cfg: LRPConfig, x: torch.Tensor, s: torch.Tensor, bwd: Fn, *, nonneg: bool = False) -> torch.Tensor:
    """Relevance of input x given the scaled relevance s and the transpose ``bwd`` of its linear map.

    ``nonneg``: x or the weights are known to be >= 0 (attention probabilities), so x- * L-^T s vanishes.
    """
    if cfg.rule == "epsilon":
        return x * bwd(s, 0)
    pos = x.clamp(min=0) * bwd(s, 1)
    return pos if nonneg else pos + x.clamp(max=0) * bwd(s, -1)


def rule(cfg: LRPConfig, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor, fwd: Fn, bwd: Fn) -> torch.Tensor:
    return apply_rule(cfg, x, scale(cfg, x, z, r, fwd), bwd)


def linear(cfg: LRPConfig, lin: nn.Linear, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return dense(cfg, lin.weight, lin.bias, x, z, r)


def dense(cfg: LRPConfig, w: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, z: torch.Tensor,
           r: torch.Tensor) -> torch.Tensor:
    """Relevance of x for z = x W^T + bias, with z from the forward (not recomputed).

    x+ W+^T s + x- W-^T s: the two transposes are one matmul with W+ and W- side by side; alpha1beta0's
    denominator sum_i (w_ji x_i)+ is (z - bias + |W| |x|) / 2, one matmul.
    """
    positive = None
    if cfg.rule == "alpha1beta0":
        positive = F.linear(x.abs(), w.abs(), None if bias is None else -bias).add_(z).clamp_(min=0).mul_(0.5)
    s = r / denominator(cfg, z, positive)
    if cfg.rule == "epsilon":
        return (s @ w).mul_(x)
    return split(x, s @ torch.cat([w.clamp(min=0), w.clamp(max=0)], 1))


def split(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x+ * u[..., :d] + x- * u[..., d:] for x (..., d): the two parts' transposes side by side in u (..., 2d)."""
    d = x.shape[-1]
    return (u[..., :d] * x.clamp(min=0)).addcmul_(u[..., d:], x.clamp(max=0))  # cheaper than a where on x > 0


def diag(cfg: LRPConfig, a: torch.Tensor, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """z = a * x + b element-wise: each output has one contribution c = a x, so R_x = R_z * numerator(c) / den."""
    c = numerator(cfg, a * x)
    return r * (c / denominator(cfg, z, c))


def add(cfg: LRPConfig, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, r: torch.Tensor):
    """z = a + b as one operation with two inputs (identity weights): the shared denominator splits R_z."""
    na, nb = numerator(cfg, a), numerator(cfg, b)
    # alpha1beta0: both inputs' positive parts
    den = denominator(cfg, z, na + nb if cfg.rule == "alpha1beta0" else None)
    return r * (na / den), r * (nb / den)


def layer_scale(cfg: LRPConfig, ls: nn.Module, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    if isinstance(ls, nn.Identity):
        return r
    if not hasattr(ls, "gamma"):
        raise NotImplementedError(f"LRP does not know the layer-scale module {type(ls).__name__}")
    return diag(cfg, ls.gamma, x, z, r)


def layernorm(cfg: LRPConfig, ln: nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Relevance of a LayerNorm's input; sigma (and with "detach" the mean) treated as constants.

    y = gamma u + beta with u = C x / sigma, C = I - 11^T/D ("center": C+ = (1 - 1/D) I, C- = its off-diagonal
    part), or u = x / sigma - mu / sigma ("detach"). The factors that depend on the forward alone are computed once
    and applied to every pass.
    """
    if isinstance(ln, nn.Identity):
        return r
    if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
        raise NotImplementedError(f"LRP does not know the normalisation {type(ln).__name__}")
    d = x.shape[-1]
    u = x - x.mean(-1, keepdim=True)
    sigma = u.square().mean(-1, keepdim=True).add_(ln.eps).sqrt_()  # (two passes: much faster than Tensor.var on CPU)
    u = u.div_(sigma)
    gu = u if ln.weight is None else ln.weight * u
    c = numerator(cfg, gu)
    f = c / denominator(cfg, gu if ln.bias is None else gu + ln.bias, c)  # R_u = R_y * f
    if cfg.layernorm == "detach":
        cx = numerator(cfg, x / sigma)
        return r * (f * (cx / denominator(cfg, u, cx)))
    if cfg.rule == "epsilon":  # R_x = x * C^T s / sigma
        s = r * (f / denominator(cfg, u, None))
        return (s - s.mean(-1, keepdim=True)) * (x / sigma)
    xp, xn = x.clamp(min=0) / sigma, x.clamp(max=0) / (d * sigma)
    positive = xp * (1 - 1 / d) + (xn - xn.sum(-1, keepdim=True))  # C+ x+ + C- x-, over sigma
    s = r * (f / denominator(cfg, u, positive))
    return s * (xp * (1 - 1 / d) + xn) - s.sum(-1, keepdim=True) * xn  # x+ C+^T s + x- C-^T s, over sigma


def patches(cfg: LRPConfig, conv: nn.Conv2d, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A patchifying convolution (stride = kernel, no padding, no dilation, one group) as the dense layer it is, on
    the unfolded patches; pixels that no patch covers get no relevance."""
    (b, c, h, w), (kh, kw), (gh, gw) = x.shape, conv.kernel_size, z.shape[-2:]
    xp = x[..., :gh * kh, :gw * kw].reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
    rp = dense(cfg, conv.weight.reshape(conv.out_channels, -1), conv.bias, xp, z.flatten(2).transpose(1, 2),
                r.flatten(-2).transpose(-1, -2))
    lead = rp.shape[:-2]
    rp = rp.reshape(*lead, gh, gw, c, kh, kw).movedim(-3, -5).movedim(-2, -3).reshape(*lead, c, gh * kh, gw * kw)
    if (gh * kh, gw * kw) == (h, w):
        return rp
    out = rp.new_zeros(*lead, c, h, w)
    out[..., :gh * kh, :gw * kw] = rp
    return out


def conv_input(cfg: LRPConfig, conv: nn.Conv2d, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Relevance at the input of the patch-embedding convolution from that at its output (..., C, gh, gw)."""
    if (tuple(conv.stride) == tuple(conv.kernel_size) and conv.padding in ("valid", (0, 0))
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1):
        return patches(cfg, conv, x, z, r)
    if isinstance(conv.padding, str) and conv.padding != "valid":
        raise NotImplementedError(f"LRP does not support padding={conv.padding!r} in the patch embedding")
    pad = 0 if isinstance(conv.padding, str) else conv.padding
    kw = dict(stride=conv.stride, padding=pad, dilation=conv.dilation, groups=conv.groups)
    w = conv.weight

    def transpose(s: torch.Tensor, p: int) -> torch.Tensor:  # s carries the leading pass dimension
        flat = s.reshape(-1, *s.shape[-3:])
        out = torch.nn.grad.conv2d_input((flat.shape[0], *x.shape[1:]), part(w, p), flat, **kw)
        return out.reshape(*s.shape[:-3], *x.shape[1:])

    return rule(cfg, x, z, r, lambda v, p: F.conv2d(v, part(w, p), **kw), transpose)


# ------------------------------------------------------------------------------------------------ model parts
