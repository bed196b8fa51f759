"""Layer-wise relevance propagation through a timm Vision Transformer, down to pixels.

One engine, three rules for every linear operation z = L x + b (x+ = max(x, 0), x- = min(x, 0), likewise L+/L-):

- ``epsilon`` (Bach et al., 2015):   R_x = x * L^T (R_z / (z + eps sign z))
- ``alpha1beta0`` (z+ rule):          R_x = x+ * L+^T s + x- * L-^T s,  s = R_z / (L+ x+ + L- x- + eps), biases excluded
- ``abslrp`` (Vukadin et al., 2024):  the same numerator, s = R_z / (|z| + eps): the Relative Absolute Magnitude rule

applied along timm's data flow: the patch convolution, the position-embedding add (relevance at the prefix tokens
and the embedding parameters is dropped), LayerNorm (statistics detached, see ``layernorm``), the qkv and
projection linears, attention (see ``attention``), LayerScale, residual adds (one joint operation with both
inputs; relevances of a split are summed), the MLP (GELU passes relevance unchanged), the final norm, pooling
(class token or average) and the head. Operations with two inputs that multiply (q k^T, A V) take one pass per
input with the other input as the weights and the shared denominator; the passes' relevances are summed where the
inputs meet (the qkv linear), as the absLRP paper prescribes.

Block internals (norms, qkv, attention probabilities, projection, MLP pre-activation) are those the shared forward
recorded (``capture(internals=True)``), checked cheaply against each other and the model's modules, or, when a pass
has only the block inputs, recomputed one block at a time and checked against the model's own forward; a block
layout this engine does not know (post-norm, gated or SwiGLU MLPs, q/k norms, attention pooling) raises
``NotImplementedError`` naming it. Cost per linear layer, in matmuls of the forward's size: epsilon 1, abslrp 2,
alpha1beta0 3 (per pass), against the forward's 1 and the gradient's 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..params import Positive
from . import lrp_rules as rules
from .core import Explainer, Needs, Pass, Sign, explainer, signed
from .lrp_rules import EPSILON, AttentionMode, LayerNormMode, LRPConfig
from ..models.hooks import INTERNALS

@dataclass
class LRPResult:
    """Relevance at the (preprocessed) input pixels (passes, B, 3, H, W; None when not asked for) and, when
    recorded, at each block's attention probabilities (passes, B, heads, N, N)."""

    input: torch.Tensor | None
    attention: list[torch.Tensor] | None


def _check(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    tol = 1e-4 * (1 + float(expected.abs().max()))
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=tol):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
        raise NotImplementedError(f"LRP: the re-computed {what} differs from the model's forward (max diff {diff}); "
                                  "this layout is not supported")


def _check_block(i: int, blk: nn.Module) -> None:
    attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
    ok = (all(hasattr(blk, a) for a in ("norm1", "ls1", "norm2", "ls2")) and attn is not None and mlp is not None
          and hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(mlp, "fc1") and hasattr(mlp, "fc2"))
    if not ok:
        raise NotImplementedError(f"LRP: block {i} ({type(blk).__name__}) is not a timm pre-norm Block")
    for sub in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, sub, nn.Identity()), nn.Identity):
            raise NotImplementedError(f"LRP: block {i} attention has a {sub} ({type(getattr(attn, sub)).__name__})")
    if getattr(attn, "gate", None) is not None or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise NotImplementedError(f"LRP: block {i} has a gated attention or a normalised MLP")


def _recompute(blk: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A block's internals (the keys of ``INTERNALS``) recomputed from its input x."""
    attn, mlp = blk.attn, blk.mlp
    b, n, _ = x.shape
    t = {"x": x, "n1": blk.norm1(x)}
    t["qkv"] = attn.qkv(t["n1"])
    q, k, v = t["qkv"].reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    t["a"] = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    t["o"] = (t["a"] @ v).transpose(1, 2).reshape(b, n, -1)
    t["p"] = attn.proj(t["o"])
    t["x1"] = x + blk.ls1(t["p"])
    t["n2"] = blk.norm2(t["x1"])
    t["h"] = mlp.fc1(t["n2"])
    t["m"] = mlp.fc2(mlp.act(t["h"]))
    t["out"] = t["x1"] + blk.ls2(t["m"])
    return t


def _check_internals(i: int, blk: nn.Module, t: dict[str, torch.Tensor]) -> None:
    """The recorded internals of block i fit together as this engine assumes, checked on the first and the last
    token's rows (cheap; a layout that differs differs there too)."""
    attn, mlp = blk.attn, blk.mlp
    b, n, _ = t["x"].shape
    q, k, v = t["qkv"].reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    rows = torch.tensor([0, n - 1], device=q.device)
    x1, p, m = (t[key].index_select(1, rows) for key in ("x1", "p", "m"))
    again = {"n1": blk.norm1(t["x"].index_select(1, rows)), "qkv": attn.qkv(t["n1"].index_select(1, rows)),
             "a": ((q.index_select(2, rows) * attn.scale) @ k.transpose(-2, -1)).softmax(-1),
             "o": (t["a"].index_select(2, rows) @ v).transpose(1, 2).reshape(b, 2, -1),
             "p": attn.proj(t["o"].index_select(1, rows)), "x1": t["x"].index_select(1, rows) + blk.ls1(p),
             "n2": blk.norm2(x1), "h": mlp.fc1(t["n2"].index_select(1, rows)),
             "m": mlp.fc2(mlp.act(t["h"].index_select(1, rows))), "out": x1 + blk.ls2(m)}
    for key, got in again.items():
        _check(f"{key} of block {i}", got, t[key].index_select(2 if key == "a" else 1, rows))


def _internals(ps: Pass, i: int) -> dict[str, torch.Tensor]:
    """Block i's internals: those the shared forward recorded (checked), or recomputed from its captured input."""
    blk, got = ps.model.blocks[i], ps.captured
    _check_block(i, blk)
    t = got.internals[i] if i < len(got.internals) else {}
    if set(INTERNALS) <= set(t):
        _check_internals(i, blk, t)
        return t
    t = _recompute(blk, got.block_io[i][0])
    _check(f"output of block {i}", t["out"], got.block_io[i][1])
    return t


def _pmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b where one operand may carry a leading pass dimension that the other lacks: one matmul per pass into one
    output (broadcasting would copy the other operand once per pass)."""
    if a.ndim == b.ndim:
        return a @ b
    many = a if a.ndim > b.ndim else b
    batch = torch.broadcast_shapes(a.shape[many is a:-2], b.shape[many is b:-2])
    out = many.new_empty(many.shape[0], *batch, a.shape[-2], b.shape[-1])
    for i in range(many.shape[0]):
        torch.matmul(a[i] if many is a else a, b[i] if many is b else b, out=out[i])
    return out


def _query_key(cfg: LRPConfig, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, r_a: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of q (..., heads, n, hd) and k (..., heads, N, hd) from that at the attention probabilities of q's
    n rows: the softmax (denominator detached) passes it unchanged to the logits S = (scale q) k^T, one pass per
    input, sharing the denominator."""
    sq, sk = q * attn.scale, k * attn.scale
    logits = sq @ k.transpose(-2, -1)
    positive = None
    if cfg.rule == "alpha1beta0":  # sum_d (q_d sk_d)+ = (S + |q| |sk|^T) / 2
        positive = (q.abs() @ sk.abs().transpose(-2, -1)).add_(logits).clamp_(min=0).mul_(0.5)
    s = r_a / rules.denominator(cfg, logits, positive)
    if cfg.rule == "epsilon":
        return _pmm(s, sk).mul_(q), _pmm(s.transpose(-2, -1), sq).mul_(k)
    both = lambda w: torch.cat([w.clamp(min=0), w.clamp(max=0)], -1)  # noqa: E731
    return rules.split(q, _pmm(s, both(sk))), rules.split(k, _pmm(s.transpose(-2, -1), both(sq)))


def _attention(cfg: LRPConfig, attn: nn.Module, t: dict[str, torch.Tensor], r_o: torch.Tensor, record: bool,
               to_qk: bool, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Relevance at the qkv output (..., N, 3C), or at its value part only (..., N, C) when no relevance goes to q
    and k (constant attention, or not ``to_qk``); and at the attention probabilities when ``record``. ``r_o``: the
    relevance at the attention output's token ``rows`` (the others hold none)."""
    b, n, c = t["o"].shape
    heads, hd = attn.num_heads, attn.head_dim
    q, k, v = t["qkv"].reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    a, q, o = t["a"][:, :, rows], q[:, :, rows], t["o"][:, rows]
    r = r_o.reshape(*r_o.shape[:-1], heads, hd).transpose(-3, -2)
    # O = A V: a pass for V (weights A >= 0) and one for A (weights V), sharing the denominator.
    vp = rules.numerator(cfg, v)  # A >= 0: a contribution a v is positive where v is
    positive = a @ vp if cfg.rule == "alpha1beta0" else None
    s = r / rules.denominator(cfg, o.reshape(b, -1, heads, hd).transpose(1, 2), positive)
    tokens = lambda u: u.transpose(-3, -2).flatten(-2)  # noqa: E731  (..., heads, N, hd) -> (..., N, C)
    r_v = tokens(_pmm(a.transpose(-2, -1), s).mul_(vp))
    to_qk = to_qk and cfg.attention == "full"
    r_a = _pmm(s, vp.transpose(-2, -1)).mul_(a) if record or to_qk else None
    if to_qk:
        r_q, r_k = _query_key(cfg, attn, q, k, r_a)
        r_v = torch.cat([_scatter(tokens(r_q), rows, n), tokens(r_k), r_v], -1)
    return r_v, None if r_a is None else _scatter(r_a, rows, n)


def _scatter(r: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    """Relevance (..., len(rows), D) of some token rows as (..., n, D), zero in the other rows."""
    if rows == slice(None):
        return r
    out = r.new_zeros(*r.shape[:-2], n, r.shape[-1])
    out[..., rows, :] = r
    return out


_ROW_KEYS = ("x", "x1", "n2", "h", "m", "out", "p", "o")


def _block(cfg: LRPConfig, blk: nn.Module, t: dict[str, torch.Tensor], r_out: torch.Tensor, record: bool,
           to_input: bool, rows: slice = slice(None)) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Relevance at a block's input tokens (None unless ``to_input``) and at its attention probabilities (when
    ``record``), from the block's internals ``t`` and the relevance at its output, (passes, B, len(rows), C): only
    the token ``rows`` hold relevance there (the class token below a head that reads it alone), so the MLP and the
    attention's output projection run on those rows only."""
    attn, mlp, n = blk.attn, blk.mlp, t["x"].shape[1]
    tr = {**t, **{key: t[key][:, rows] for key in _ROW_KEYS}}
    p1, m1 = blk.ls1(tr["p"]), blk.ls2(tr["m"])
    r_x1, r_m1 = rules.add(cfg, tr["x1"], m1, tr["out"], r_out)
    r_g = rules.linear(cfg, mlp.fc2, mlp.act(tr["h"]), tr["m"], rules.layer_scale(cfg, blk.ls2, tr["m"], m1, r_m1))
    r_x1 = r_x1 + rules.layernorm(cfg, blk.norm2, tr["x1"], rules.linear(cfg, mlp.fc1, tr["n2"], tr["h"], r_g))
    r_x, r_p1 = rules.add(cfg, tr["x"], p1, tr["x1"], r_x1)
    r_o = rules.linear(cfg, attn.proj, tr["o"], tr["p"], rules.layer_scale(cfg, blk.ls1, tr["p"], p1, r_p1))
    r_qkv, r_a = _attention(cfg, attn, t, r_o, record, to_input, rows)
    if not to_input:
        return None, r_a
    w, bias, width = attn.qkv.weight, attn.qkv.bias, r_qkv.shape[-1]  # width C: the value rows only
    r_n1 = rules.dense(cfg, w[-width:], None if bias is None else bias[-width:], t["n1"], t["qkv"][..., -width:], r_qkv)
    return rules.layernorm(cfg, blk.norm1, t["x"], r_n1).add_(_scatter(r_x, rows, n)), r_a


def _head(cfg: LRPConfig, model: nn.Module, tokens: torch.Tensor, logits: torch.Tensor,
          r_y: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Relevance at the last block's output tokens, (passes, B, len(rows), C), and the token ``rows`` that hold it
    (the others hold none: the class token under a class-token head)."""
    if getattr(model, "attn_pool", None) is not None:
        raise NotImplementedError("LRP does not support attention pooling ('map') heads")
    if not isinstance(model.head, nn.Linear):
        raise NotImplementedError(f"LRP needs a Linear classifier head, got {type(model.head).__name__}")
    pool, npt = model.global_pool, model.num_prefix_tokens
    if isinstance(getattr(model, "head_dist", None), nn.Linear):  # DeiT distilled: y = (head(t0) + head_dist(t1)) / 2
        rows = slice(0, 2)
        t = model.norm(tokens[:, rows])
        y0, y1 = model.head(t[:, 0]), model.head_dist(t[:, 1])
        _check("logits", (y0 + y1) / 2, logits)
        r0, r1 = rules.add(cfg, y0 / 2, y1 / 2, logits, r_y)
        r_t = torch.stack([
            rules.linear(cfg, model.head, t[:, 0], y0, rules.diag(cfg, torch.full_like(y0[:1], 0.5), y0, y0 / 2, r0)),
            rules.linear(cfg, model.head_dist, t[:, 1], y1,
                         rules.diag(cfg, torch.full_like(y1[:1], 0.5), y1, y1 / 2, r1))], 2)
        return rules.layernorm(cfg, model.norm, tokens[:, rows], r_t), rows
    if pool == "token":
        rows = slice(0, 1)
    elif pool == "avg":
        first = 0 if getattr(model, "pool_include_prefix", False) else npt
        rows = slice(first, None) if first else slice(None)
    else:
        raise NotImplementedError(f"LRP supports global_pool 'token' or 'avg', not {pool!r}")
    t = model.norm(tokens[:, rows])
    pooled = t[:, 0] if pool == "token" else t.mean(1)
    f = model.fc_norm(pooled)
    y = model.head(f)
    _check("logits", y, logits)
    r_pooled = rules.layernorm(cfg, model.fc_norm, pooled, rules.linear(cfg, model.head, f, y, r_y))
    if pool == "token":
        r_t = r_pooled[:, :, None]
    else:
        cnt = t.shape[1]
        mean = lambda v, p: v.mean(1) * (p >= 0)  # noqa: E731  (1/cnt >= 0: no negative part)
        spread = lambda s, p: (s[..., None, :] * ((p >= 0) / cnt)).expand(*s.shape[:-1], cnt, s.shape[-1])  # noqa: E731
        r_t = rules.rule(cfg, t, pooled, r_pooled, mean, spread)
    return rules.layernorm(cfg, model.norm, tokens[:, rows], r_t), rows


def _embedding(cfg: LRPConfig, model: nn.Module, x: torch.Tensor, block0_in: torch.Tensor,
               r_tokens: torch.Tensor) -> torch.Tensor:
    """Relevance at the input pixels from the relevance at the first block's input tokens."""
    pe = model.patch_embed
    if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity) or getattr(pe, "dynamic_img_pad", False):
        raise NotImplementedError("LRP supports a plain convolutional patch embedding (no norm, no padding)")
    conv = pe.proj
    z = conv(x)
    e = z.flatten(2).transpose(1, 2)
    tok = model.patch_drop(model._pos_embed(pe(x)))
    _check("token embedding", model.norm_pre(tok), block0_in)
    npt = model.num_prefix_tokens
    r_tok = rules.layernorm(cfg, model.norm_pre, tok, r_tokens)[..., npt:, :]
    r_e = rules.diag(cfg, torch.ones_like(e[:1, :1]), e, tok[:, npt:], r_tok)  # patch + position embedding
    return rules.conv_input(cfg, conv, x, z, r_e.transpose(-1, -2).reshape(*r_e.shape[:-2], *z.shape[1:]))


def _start(cfg: LRPConfig, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relevance at the logits, (passes, B, K)."""
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    if cfg.start == "logit":
        return (onehot * logits)[None]
    if cfg.start == "contrastive":
        return torch.stack([onehot, (1 - onehot) / max(1, logits.shape[1] - 1)])
    return onehot[None]


def _unit(r: torch.Tensor) -> torch.Tensor:
    """Rescale each (pass, image) slice to unit L1 norm."""
    return r / (r.abs().flatten(2).sum(-1).clamp_min(1e-30).reshape(*r.shape[:2], *[1] * (r.ndim - 2)))


def lrp_pass(ps: Pass, cfg: LRPConfig, *, record_attention: bool = False, pixels: bool = True) -> LRPResult:
    """Run (or reuse, from ``ps.cache``) one LRP pass for the batch of ``ps``.

    Relevance tensors carry a leading pass dimension: one pass, or two for the contrastive start (the target
    class, and the other classes), run together. The abslrp rule is not conservative (sum_i (x_i w_ij)+ / |z_j|
    can exceed 1 at every layer), so its relevance is rescaled to unit L1 norm per pass and image after each
    block when the start is contrastive (the abslrp explainer); each pass is linear in its start, so this changes
    no map, it only prevents overflow. Other starts keep the rule's own magnitudes (``lrp``'s roll-out needs them).

    The blocks' internals come from the shared forward (``ps.captured.internals``) when it recorded them, else
    they are recomputed from the captured block inputs. ``pixels=False`` stops at the first block's attention
    probabilities (``LRPResult.input`` is then None): enough for ``record_attention``.
    """
    hit = ps.cache.get(cfg)
    if (hit is not None and (hit.attention is not None or not record_attention)
            and (hit.input is not None or not pixels)):
        return hit
    model, io = ps.model, ps.captured.block_io
    with torch.no_grad():
        r, rows = _head(cfg, model, io[-1][1], ps.logits, _start(cfg, ps.logits, ps.target))
        recorded, last = [], len(model.blocks) - 1
        for i in range(last, -1, -1):
            r = _unit(r) if cfg.start == "contrastive" else r
            r, r_a = _block(cfg, model.blocks[i], _internals(ps, i), r, record_attention, pixels or i > 0,
                            rows if i == last else slice(None))
            recorded.append(r_a)
        r_x = _embedding(cfg, model, ps.x, io[0][0], r) if pixels else None
    res = LRPResult(r_x, recorded[::-1] if record_attention else None)
    ps.cache[cfg] = res
    return res


# ------------------------------------------------------------------------------------------------ explainers
def _config(rule: str, params: dict[str, Any], start: str) -> LRPConfig:
    return LRPConfig(rule, float(params["epsilon"]), params["attention"], params["layernorm"], start)


def _pixels(rule: str, start: str) -> Callable[[Pass, dict[str, Any]], torch.Tensor]:
    def fn(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
        r = lrp_pass(ps, _config(rule, params, start)).input.sum(-3)
        if start == "contrastive":  # target pass minus other-classes pass, each at unit L1 per image
            r = _unit(r[:, :, None])[:, :, 0]
            return signed(r[0] - r[1], params["sign"])
        return signed(r[0], params["sign"])

    return fn


def _block_needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs(blocks=True)


def pixel_lrp_params(*, epsilon: Positive = 1e-6, attention: AttentionMode = "full",
                     layernorm: LayerNormMode = "center", sign: Sign = "positive") -> None:
    """The rule's ``epsilon``, how attention and LayerNorm pass relevance (see ``LRPConfig``), and ``sign``; each
    LRP explainer declares its own defaults (a ``functools.partial`` of this signature)."""


def _lrp_explainer(rule: str, start: str, attention: str, layernorm: str, summary: str) -> Explainer:
    fn = _pixels(rule, start)
    fn.__doc__ = f"{summary}. Relevance at the preprocessed pixels, summed over channels; ``sign`` keeps its " \
                 f"positive part (default) or absolute value. Map (B, H, W). See ``LRPConfig``."
    params = functools.partial(pixel_lrp_params, epsilon=EPSILON[rule], attention=attention, layernorm=layernorm)
    return explainer(fn, _block_needs, params, vit_only=True, summary=summary)


LRP_EXPLAINERS = {
    "abslrp": _lrp_explainer("abslrp", "contrastive", "full", "detach",
                             "Relative Absolute Magnitude LRP (Vukadin et al., 2024) with a contrastive start"),
    "lrp_epsilon": _lrp_explainer("epsilon", "logit", "constant", "center",
                                  "LRP-epsilon (Bach et al., 2015) from the target logit"),
    "lrp_alpha1beta0": _lrp_explainer("alpha1beta0", "onehot", "constant", "center",
                                      "LRP-alpha1beta0 (z+ rule) from a one-hot start; a baseline: it fails "
                                      "the model-randomisation check (Sixt et al., 2020)"),
}
