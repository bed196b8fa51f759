"""Matmul floor of the LRP rules on the embedded model (batch 4, 1 thread): the forward, plus only the matmuls each
rule needs, on random tensors of the real shapes; against fwd+bwd to the input. CPU clock, best of 3 interleaved.

    .venv/bin/python bench/bench_lrp_floor.py

abslrp: two relevance passes (contrastive start), W+ and W- side by side (2 matmuls per linear layer and pass) and
the attention passes; lrp_epsilon: one pass, 1 matmul per linear layer, constant attention; Chefer's lrp: the
forward and backward (a backward to the input stands in for the backward to the attention maps), the alpha1beta0
denominator |W| |x| (1 matmul) and one pass of 2. What an engine costs above these is elementwise work and copies.
"""
import time

import torch
torch.set_num_threads(1)
from segfromxai.models.model import load_model
m = load_model().module
B, N, C, H = 4, 197, 384, 6
hd = C // H
g = torch.Generator().manual_seed(0)
x = torch.randn(B, 3, 196, 196, generator=g)
lin = [(blk.attn.qkv.weight, blk.attn.proj.weight, blk.mlp.fc1.weight, blk.mlp.fc2.weight) for blk in m.blocks]
def base():
    xi = x.clone().requires_grad_(True); y = m(xi)
    torch.autograd.grad(y.gather(1, y.argmax(1, keepdim=True)).sum(), xi)
def fwd():
    with torch.no_grad(): m(x)
_T = {}
def R(*shape):
    if shape not in _T:
        _T[shape] = torch.randn(*shape, generator=g)
    return _T[shape]
_W = {}
def wide(w, parts):
    if (id(w), parts) not in _W:
        _W[id(w), parts] = torch.cat([w] * parts, 1) if parts > 1 else w
    return _W[id(w), parts]
def rule(P, parts, denom, qk=True):
    """parts: 1 (epsilon: s @ W) or 2 (W+ and W- side by side); denom: alpha1beta0's |W||x| forward matmul."""
    with torch.no_grad():
        for ws in lin:
            for w in ws:
                o, i = w.shape
                R(P * B * N, o) @ wide(w, parts)
                if denom:
                    R(B * N, i) @ w.t()
            a = R(B, H, N, N); sv = R(P, B, H, N, hd); sa = R(P, B, H, N, N)
            for p in range(P):
                a.transpose(-2, -1) @ sv[p]              # r_v
                if qk:
                    sv[p] @ sv[p].transpose(-2, -1)      # r_a
                    sa[p] @ R(B, H, N, hd * parts)
                    sa[p].transpose(-2, -1) @ R(B, H, N, hd * parts)
            if qk:
                R(B, H, N, hd) @ R(B, H, hd, N)  # logits
calls = {"base": base, "fwd": fwd,
         "abslrp floor": lambda: (fwd(), rule(2, 2, False)),
         "lrp_epsilon floor": lambda: (fwd(), rule(1, 1, False, qk=False)),
         "chefer lrp floor": lambda: (base(), rule(1, 2, True))}
best = {k: 1e9 for k in calls}
for r in range(4):
    for k, f in calls.items():
        t0 = time.process_time(); f(); t = time.process_time() - t0
        if r: best[k] = min(best[k], t)
for k, t in best.items():
    print(f"{k:20s} {t:.3f} s  {t / best['base']:.2f}x fwd+bwd(input)")
