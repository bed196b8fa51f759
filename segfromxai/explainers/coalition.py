"""Perturbation on Feature Coalition (Hu, Zhu, Feng, Dakovic and Stankovic 2024, arXiv 2408.13397).

Two stages on the features ``F`` of one layer, captured in the shared forward pass (ViT patch tokens reshaped to the
model's token grid, or a CNN feature map):

1. **Coalitions** (:func:`feature_coalitions`): a 1x1 convolution, trained per image from a seeded random start,
   maps ``F`` to ``l`` response channels; each cell's coalition is its argmax channel. The head minimises the feature
   similarity loss (cross-entropy of the response to its own argmax) plus ``lambda`` times the spatial-continuity
   loss (L1 of the response's vertical and horizontal differences); coalitions merge as it trains, and it stops at
   ``k`` of them (``k`` to ``l`` remain if it runs out of updates first, as the paper allows).
2. **Perturbation** (:func:`coalition_perturbation`): a perturbation ``p = sigmoid(a)`` in (0, 1) blends the image
   with a substrate ``s`` (noise by default, or its blur, or zeros), ``x~ = x * (1 - p) + s * p``; Adam minimises
   ``L = L_r + mu * L_conf + v * L_c``: ``L_r = mean(1 - p)`` (perturb as much as possible), ``L_conf`` a hinge that
   is 0 exactly while the target class stays top-1 on ``x~``, and ``L_c`` the coalition-consistency loss, a
   Gaussian-weighted (``sigma``) squared difference between neighbouring perturbation values of the same coalition.
   The saliency map is ``1 - p``: what must stay intact for the decision.

Passes over the batch of B images (all optimised together; each image's loss and parameters are its own, so a
batch gives the same maps as single calls): the shared pass (forward + one backward, as ``Needs.layers`` implies),
then ``steps + 1`` forward and ``steps`` backward passes of the model; the clustering runs up to ``cluster_steps``
updates of the per-image 1x1 head on the captured features and no pass of the model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..models.model import is_vit, tokens_to_grid
from ..params import Fraction, NonNegative, Positive, PositiveInt
from .core import Explainer, explainer, Needs, Pass
from ..models.model import default_layer
from ..models.hooks import eval_mode

GRIDS = ("pixel", "feature")
SUBSTRATES = ("blur", "zeros", "noise")


def layer_features(ps: Pass, layer: str) -> torch.Tensor:
    """The captured output of ``layer`` as a (B, C, h, w) map: a CNN map as is, ViT patch tokens (prefix tokens
    dropped) reshaped row-major to the model's token grid."""
    a = ps.captured.outputs[layer]
    if a.ndim == 4:
        return a
    if a.ndim == 3 and is_vit(ps.model):
        grid = tokens_to_grid(ps.model, a, tuple(ps.x.shape[-2:]))
        return grid.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"coalition layer {layer!r} gives a tensor of shape {tuple(a.shape)}; "
                     "expected CNN (B, C, h, w) or ViT tokens (B, N, C)")


def _uniform(g: torch.Generator, shape: tuple[int, ...], fan_in: int, device: torch.device) -> torch.Tensor:
    return ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)).float().to(device)


def _mean_abs_diff(r: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-image mean |r[i+1] - r[i]| along ``dim`` of (B, l, h, w); 0 where that side has one cell."""
    n = r.shape[dim]
    if n < 2:
        return r.new_zeros(r.shape[0])
    return (r.narrow(dim, 1, n - 1) - r.narrow(dim, 0, n - 1)).abs().flatten(1).mean(1)


def feature_coalitions(features: torch.Tensor, *, max_clusters: int = 100, min_clusters: int = 3,
                       steps: int = 1000, lr: float = 0.1, continuity_coef: float = 1.0,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsupervised coalitions of feature cells: the paper's similarity + spatial-continuity clustering.

    Parameters
    ----------
    features : (B, C, h, w) feature map, any float dtype; standardised per image and channel over the cells.
    max_clusters : ``l``, the head's response channels, the most coalitions there can be.
    min_clusters : ``k``. An image's labels are fixed, and its head stops learning, at the first evaluation with
        at most ``k`` distinct labels; if that evaluation has fewer than ``k``, the previous one's labels are kept,
        so an image ends with between ``k`` and ``l`` coalitions (fewer only if it has fewer cells, or already starts
        below ``k``).
    steps : most SGD updates of the heads (momentum 0.9, learning rate ``lr``); it stops early once every image is
        fixed. ``steps + 1`` evaluations at most, the first on the random start.
    continuity_coef : ``lambda``, the weight of the spatial-continuity loss.
    seed : seeds a local ``torch.Generator`` for the heads' initial weights (uniform, +-1/sqrt(C)).

    Returns
    -------
    labels : (B, h, w) int64 coalition per cell, numbered 0, 1, ... per image in order of their channel.
    history : (evaluations,) float32 batch-mean loss ``L_sim + lambda * L_con`` at each evaluation.

    Notes
    -----
    The head of each image is the paper's added 1x1 convolution, ``r = W f + b`` (l x C weights per image, batched
    as a grouped convolution), on the frozen features of the model's layer. ``L_sim`` is the mean cross-entropy of
    ``r`` against its own argmax, ``L_con`` the mean L1 of its vertical plus horizontal differences. No batch norm on
    ``r``: over a grid of a few hundred cells it keeps nearly every channel winning somewhere and the count stalls
    (about 50 of 64 cells on two-region features); the stop at ``k`` keeps the coalitions from collapsing into one.
    """
    if not 1 <= min_clusters <= max_clusters:
        raise ValueError(f"need 1 <= min_clusters <= max_clusters, got {min_clusters} and {max_clusters}")
    b, c, h, w = features.shape
    n, dev = max_clusters, features.device
    x = F.instance_norm(features.detach().float()).reshape(1, b * c, h, w)
    g = torch.Generator().manual_seed(int(seed))
    weight, bias = _uniform(g, (b * n, c, 1, 1), c, dev), _uniform(g, (b * n,), c, dev)
    opt = torch.optim.SGD([weight.requires_grad_(True), bias.requires_grad_(True)], lr=lr, momentum=0.9)
    labels = torch.zeros(b, h, w, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    history, prev = [], None
    with torch.enable_grad():
        for step in range(steps + 1):
            r = F.conv2d(x, weight, bias, groups=b).reshape(b, n, h, w)
            lab = r.argmax(1)
            count = F.one_hot(lab.flatten(1), n).amax(1).sum(1)
            new = ~done & (count <= min_clusters)
            fixed = lab if prev is None else torch.where((count < min_clusters)[:, None, None], prev, lab)
            labels[new] = fixed[new]
            done |= new
            loss = (F.cross_entropy(r, lab, reduction="none").flatten(1).mean(1)
                    + continuity_coef * (_mean_abs_diff(r, 2) + _mean_abs_diff(r, 3)))
            history.append(loss.detach().mean())
            if done.all() or step == steps:
                break
            prev = lab
            opt.zero_grad(set_to_none=True)
            (loss * ~done).sum().backward()
            opt.step()
    labels[~done] = lab[~done]
    for i in range(b):
        labels[i] = torch.unique(labels[i], return_inverse=True)[1]
    return labels, torch.stack(history).float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred by a separable Gaussian of ``sigma`` pixels, each kernel row renormalised at the borders
    (so no padding is assumed and any sigma fits any size)."""
    if not sigma > 0:
        raise ValueError(f"blur_sigma must be > 0, got {sigma}")

    def mat(size: int) -> torch.Tensor:
        i = torch.arange(size, dtype=x.dtype, device=x.device)
        k = torch.exp(-(i[:, None] - i[None]) ** 2 / (2 * sigma**2))
        return k / k.sum(1, keepdim=True)

    return torch.einsum("hi,bcij,wj->bchw", mat(x.shape[-2]), x, mat(x.shape[-1]))


def coalition_consistency(p: torch.Tensor, labels: torch.Tensor, sigma: float) -> torch.Tensor:
    """``L_c`` per image: sum_ij w_ij (p_i - p_j)^2 / sum_ij w_ij over cells j within ``ceil(2 sigma)`` of i, with
    ``w_ij = exp(-|i - j|^2 / (2 sigma^2))`` if i and j are in the same coalition, else 0.

    p : (B, h, w) perturbation; labels : (B, h, w) int coalitions. Returns (B,); 0 when p is constant per coalition.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = max(1, math.ceil(2 * sigma))
    off = torch.arange(-r, r + 1, dtype=p.dtype, device=p.device)
    gauss = torch.exp(-(off[:, None] ** 2 + off[None] ** 2) / (2 * sigma**2)).flatten()
    k = 2 * r + 1
    pu = F.unfold(p[:, None], k, padding=r)
    lu = F.unfold(labels[:, None].to(p.dtype) + 1, k, padding=r)  # outside the image: 0, never a coalition
    same = lu == (labels.flatten(1)[:, None] + 1).to(p.dtype)
    wgt = gauss[None, :, None] * same
    return (wgt * (pu - p.flatten(1)[:, None]) ** 2).sum((1, 2)) / wgt.sum((1, 2))


def confidence_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_conf`` per image: mean over classes of relu(z_k - z_target); 0 exactly while the target is top-1."""
    return torch.relu(logits - logits.gather(1, target[:, None])).mean(1)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter, both restored on exit (also on error)."""
    flags = [(t, t.requires_grad) for t in model.parameters()]
    with eval_mode(model):
        try:
            for t, _ in flags:
                t.requires_grad_(False)
            yield
        finally:
            for t, flag in flags:
                t.requires_grad_(flag)


def coalition_perturbation(model: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, *,
                           grid: str = "pixel", steps: int = 500, lr: float = 0.1, mask_coef: float = 1.0,
                           conf_coef: float = 100.0, consistency_coef: float = 1.0, sigma: float = 1.0,
                           substrate: str = "noise", blur_sigma: float = 10.0,
                           init: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest coalition-consistent perturbation that keeps the target class: Adam on ``a``, ``p = sigmoid(a)``.

    Parameters
    ----------
    model : classifier; in eval mode with frozen parameters during the call, restored after.
    x : (B, 3, H, W) preprocessed batch; target : (B,) int64 classes.
    labels : (B, h, w) coalitions on the feature grid.
    grid : ``"pixel"``: ``p`` is (B, H, W), coalitions upsampled (nearest) to it; ``"feature"``: ``p`` is (B, h, w),
        upsampled (nearest) to the image to blend. ``sigma`` is measured in cells of that grid.
    steps : Adam updates (``lr``); ``steps + 1`` forward passes (the last one scores the final mask) and ``steps``
        backward passes of the model over the batch.
    mask_coef, conf_coef, consistency_coef : weights of ``L_r``, ``L_conf`` (``mu``) and ``L_c`` (``v``).
    substrate : what ``p`` blends in, ``x~ = x * (1 - p) + s * p``: "noise" (one N(0, 1) image drawn from
        ``seed``, the same for every image of the batch), "blur" (Gaussian, ``blur_sigma`` pixels) or "zeros".
    init : the starting perturbation, everywhere.

    Returns
    -------
    p : (B, h', w') float32 in (0, 1), per image the evaluated iterate with the lowest loss among those whose
        perturbed input keeps the target top-1 (the lowest overall if none does).
    history : (steps + 1,) float32 batch-mean total loss at each evaluation.
    """
    for key, value, allowed in (("grid", grid, GRIDS), ("substrate", substrate, SUBSTRATES)):
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")
    if not 0 < init < 1:
        raise ValueError(f"init must lie in (0, 1), got {init}")
    size, x = tuple(x.shape[-2:]), x.detach()
    lab = labels if grid == "feature" else F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
    lab = lab.long()
    if substrate == "blur":
        base = gaussian_blur(x, blur_sigma)
    else:  # one noise image for the whole batch, so an image's map does not depend on its place in the batch
        g = torch.Generator().manual_seed(int(seed))
        base = torch.zeros_like(x) if substrate == "zeros" else torch.randn(x.shape[1:], generator=g).to(x).expand_as(x)
    a = torch.full(lab.shape, math.log(init / (1 - init)), dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    best = torch.sigmoid(a).detach().clone()
    best_loss = torch.full((x.shape[0],), math.inf, device=x.device)
    best_kept, history = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device), []
    with _frozen(model), torch.enable_grad():
        for step in range(steps + 1):
            p = torch.sigmoid(a)
            up = p if grid == "pixel" else F.interpolate(p[:, None], size=size, mode="nearest")[:, 0]
            logits = model(x + (base - x) * up[:, None])
            loss = (mask_coef * (1 - p).flatten(1).mean(1) + conf_coef * confidence_loss(logits, target)
                    + consistency_coef * coalition_consistency(p, lab, sigma))
            kept = logits.argmax(1) == target
            better = (kept & ~best_kept) | ((kept == best_kept) & (loss < best_loss))
            best[better], best_loss[better] = p[better].detach(), loss[better].detach()
            best_kept |= kept
            history.append(loss.detach().mean())
            if step < steps:
                (a.grad,) = torch.autograd.grad(loss.sum(), [a])
                opt.step()
    return best.float(), torch.stack(history).float()


def _layer(model: nn.Module, params: dict[str, Any]) -> str:
    return params["layer"] or default_layer(model)


def coalition(ps: Pass, params: dict[str, Any]) -> torch.Tensor:
    """Perturbation on Feature Coalition (Hu et al. 2024, arXiv 2408.13397): saliency ``1 - p``, float32 in (0, 1).

    Parameters
    ----------
    params : the keys below; defaults marked *paper* are the paper's values, the rest our choices.
    layer : features to cluster; default Grad-CAM's (:func:`~segfromxai.models.model.default_layer`: a
        ViT's last ``norm1``, a CNN's last ``feature_info`` stage); a CNN without ``feature_info`` needs it.
    grid : "pixel" (default): map (B, H, W); "feature": map (B, h, w) on the layer's grid (the ViT token grid).
    max_clusters : ``l`` = 100 (*paper*). min_clusters : ``k`` = 3 (Kim et al. 2020, whose clustering the paper
        follows). cluster_steps : 1000 SGD updates at most, cluster_lr 0.1 (Kim et al.). continuity_coef :
        ``lambda`` = 1 (*paper*).
    steps : 500 Adam updates (the authors' release), lr 0.1 on the logits of ``p``, starting at ``init`` = 0.1.
    mask_coef : 1 (*paper*, ``L_r``). conf_coef : ``mu`` = 100 (*paper*). consistency_coef : ``v`` = 1 (*paper*).
    sigma : 1 cell of the mask grid (*paper*).
    substrate : what ``p`` blends in: "noise" (default; one N(0, 1) image in normalised space drawn from ``seed``,
        shared by the batch; the authors' release perturbs with Gaussian noise), "blur" (``blur_sigma`` = 10 px) or
        "zeros" (the mean colour). On the embedded DINOv2 model blur and zeros keep the class even at ``p`` near 1
        (the shapes survive a blur and a ViT ignores contrast), which leaves a flat map.
    seed : seeds the clustering heads and the noise substrate.

    Passes: see the module docstring.
    """
    feats = layer_features(ps, _layer(ps.model, params))
    labels, _ = feature_coalitions(feats, max_clusters=params["max_clusters"], min_clusters=params["min_clusters"],
                                   steps=params["cluster_steps"], lr=params["cluster_lr"],
                                   continuity_coef=params["continuity_coef"], seed=params["seed"])
    keys = ("grid", "steps", "lr", "mask_coef", "conf_coef", "consistency_coef", "sigma", "substrate", "blur_sigma",
            "init", "seed")
    p, _ = coalition_perturbation(ps.model, ps.x, ps.target, labels, **{k: params[k] for k in keys})
    return 1 - p


def _needs(model: nn.Module, params: dict[str, Any]) -> Needs:
    return Needs(layers=(_layer(model, params),))


def coalition_params(*, layer: str | None = None, grid: Literal["pixel", "feature"] = "pixel",
                     max_clusters: PositiveInt = 100, min_clusters: PositiveInt = 3, cluster_steps: PositiveInt = 1000,
                     cluster_lr: Positive = 0.1, continuity_coef: NonNegative = 1.0, steps: PositiveInt = 500,
                     lr: Positive = 0.1, mask_coef: NonNegative = 1.0, conf_coef: NonNegative = 100.0,
                     consistency_coef: NonNegative = 1.0, sigma: Positive = 1.0,
                     substrate: Literal["blur", "zeros", "noise"] = "noise", blur_sigma: Positive = 10.0,
                     init: Fraction = 0.1, seed: int = 0) -> None:
    """The paper's defaults (Hu et al. 2024): clustering (``max_clusters``, ``min_clusters``, ``cluster_steps``,
    ``cluster_lr``, ``continuity_coef``) and perturbation (``steps``, ``lr``, the loss coefficients, ``sigma``,
    ``substrate``, ``blur_sigma``, ``init``, ``seed``) on ``layer``'s features (None: the default layer)."""


COALITION_EXPLAINERS: dict[str, Explainer] = {
    "coalition": explainer(
        coalition, _needs, coalition_params, vit_only=False,
        summary="Perturbation on Feature Coalition: the largest coalition-consistent perturbation keeping the class"),
}
