"""Global Attribution Evaluation (GAE) of explanation maps (Vukadin et al. 2024, absLRP, section 3.2, eqs. 13-18).

``GAE = LC * C`` per image: local consistency (eq. 16) times contrastiveness (eq. 17). Higher is better, in [0, 1].

Choices (stated where the paper is ambiguous or silent):

- Every image of the batch is a positive: its own LC is computed and it is the positive of its own mosaic
  (the paper samples one positive per four images).
- Maps come from ``explain_fn(images, target) -> (N, h, w)``. As the paper says, only their positive part is used,
  normalised so that the maximum is 1; here after bilinear upsampling to the input size (H, W)
  (``align_corners=False``, the convention of :mod:`segfromxai.quality.faithfulness`). A map with no positive value gives
  NaN scores (L1 norms of 0).
- Output ``o``: the target logit (the paper's masking loss is ``|target output|``). The impact map of a step is
  ``|x * d|o|/dx|`` summed over channels, so a feature is a pixel (all channels), like the other map metrics.
- Gradient-guided masking: state ``t = 0 .. T-1`` has ``n_t = floor(t * H * W / T + 1/2)`` pixels set to 0 in the
  normalised input space (the mean colour: the paper's zero masking). From state ``t-1`` to ``t`` the
  ``n_t - n_{t-1}`` still unmasked pixels of largest (MoRF) or smallest (LeRF) impact at state ``t-1`` are added;
  ties in ascending raster index. So T steps give T forward/backward passes per curve (state 0 shared) and the
  fully masked state, identical in both curves, is never used (as in the authors' code; there MoRF re-selects
  among all pixels, which masks more than t/T, we keep the masked share at exactly t/T).
- Robustness (eq. 14): ``d^o_t = (o^Le_t - o^Mo_t) / o_0`` and ``d^A_t = sim^Le_t - sim^Mo_t`` (eq. 13 against
  the map of the intact image) over t = 1 .. T-1. NaN when ``o_0 = 0`` or when both difference curves are 0.
- Faithfulness (eq. 15): the combined impact map ``I_c`` is the LeRF sum of the T impact maps minus the MoRF sum,
  each divided by its own total (sum-to-one, as the authors' code; the paper only says "disparity").
- Mosaics: the positive goes to a seeded random quadrant (raster order 0 TL, 1 TR, 2 BL, 3 BR), the three
  negatives fill the others in order. Negatives are drawn (seeded, without replacement when possible, with it when
  fewer than 3 exist) among the batch images whose target differs from the positive's, or given. Each of the four
  images is resized to its quadrant (rows H//2 and H - H//2, columns alike) with antialiased bilinear interpolation,
  so the mosaic has the model's input size. An image with no other-class image in the batch gets NaN C and GAE.
- Scoring map (eq. 17): 1 in the positive quadrant, ``2 s[c_n] / s[c_p] - 1`` in a negative quadrant, with ``s`` the
  softmax of the positive image, ``c_p`` the target and ``c_n`` the model's top-1 class of the negative (the
  paper's "predicted respective classes"), clipped at 1 (the paper's ``c_p`` is the top-1 class, so the value
  never exceeds 1 there); computed as ``2 exp(min(l_n - l_p, 0)) - 1`` from the logits ``l``.
- Also returned: ``positive_share``, the share of the positive map mass in the positive quadrant (Focus-like,
  0.25 for a uniform map).

Degenerate cases: a constant map has ``sim = 1`` at every step, so ``d^A = 0``, ``LC_R = -1`` exactly (when
``d^o != 0``), ``LC = max(0, (LC_F - 1) / 2) = 0`` and GAE = 0 exactly, as the paper's constant baseline.
For any map, ``LC <= 2 |d^A|_1 / (|d^o|_1 + |d^A|_1)``, so a map barely changing along the curves scores near 0.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.hooks import count_forwards
from .faithfulness import Model, as_maps, check_positive_int
from ..ops.resize import upsample_maps
from .metrics import finite_mean

ExplainFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCORES = ("gae", "local_consistency", "robustness", "faithfulness", "contrastiveness", "positive_share")


def _logits(model: Model, images: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"model must return logits ({images.shape[0]}, K), got {tuple(logits.shape)}")
    return logits


def _output_and_impact(model: Model, images: torch.Tensor, target: torch.Tensor,
                       batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target logits (N,), logits (N, K) and impact maps |x * d|o|/dx| summed over channels (N, H, W), float64."""
    outs, all_logits, impacts = [], [], []
    for idx in torch.arange(len(images), device=images.device).split(batch_size):
        with torch.enable_grad():
            inp = images[idx].detach().requires_grad_(True)
            logits = _logits(model, inp)
            out = logits.gather(1, target[idx, None])[:, 0]
            (grad,) = torch.autograd.grad(out.abs().sum(), inp)
        outs.append(out.detach().double())
        all_logits.append(logits.detach().double())
        impacts.append((inp.detach() * grad).abs().sum(1).double())
    return torch.cat(outs), torch.cat(all_logits), torch.cat(impacts)


def _explain(explain_fn: ExplainFn, images: torch.Tensor, target: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, H, W) float64 maps: upsampled to the input size, positive part, maximum 1 (all-zero maps stay 0)."""
    return _prepare(torch.cat([torch.as_tensor(explain_fn(images[idx], target[idx])).detach()
                               for idx in torch.arange(len(images), device=images.device).split(batch_size)]),
                    images)


def _prepare(maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Maps of ``images`` as GAE uses them: (N, H, W) float64 at the input size, positive part, maximum 1."""
    m = as_maps(torch.as_tensor(maps).detach(), len(images))
    a = upsample_maps(m.to(images.device, torch.float64), tuple(images.shape[-2:])).clamp_min(0)
    peak = a.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, a / torch.where(peak > 0, peak, torch.ones_like(peak)), a)


def _grow(mask: torch.Tensor, impact: torch.Tensor, count: int, most: bool) -> torch.Tensor:
    """Add the ``count`` unmasked pixels of largest (``most``) or smallest impact to the (N, P) mask."""
    key = impact.masked_fill(mask, -torch.inf if most else torch.inf)
    order = torch.sort(key, dim=1, descending=most, stable=True).indices[:, :count]
    return mask.scatter(1, order, True)


def _similarity(a0: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Eq. 13 per image of non-negative (N, H, W) maps: 1 - |a0 - at|_1 / (|a0|_1 + |at|_1); NaN for two zero maps."""
    return 1 - (a0 - at).abs().sum((1, 2)) / (a0.sum((1, 2)) + at.sum((1, 2)))


def _quadrants(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(h, w) quadrant index in raster order: rows < h // 2 are on top, columns < w // 2 on the left."""
    rows = (torch.arange(h, device=device) >= h // 2).long()
    cols = (torch.arange(w, device=device) >= w // 2).long()
    return 2 * rows[:, None] + cols[None, :]


def make_mosaics(quads: torch.Tensor) -> torch.Tensor:
    """2x2 mosaics of the size of the inputs.

    Parameters
    ----------
    quads : torch.Tensor
        Float (N, 4, C, H, W), four images per mosaic in raster quadrant order (0 TL, 1 TR, 2 BL, 3 BR).

    Returns
    -------
    torch.Tensor
        (N, C, H, W); quadrant q holds image q resized by antialiased bilinear interpolation to (H // 2 or
        H - H // 2) x (W // 2 or W - W // 2), as :func:`_quadrants` splits the grid.
    """
    h, w = quads.shape[-2:]
    hs, ws = (h // 2, h - h // 2), (w // 2, w - w // 2)
    rows = [torch.cat([F.interpolate(quads[:, 2 * r + c], size=(hs[r], ws[c]), mode="bilinear",
                                     align_corners=False, antialias=True) for c in range(2)], dim=3) for r in range(2)]
    return torch.cat(rows, dim=2)


def contrastiveness(mosaic_maps: torch.Tensor | np.ndarray, quadrant_scores: torch.Tensor | np.ndarray,
                    positive_quadrant: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contrastiveness (eq. 17) and the positive quadrant's share of maps computed on mosaics.

    Parameters
    ----------
    mosaic_maps : (B, h, w) finite maps on the mosaics; only the positive part counts, quadrants split as
        :func:`make_mosaics` does at (h, w).
    quadrant_scores : (B, 4) scoring-map value per quadrant (1 for the positive, in [-1, 1]).
    positive_quadrant : (B,) integer in 0..3.

    Returns
    -------
    (contrastiveness, positive_share) : float64 (B,) each; ``max(0, sum(A * S) / |A|_1)`` in [0, 1] and
        ``sum of A in the positive quadrant / |A|_1`` in [0, 1] (0.25 for a uniform map on an even grid).
        NaN where the map has no positive value. Higher is better.
    """
    a = as_maps(mosaic_maps).double().clamp_min(0)
    s = torch.as_tensor(quadrant_scores, dtype=torch.float64, device=a.device)
    pos = torch.as_tensor(positive_quadrant, device=a.device).long()
    quad = _quadrants(*a.shape[1:], device=a.device)
    total = a.sum((1, 2))
    weighted = (a * s[:, quad]).sum((1, 2))
    share = (a * (quad[None] == pos[:, None, None])).sum((1, 2))
    return (weighted / total).clamp_min(0).cpu().numpy(), (share / total).cpu().numpy()


def _check_arguments(x: torch.Tensor, target: torch.Tensor, steps: int, negatives: torch.Tensor | None,
                     batch_size: int, maps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check :func:`gae`'s arguments; return the target as a tensor and ``maps`` as (B, h, w) on the CPU (or None)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    target = torch.as_tensor(target)
    if target.shape != (x.shape[0],) or target.is_floating_point():
        raise ValueError(f"target must be an integer tensor ({x.shape[0]},), got {target.dtype} {tuple(target.shape)}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("steps", steps)
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    b_count = x.shape[0]
    if negatives is not None and (negatives.ndim != 5 or negatives.shape[:2] != (b_count, 3)
                                  or negatives.shape[2:] != x.shape[1:]):
        raise ValueError(f"negatives must be (B, 3, C, H, W) = ({b_count}, 3, {', '.join(map(str, x.shape[1:]))}), "
                         f"got {tuple(negatives.shape)}")
    if maps is not None:
        maps = as_maps(torch.as_tensor(maps).detach().cpu(), b_count)
    return target, maps


def _negatives(model: Model, x: torch.Tensor, target: torch.Tensor, logits: torch.Tensor,
               negatives: torch.Tensor | None, rng: np.random.Generator,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Three negatives per image (given, or drawn from other-target batch images): images, logits, batch indices."""
    b_count = len(x)
    neg_idx = np.full((b_count, 3), -1)
    if negatives is None:
        tgt = target.cpu().numpy()
        for b in range(b_count):
            cand = np.flatnonzero(tgt != tgt[b])
            if cand.size:
                neg_idx[b] = rng.choice(cand, 3, replace=cand.size < 3)
        safe = torch.as_tensor(np.where(neg_idx >= 0, neg_idx, np.arange(b_count)[:, None]), device=x.device)
        return x[safe], logits[safe], neg_idx
    neg_images = negatives.detach().to(x.device, x.dtype)
    with torch.no_grad():
        flat = neg_images.flatten(0, 1)
        chunks = torch.arange(len(flat), device=x.device).split(batch_size)
        neg_logits = torch.cat([_logits(model, flat[i]).double() for i in chunks]).view(b_count, 3, -1)
    return neg_images, neg_logits, neg_idx


def _mosaics_and_scores(x: torch.Tensor, target: torch.Tensor, logits: torch.Tensor, neg_images: torch.Tensor,
                        neg_logits: torch.Tensor, pos_q: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mosaics (B, C, H, W) with the positive in quadrant ``pos_q`` and the scoring-map value per quadrant (B, 4)."""
    b_count = len(x)
    l_pos = logits.gather(1, target[:, None])
    l_neg = logits.gather(1, neg_logits.argmax(-1))
    neg_scores = 2 * torch.exp((l_neg - l_pos).clamp_max(0)) - 1
    others = torch.as_tensor([[q for q in range(4) if q != p] for p in pos_q], device=x.device)
    scores = torch.ones(b_count, 4, dtype=torch.float64, device=x.device).scatter(1, others, neg_scores)
    quads = torch.empty(b_count, 4, *x.shape[1:], dtype=x.dtype, device=x.device)
    rows = torch.arange(b_count, device=x.device)
    quads[rows, torch.as_tensor(pos_q, device=x.device)] = x
    quads[rows[:, None], others] = neg_images
    return make_mosaics(quads), scores


def _masked_states(model: Model, xc: torch.Tensor, tc: torch.Tensor, o0: torch.Tensor, impact0: torch.Tensor,
                   counts: list[int], batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """MoRF and LeRF masking of a chunk: outputs (2, c, T), masked inputs of t = 1 .. T-1 and summed impacts."""
    c, _, h, w = xc.shape
    masks = torch.zeros(2, c, h * w, dtype=torch.bool, device=xc.device)
    impact = impact0.flatten(1).expand(2, c, h * w)
    impact_sum = impact.clone()
    outs, states = [o0.expand(2, c)], []
    for t in range(1, len(counts)):
        new = counts[t] - counts[t - 1]
        masks = torch.stack([_grow(masks[0], impact[0], new, True), _grow(masks[1], impact[1], new, False)])
        xs = torch.where(masks.view(2 * c, 1, h, w), torch.zeros((), dtype=xc.dtype, device=xc.device),
                         xc.repeat(2, 1, 1, 1))
        o, _, imp = _output_and_impact(model, xs, tc.repeat(2), batch_size)
        outs.append(o.view(2, c))
        impact = imp.view(2, c, h * w)
        impact_sum = impact_sum + impact
        states.append(xs)
    return torch.stack(outs, -1), states, impact_sum


def _chunk_curves(model: Model, explain_fn: ExplainFn, xc: torch.Tensor, tc: torch.Tensor, o0: torch.Tensor,
                  impact0: torch.Tensor, mosaics: torch.Tensor, maps: torch.Tensor | None, counts: list[int],
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output and similarity curves (c, 2, T), faithfulness (c,) and mosaic maps (c, H, W) of a chunk, on the CPU."""
    c, _, h, w = xc.shape
    steps = len(counts)
    outs, states, impact_sum = _masked_states(model, xc, tc, o0, impact0, counts, batch_size)
    a0 = _explain(explain_fn, xc, tc, batch_size) if maps is None else _prepare(maps, xc)
    rest = _explain(explain_fn, torch.cat([mosaics, *states]), tc.repeat(2 * steps - 1), batch_size)
    steps_maps = rest[c:].view(steps - 1, 2, c, h, w)
    sims = [_similarity(a0, a0).expand(2, c)] + [torch.stack([_similarity(a0, s) for s in m]) for m in steps_maps]
    share = impact_sum / impact_sum.sum(-1, keepdim=True)
    combined = torch.sign(share[1] - share[0]).view(c, h, w)
    faithfulness = ((a0 * combined).sum((1, 2)) / a0.sum((1, 2))).cpu()
    return outs.permute(1, 0, 2).cpu(), torch.stack(sims, -1).permute(1, 0, 2).cpu(), faithfulness, rest[:c]


def _result(out_curves: torch.Tensor, sim_curves: torch.Tensor, faithfulness: np.ndarray,
            mosaic_maps: torch.Tensor, scores: torch.Tensor, pos_q: np.ndarray, neg_idx: np.ndarray,
            drawn: bool) -> dict:
    """:func:`gae`'s result dict from the curves, faithfulness, mosaic maps and quadrant scores (eqs. 14-17)."""
    out_norm = out_curves / out_curves[:, :1, :1]
    d_o = out_norm[:, 1, 1:] - out_norm[:, 0, 1:]
    d_a = sim_curves[:, 1, 1:] - sim_curves[:, 0, 1:]
    robustness = (1 - 2 * (d_o - d_a).abs().sum(1) / (d_o.abs().sum(1) + d_a.abs().sum(1))).numpy()
    local = np.maximum((robustness + faithfulness) / 2, 0.0)
    contrast, share = contrastiveness(mosaic_maps, scores, pos_q)
    if drawn:
        contrast[neg_idx[:, 0] < 0], share[neg_idx[:, 0] < 0] = np.nan, np.nan
    result = {"gae": local * contrast, "local_consistency": local, "robustness": robustness,
              "faithfulness": faithfulness, "contrastiveness": contrast, "positive_share": share}
    result["mean"] = {k: finite_mean(v) for k, v in result.items()}
    result.update(output_curves=out_norm.numpy(), similarity_curves=sim_curves.numpy(), positive_quadrant=pos_q,
                  negative_index=neg_idx, quadrant_scores=scores.cpu().numpy())
    return result


def gae(model: Model, explain_fn: ExplainFn, x: torch.Tensor, target: torch.Tensor, *, steps: int = 10,
        negatives: torch.Tensor | None = None, batch_size: int = 64, seed: int = 0,
        maps: torch.Tensor | None = None) -> dict:
    """Global Attribution Evaluation of an explainer on a batch (Vukadin et al. 2024); see the module docstring.

    Parameters
    ----------
    model : callable
        Maps a float tensor (N, C, H, W) of normalised inputs to logits (N, K); must be differentiable in its
        input. Used as given (put it in eval mode); parameter gradients are left untouched.
    explain_fn : callable
        ``explain_fn(images (N, C, H, W), target (N,) long) -> maps (N, h, w)``, finite, higher = more relevant.
        E.g. ``lambda x, t: explain_with_logits(model, x, {"gradcam": {}}, t)[0]["gradcam"]``.
    x : torch.Tensor
        Float (B, C, H, W), the normalised model input.
    target : torch.Tensor
        Integer (B,), the class explained per image.
    steps : int
        T >= 2 masking steps (the paper uses 10).
    negatives : torch.Tensor, optional
        Float (B, 3, C, H, W), three negatives per image; default: drawn from the batch (other targets).
    batch_size : int
        Images per model call and per ``explain_fn`` call.
    seed : int
        Seeds the positive quadrants and the choice of negatives (NumPy ``default_rng``).
    maps : torch.Tensor, optional
        (B, h, w) explanations of the intact images ``x`` already computed by ``explain_fn`` (e.g. in a shared
        pass); saves B of the 2 T B explanations. Default: ``explain_fn(x, target)``.

    Returns
    -------
    dict
        Float64 (B,) arrays for each name in ``SCORES`` (``gae``, ``local_consistency`` in [0, 1], ``robustness``
        and ``faithfulness`` in [-1, 1], ``contrastiveness`` and ``positive_share`` in [0, 1]; NaN where
        undefined); ``mean``: {name: mean over images with NaN skipped, NaN if none}; ``output_curves`` and
        ``similarity_curves``: (B, 2, T) for [MoRF, LeRF], outputs divided by o_0; ``positive_quadrant`` (B,);
        ``negative_index`` (B, 3) batch indices (-1 when given or none); ``quadrant_scores`` (B, 4);
        ``forward_images``: images through the model's forward (``explain_fn``'s included) when the model is an
        ``nn.Module`` (counted by :func:`segfromxai.models.hooks.count_forwards`).
    """
    target, maps = _check_arguments(x, target, steps, negatives, batch_size, maps)
    b_count, _, h, w = x.shape
    x, target = x.detach(), target.to(x.device, torch.long)
    net = model if isinstance(model, nn.Module) else getattr(model, "module", None)
    with count_forwards(net) if isinstance(net, nn.Module) else nullcontext() as counter:
        o0, logits, impact0 = _output_and_impact(model, x, target, batch_size)
        rng = np.random.default_rng(seed)
        pos_q = rng.integers(0, 4, size=b_count)
        neg_images, neg_logits, neg_idx = _negatives(model, x, target, logits, negatives, rng, batch_size)
        mosaics, scores = _mosaics_and_scores(x, target, logits, neg_images, neg_logits, pos_q)
        counts = [(2 * t * h * w + steps) // (2 * steps) for t in range(steps)]
        out_curves = torch.empty(b_count, 2, steps, dtype=torch.float64)
        sim_curves = torch.empty(b_count, 2, steps, dtype=torch.float64)
        lc_f, c_maps = [], []
        for idx in torch.arange(b_count, device=x.device).split(batch_size):
            out_c, sim_c, faith_c, maps_c = _chunk_curves(model, explain_fn, x[idx], target[idx], o0[idx],
                                                          impact0[idx], mosaics[idx],
                                                          None if maps is None else maps[idx.cpu()], counts,
                                                          batch_size)
            out_curves[idx.cpu()], sim_curves[idx.cpu()] = out_c, sim_c
            lc_f.append(faith_c)
            c_maps.append(maps_c)
    result = _result(out_curves, sim_curves, torch.cat(lc_f).numpy(), torch.cat(c_maps), scores, pos_q, neg_idx,
                     drawn=negatives is None)
    if counter is not None:
        result["forward_images"] = counter.images
    return result
