"""Slow, plain float64 REFERENCE implementation of the segfromxai explainers (test helper, not a test file).

Written independently from /work/spec/explainers_spec.md (it never imports segfromxai.explainers) so that
tests can compare the fast implementation against it. Style on purpose:
  * works on a float64 deep copy of the model, no hooks; the timm ViT forward is re-done explicitly from
    the modules' parameters and checked against ``model.double()(x)`` (1e-8) before use;
  * gradients come from torch.autograd on that explicit forward;
  * every LRP step is written in explicit matrix form: contributions c[..., i, j] = x_i * L_ji (dense
    LayerNorm centering matrices, dense diag() matrices, the patch conv as unfold + matrix), then
    R_i = sum_j num(c_ij) / den_j * R_j; each matrix form is checked against the recorded forward value.
Returned maps are float64, shapes as in the spec ((B,gh,gw) token maps, (B,H,W) pixel maps).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["reference_maps", "reference_input_relevance", "reference_forward"]

_RULES = {"epsilon": "epsilon", "lrp_epsilon": "epsilon", "alpha1beta0": "alpha1beta0",
          "lrp_alpha1beta0": "alpha1beta0", "abslrp": "abslrp", "abs": "abslrp"}
_RULE_DEFAULTS = {"epsilon": dict(epsilon=1e-6, attention="constant", layernorm="center"),
                  "alpha1beta0": dict(epsilon=1e-9, attention="constant", layernorm="center"),
                  "abslrp": dict(epsilon=1e-9, attention="full", layernorm="detach")}


class _NS(dict):
    __getattr__ = dict.__getitem__


def _close(z, z_fwd, what):
    tol = 1e-8 * (1.0 + float(z_fwd.abs().max()) if z_fwd.numel() else 1.0)
    err = float((z - z_fwd).abs().max()) if z.numel() else 0.0
    assert err <= tol, f"reference: matrix form of {what} differs from the forward by {err:.3g}"


# ----------------------------------------------------------------------------------------- structure checks
def _check_supported(m):
    if getattr(m, "attn_pool", None) is not None or m.global_pool not in ("token", "avg"):
        raise NotImplementedError(f"attn_pool / global_pool={m.global_pool!r}")
    if m.global_pool == "avg" and getattr(m, "pool_include_prefix", False):
        raise NotImplementedError("pool_include_prefix")
    if getattr(m, "dist_token", None) is not None:
        raise NotImplementedError("dist_token")
    if not isinstance(m.patch_embed.norm, nn.Identity):
        raise NotImplementedError("patch_embed.norm")
    if m.patch_embed.proj.groups != 1:
        raise NotImplementedError("patch_embed.proj (groups)")
    if not isinstance(m.head, nn.Linear):
        raise NotImplementedError("head (must be nn.Linear)")
    for name in ("norm_pre", "norm", "fc_norm"):
        if not isinstance(getattr(m, name), (nn.Identity, nn.LayerNorm)):
            raise NotImplementedError(name)
    for l, blk in enumerate(m.blocks):
        p = f"blocks.{l}"
        if type(blk).__name__ != "Block":
            raise NotImplementedError(f"{p} ({type(blk).__name__})")
        at = blk.attn
        for sub in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(at, sub, nn.Identity()), nn.Identity):
                raise NotImplementedError(f"{p}.attn.{sub}")
        if getattr(at, "gate", None) is not None:
            raise NotImplementedError(f"{p}.attn.gate")
        if type(blk.mlp).__name__ != "Mlp" or not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
            raise NotImplementedError(f"{p}.mlp")
        for name in ("norm1", "norm2"):
            if not isinstance(getattr(blk, name), nn.LayerNorm):
                raise NotImplementedError(f"{p}.{name}")
        for name in ("ls1", "ls2"):
            if not (isinstance(getattr(blk, name), nn.Identity) or hasattr(getattr(blk, name), "gamma")):
                raise NotImplementedError(f"{p}.{name}")


# ----------------------------------------------------------------------------------------- explicit forward
def _ln_fwd(ln, x):
    """LayerNorm from its parameters; returns (output, record or None for Identity)."""
    if isinstance(ln, nn.Identity):
        return x, None
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu) ** 2).mean(-1, keepdim=True).add(ln.eps).sqrt()
    u = (x - mu) / sigma
    y = u if ln.weight is None else u * ln.weight
    y = y if ln.bias is None else y + ln.bias
    return y, _NS(x=x, mu=mu, sigma=sigma, u=u, y=y, w=ln.weight, b=ln.bias)


def _gamma(ls):
    return None if isinstance(ls, nn.Identity) else ls.gamma


def _forward(m, x):
    """Explicit float64 ViT forward; returns a record with every intermediate (autograd-connected)."""
    B, _, H, W = x.shape
    pe, conv = m.patch_embed, m.patch_embed.proj
    xp = x
    if getattr(pe, "dynamic_img_pad", False):
        ph, pw = pe.patch_size
        xp = F.pad(x, (0, (-W) % pw, 0, (-H) % ph))
    e = F.conv2d(xp, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    gh, gw = e.shape[-2:]
    e = e.flatten(2).transpose(1, 2)                                     # (B, gh*gw, C), row-major grid
    npt = m.num_prefix_tokens
    prefix = [p.expand(B, -1, -1) for p in (m.cls_token, m.reg_token) if p is not None]
    assert sum(p.shape[1] for p in prefix) == npt
    pos = m.pos_embed
    if pos is not None and getattr(m, "dynamic_img_size", False):
        from timm.layers import resample_abs_pos_embed
        pos = resample_abs_pos_embed(pos, new_size=(gh, gw), old_size=pe.grid_size,
                                     num_prefix_tokens=0 if m.no_embed_class else npt)
    if pos is None:
        pos_patch, tok0 = None, torch.cat(prefix + [e], 1)
    elif m.no_embed_class:
        pos_patch, tok0 = pos, torch.cat(prefix + [e + pos], 1)
    else:
        pos_patch, tok0 = pos[:, npt:], torch.cat(prefix + [e], 1) + pos
    h, ln_pre = _ln_fwd(m.norm_pre, tok0)
    N = h.shape[1]
    outs = {"norm_pre": h}
    blocks = []
    for l, blk in enumerate(m.blocks):
        at, mlp, r = blk.attn, blk.mlp, _NS(x=h)
        nh, hd = at.num_heads, at.head_dim
        r.n1, r.ln1 = _ln_fwd(blk.norm1, h)
        r.qkv = F.linear(r.n1, at.qkv.weight, at.qkv.bias)
        r.q, r.k, r.v = r.qkv.reshape(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4)
        r.scale = at.scale
        r.S = at.scale * (r.q @ r.k.transpose(-1, -2))
        ex = (r.S - r.S.amax(-1, keepdim=True)).exp()
        r.A = ex / ex.sum(-1, keepdim=True)                                 # (B, heads, N, N)
        r.O = r.A @ r.v
        r.o = r.O.transpose(1, 2).reshape(B, N, nh * hd)
        r.P = F.linear(r.o, at.proj.weight, at.proj.bias)
        r.g1 = _gamma(blk.ls1)
        r.P2 = r.P if r.g1 is None else r.P * r.g1
        r.x1 = h + r.P2
        r.n2, r.ln2 = _ln_fwd(blk.norm2, r.x1)
        r.hh = F.linear(r.n2, mlp.fc1.weight, mlp.fc1.bias)
        r.g = mlp.act(r.hh)
        r.mm = F.linear(r.g, mlp.fc2.weight, mlp.fc2.bias)
        r.g2 = _gamma(blk.ls2)
        r.M2 = r.mm if r.g2 is None else r.mm * r.g2
        r.x2 = r.x1 + r.M2
        r.mod = blk
        p = f"blocks.{l}."
        outs.update({p + "norm1": r.n1, p + "attn.qkv": r.qkv, p + "attn.proj": r.P, p + "attn": r.P,
                     p + "ls1": r.P2, p + "norm2": r.n2, p + "mlp.fc1": r.hh, p + "mlp.act": r.g,
                     p + "mlp.fc2": r.mm, p + "mlp": r.mm, p + "ls2": r.M2, f"blocks.{l}": r.x2})
        blocks.append(r)
        h = r.x2
    t, ln_f = _ln_fwd(m.norm, h)
    outs["norm"] = t
    pooled = t[:, 0] if m.global_pool == "token" else t[:, npt:].mean(1)
    f, ln_fc = _ln_fwd(m.fc_norm, pooled)
    y = F.linear(f, m.head.weight, m.head.bias)
    return _NS(x=x, xp=xp, e=e, pos_patch=pos_patch, ln_pre=ln_pre, blocks=blocks, t=t, ln_f=ln_f,
               pooled=pooled, ln_fc=ln_fc, f=f, y=y, outs=outs, gh=gh, gw=gw, npt=npt, N=N)


def _prepare(model, x):
    m = copy.deepcopy(model).double().eval()
    m.requires_grad_(False)
    _check_supported(m)
    return m, x.detach().to(torch.float64).clone()


def reference_forward(model, x, grad=False):
    """(float64 model copy, forward record); asserts the explicit logits equal model.double()(x) (1e-8)."""
    m, x = _prepare(model, x)
    with torch.no_grad():
        y_ref = m(x)
    with torch.set_grad_enabled(grad):
        fw = _forward(m, x.requires_grad_(grad))
    err = float((fw.y.detach() - y_ref).abs().max())
    assert err <= 1e-8 * max(1.0, float(y_ref.abs().max())), f"explicit forward mismatch {err:.3g}"
    return m, fw


def _targets(target, B):
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    return t.expand(B).clone() if t.numel() == 1 else t


def _score(fw, t):
    return fw.y.gather(1, t[:, None]).sum()                               # sum_b y[b, t_b] (the logit)


def _readout(m, fw, R):
    npt, B = fw.npt, R.shape[0]
    r = R[:, 0, npt:] if m.global_pool == "token" else R[:, npt:, npt:].mean(1)
    return r.reshape(B, fw.gh, fw.gw)


# ----------------------------------------------------------------------------------------- LRP, matrix form
def _den(rule, eps, z, cpos):
    if rule == "epsilon":
        return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)             # sign(0) := +1, z includes bias
    if rule == "alpha1beta0":
        return cpos + eps                                                 # sum_i c_ij^+ (bias excluded)
    return z.abs() + eps                                                  # abslrp, z includes bias


def _num(rule, c):
    return c if rule == "epsilon" else c.clamp(min=0)


def _lrp_linear(rule, eps, xs_Ls, bias, R, z_fwd, what):
    """z = sum_k L_k x_k + bias; c_k[..., i, j] = x_k[..., i] * L_k[..., j, i]; one pass per input, one den."""
    cs = [xk.unsqueeze(-1) * Lk.transpose(-1, -2) for xk, Lk in xs_Ls]
    z = sum(c.sum(-2) for c in cs) + (0 if bias is None else bias)
    _close(z, z_fwd, what)
    cps = [c.clamp(min=0) for c in cs]                                    # c_ij^+
    s = R / _den(rule, eps, z, sum(cp.sum(-2) for cp in cps))
    return [((c if rule == "epsilon" else cp) * s.unsqueeze(-2)).sum(-1) for c, cp in zip(cs, cps)]


def _diag(v):
    return torch.diag_embed(v)


def _ln_back(rule, eps, mode, st, R, what):
    if st is None:                                                        # Identity
        return R
    D = st.x.shape[-1]
    eye = torch.eye(D, dtype=R.dtype)
    if st.w is not None:                                                  # y = gamma*u + beta
        R = _lrp_linear(rule, eps, [(st.u, _diag(st.w))], st.b, R, st.y, what + " affine")[0]
    if mode == "center":                                                  # u = C x, C = (I - 11^T/D)/sigma
        Cm = (eye - torch.ones(D, D, dtype=R.dtype) / D) / st.sigma[..., None]
        return _lrp_linear(rule, eps, [(st.x, Cm)], None, R, st.u, what + " center")[0]
    if mode == "detach":                                                  # u = x/sigma - mu/sigma
        Lm = eye / st.sigma[..., None]
        return _lrp_linear(rule, eps, [(st.x, Lm)], (-st.mu / st.sigma).expand_as(st.x), R, st.u,
                           what + " detach")[0]
    raise ValueError(f"layernorm={mode!r}")


def _ls_back(rule, eps, gamma, inp, out, R, what):
    if gamma is None:
        return R
    return _lrp_linear(rule, eps, [(inp, _diag(gamma))], None, R, out, what)[0]


def _attn_back(rule, eps, attention, r, R_O, what):
    """O = A V per head, then (attention="full") S = scale q k^T; returns R_q, R_k, R_v, R_A (B,h,.,.)."""
    # O_id = sum_j A_ij V_jd (bilinear): contributions c[b,h,i,j,d] shared by the V- and A-pass
    c = r.A[..., :, :, None] * r.v[..., None, :, :]
    z = c.sum(-2)
    _close(z, r.O, what + " A@V")
    nc = _num(rule, c) * (R_O / _den(rule, eps, z, c.clamp(min=0).sum(-2)))[..., :, None, :]
    R_v = nc.sum(-3)                                                      # sum over i -> (B,h,j,d)
    R_A = nc.sum(-1)                                                      # sum over d -> (B,h,i,j)
    if attention == "full":                                               # softmax: R_S = R_A
        c = r.scale * r.q[..., :, None, :] * r.k[..., None, :, :]         # c[b,h,i,j,d] = scale q_id k_jd
        z = c.sum(-1)
        _close(z, r.S, what + " qk")
        nc = _num(rule, c) * (R_A / _den(rule, eps, z, c.clamp(min=0).sum(-1)))[..., None]
        R_q, R_k = nc.sum(-2), nc.sum(-3)
    elif attention == "constant":
        R_q, R_k = torch.zeros_like(R_v), torch.zeros_like(R_v)
    else:
        raise ValueError(f"attention={attention!r}")
    return R_q, R_k, R_v, R_A


def _block_back(rule, eps, attention, lnmode, r, R, what):
    B, N, C = r.x.shape
    I = torch.eye(C, dtype=R.dtype)
    lin = lambda inp, mod, Rz, z, w: _lrp_linear(rule, eps, [(inp, mod.weight)], mod.bias, Rz, z, what + w)[0]
    blk = r.mod
    # x2 = x1 + m' (residual: two passes, common den)
    R_x1, R_M2 = _lrp_linear(rule, eps, [(r.x1, I), (r.M2, I)], None, R, r.x2, what + " residual2")
    R_m = _ls_back(rule, eps, r.g2, r.mm, r.M2, R_M2, what + ".ls2")
    R_g = lin(r.g, blk.mlp.fc2, R_m, r.mm, ".mlp.fc2")
    R_h = R_g                                                             # GELU: identity rule
    R_n2 = lin(r.n2, blk.mlp.fc1, R_h, r.hh, ".mlp.fc1")
    R_x1 = R_x1 + _ln_back(rule, eps, lnmode, r.ln2, R_n2, what + ".norm2")
    # x1 = x + P'
    R_x, R_P2 = _lrp_linear(rule, eps, [(r.x, I), (r.P2, I)], None, R_x1, r.x1, what + " residual1")
    R_P = _ls_back(rule, eps, r.g1, r.P, r.P2, R_P2, what + ".ls1")
    R_o = lin(r.o, blk.attn.proj, R_P, r.P, ".attn.proj")
    nh, hd = r.q.shape[1], r.q.shape[-1]
    R_O = R_o.reshape(B, N, nh, hd).transpose(1, 2)                       # (B, heads, N, hd)
    R_q, R_k, R_v, R_A = _attn_back(rule, eps, attention, r, R_O, what)
    R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * nh * hd)
    R_n1 = lin(r.n1, blk.attn.qkv, R_qkv, r.qkv, ".attn.qkv")
    R_x = R_x + _ln_back(rule, eps, lnmode, r.ln1, R_n1, what + ".norm1")
    return R_x, R_A


def _lrp_pass(m, fw, R_y, rule, eps, attention, layernorm):
    """Returns (R at the input (B,3,H,W), [RA_l (B,heads,N,N)] in forward order)."""
    npt = fw.npt
    R_f = _lrp_linear(rule, eps, [(fw.f, m.head.weight)], m.head.bias, R_y, fw.y, "head")[0]
    R_pool = _ln_back(rule, eps, layernorm, fw.ln_fc, R_f, "fc_norm")
    R_t = torch.zeros_like(fw.t)
    if m.global_pool == "token":
        R_t[:, 0] = R_pool
    else:                                                                 # mean over patch tokens, L = 1/Np
        tp = fw.t[:, npt:].transpose(1, 2)                                # (B, C, Np)
        Lp = torch.full((1, tp.shape[-1]), 1.0 / tp.shape[-1], dtype=tp.dtype)
        R_tp = _lrp_linear(rule, eps, [(tp, Lp)], None, R_pool[..., None], fw.pooled[..., None], "pool")[0]
        R_t[:, npt:] = R_tp.transpose(1, 2)
    R = _ln_back(rule, eps, layernorm, fw.ln_f, R_t, "norm")
    RAs = []
    for l in reversed(range(len(fw.blocks))):
        R, R_A = _block_back(rule, eps, attention, layernorm, fw.blocks[l], R, f"blocks.{l}")
        RAs.insert(0, R_A)
    R = _ln_back(rule, eps, layernorm, fw.ln_pre, R, "norm_pre")
    R_e = R[:, npt:]                                                      # prefix-token relevance dropped
    e = fw.e
    if fw.pos_patch is not None:                                          # e + pos: L = I, bias = pos
        I = torch.eye(e.shape[-1], dtype=e.dtype)
        R_e = _lrp_linear(rule, eps, [(e, I)], fw.pos_patch, R_e, e + fw.pos_patch, "pos_embed")[0]
    conv = m.patch_embed.proj                                             # conv = unfold + matrix
    kw = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    patches = F.unfold(fw.xp, **kw).transpose(1, 2)                       # (B, Np, 3*kh*kw)
    Wm = conv.weight.reshape(conv.weight.shape[0], -1)
    R_patch = _lrp_linear(rule, eps, [(patches, Wm)], conv.bias, R_e, e, "patch_embed.proj")[0]
    R_x = F.fold(R_patch.transpose(1, 2), output_size=fw.xp.shape[-2:], **kw)
    H, W = fw.x.shape[-2:]
    return R_x[..., :H, :W], RAs


def _start_relevance(fw, t, start):
    y = fw.y.detach()
    R = torch.zeros_like(y)
    if start == "logit":
        R[torch.arange(len(t)), t] = y[torch.arange(len(t)), t]
    elif start == "onehot":
        R[torch.arange(len(t)), t] = 1.0
    elif start == "others":                                               # abslrp's second pass
        R.fill_(1.0 / (y.shape[1] - 1))
        R[torch.arange(len(t)), t] = 0.0
    else:                                                                 # contrastive, in one pass
        R.fill_(-1.0 / y.shape[1])
        R[torch.arange(len(t)), t] = 1.0
    return R


def _rule_params(rule, params):
    rule = _RULES[rule]
    p = dict(_RULE_DEFAULTS[rule])
    for k in list(params):
        if k in p:
            p[k] = params.pop(k)
    return rule, p


def reference_input_relevance(model, x, target, rule, **params):
    """LRP relevance (B,3,H,W) float64 at the preprocessed input, before the channel sum.
    rule: epsilon | alpha1beta0 | abslrp (or lrp_epsilon / lrp_alpha1beta0); params epsilon, attention,
    layernorm (rule defaults from the spec)."""
    rule, p = _rule_params(rule, params)
    if params:
        raise TypeError(f"unknown params {sorted(params)}")
    m, fw = reference_forward(model, x)
    t = _targets(target, x.shape[0])
    start = {"epsilon": "logit", "alpha1beta0": "onehot", "abslrp": "contrastive"}[rule]
    with torch.no_grad():
        R_x, _ = _lrp_pass(m, fw, _start_relevance(fw, t, start), rule, p["epsilon"], p["attention"],
                           p["layernorm"])
    return R_x


def _signed(s, sign):
    if sign == "positive":
        return s.clamp(min=0)
    if sign == "absolute":
        return s.abs()
    raise ValueError(f"sign={sign!r}")


# ----------------------------------------------------------------------------------------- public entry
def reference_maps(model, x, target, method, **params):
    """float64 maps of `method` (spec names); (B,gh,gw) for token methods, (B,H,W) for pixel methods."""
    B = x.shape[0]
    t = _targets(target, B)
    pop = params.pop
    if method == "abslrp":  # contrastive: target pass minus other-classes pass, each at unit L1 per image
        sign = pop("sign", "positive")
        rule, p = _rule_params(method, params)
        if params:
            raise TypeError(f"unknown params {sorted(params)}")
        m, fw = reference_forward(model, x)
        maps = []
        for start in ("onehot", "others"):
            with torch.no_grad():
                R_x, _ = _lrp_pass(m, fw, _start_relevance(fw, t, start), rule, p["epsilon"], p["attention"],
                                   p["layernorm"])
            s = R_x.sum(1)
            maps.append(s / s.abs().sum((1, 2), keepdim=True))
        return _signed(maps[0] - maps[1], sign)
    if method in ("lrp_epsilon", "lrp_alpha1beta0"):
        sign = pop("sign", "positive")
        return _signed(reference_input_relevance(model, x, t, method, **params).sum(1), sign)

    if method in ("gradcam", "hirescam"):
        layer = pop("layer", f"blocks.{len(model.blocks) - 1}.norm1")
    elif method == "gradxinput":
        sign = pop("sign", "positive")
    elif method == "rollout":
        fusion, ratio = pop("head_fusion", "mean"), pop("discard_ratio", 0.0)
    elif method == "lrp":
        rule = _RULES[pop("rule", "alpha1beta0")]
        eps, attention = pop("epsilon", 1e-6), pop("attention", "full")
        layernorm = pop("layernorm", "center")
    elif method not in ("saliency", "grad_rollout"):
        raise ValueError(f"unknown method {method!r}")
    start_layer = pop("start_layer", 0) if method in ("rollout", "grad_rollout", "lrp") else 0
    if params:
        raise TypeError(f"unknown params for {method}: {sorted(params)}")

    m, fw = reference_forward(model, x, grad=method != "rollout")
    score = _score(fw, t) if method != "rollout" else None
    L, N = len(fw.blocks), fw.N
    eye = torch.eye(N, dtype=torch.float64).expand(B, N, N)

    if method in ("gradcam", "hirescam"):
        if layer not in fw.outs:
            raise ValueError(f"layer {layer!r} not one of {sorted(fw.outs)}")
        a = fw.outs[layer]
        (g,) = torch.autograd.grad(score, a)
        a_p, g_p = a.detach()[:, fw.npt:], g[:, fw.npt:]
        if method == "gradcam":
            cam = (g_p.mean(1)[:, None, :] * a_p).sum(-1)
        else:
            cam = (g_p * a_p).sum(-1)
        return cam.clamp(min=0).reshape(B, fw.gh, fw.gw)

    if method in ("saliency", "gradxinput"):
        (g,) = torch.autograd.grad(score, fw.x)
        if method == "saliency":
            return g.abs().amax(1)
        return _signed((fw.x.detach() * g).sum(1), sign)

    if method == "rollout":
        R = eye.clone()
        for l in range(start_layer, L):
            A = fw.blocks[l].A
            Fl = {"mean": A.mean(1), "max": A.amax(1), "min": A.amin(1)}[fusion].clone()
            k = int(ratio * N * N)
            if k > 0:
                flat = Fl.reshape(B, N * N)
                idx = torch.topk(flat, k, dim=-1, largest=False).indices
                flat.scatter_(1, idx, 0.0)
                Fl = flat.reshape(B, N, N)
            At = Fl + eye
            At = At / At.sum(-1, keepdim=True)
            R = At @ R                                                    # later layers on the LEFT
        return _readout(m, fw, R)

    # grad_rollout / lrp: G_l = d score / d A_l
    G = torch.autograd.grad(score, [r.A for r in fw.blocks])
    if method == "grad_rollout":
        Abar = [(G[l] * fw.blocks[l].A.detach()).clamp(min=0).mean(1) for l in range(L)]
    else:
        with torch.no_grad():
            fw0 = _forward(m, fw.x.detach())
            _, RA = _lrp_pass(m, fw0, _start_relevance(fw0, t, "onehot"), rule, eps, attention, layernorm)
        Abar = [(G[l] * RA[l]).clamp(min=0).mean(1) for l in range(L)]
    R = eye.clone()
    for l in range(start_layer, L):
        R = R + Abar[l] @ R
    return _readout(m, fw, R)
