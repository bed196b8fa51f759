"""Refiners: turn a thresholded explanation into the final instance masks at image size.

``REFINERS`` maps a name to its function. Every refiner has one call shape::

    refiner(fused, mask, *, size, features=None, <its own keyword-only parameters with defaults>) -> list[mask]

- ``fused``: float (gh, gw) in [0, 1], the fused explanation on the model's token grid.
- ``mask``: bool (gh, gw), the thresholded ``fused``; always an upper level set of it (``fused > t`` or ``>= t``).
- ``size``: (H, W) of the image; the returned masks are bool (H, W).
- ``features``: float (fh, fw, C) per-token features of the classifier, or None (only ``ncut`` needs them).

A refiner returns a possibly empty list of non-empty bool (H, W) masks (one per instance) and never mutates its
inputs. Parameters live only in the signature (``inspect.signature`` gives names and defaults); ``CHOICES`` lists,
per refiner, the allowed values of each parameter that takes a closed set of values.

Grid maps reach the image size by bilinear interpolation with half-pixel centres and clamped edges, the same as
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``: the model saw the whole image resized to
its square input, so its grid covers the whole image whatever the aspect ratio. It is computed here exactly in
float64 as two small matrix products (:func:`segfromxai.ops.resize.resize_bilinear`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import scipy.ndimage

from ..ops import cutrules
from ..ops.graphcut import (
    affinity,
    fiedler,
    foreground_is_high,
    grid_positions,
    has_cut,
    Solver,
    ncut_bipartition,
    similarity,
)
from ..registry import Entry
from ..params import Fraction, NonNegative, Positive, PositiveInt, Range, declared
from ..ops.resize import check_size, resize_area, resize_bilinear



def _check_choices(refiner: str, **values: str) -> None:
    for name, value in values.items():
        valid = declared(REFINERS[refiner].fn, context=("size", "features"))[name].choices
        if value not in valid:
            raise ValueError(f"{refiner}: unknown {name} {value!r}; valid: {', '.join(valid)}")


def _check_map_and_mask(fused: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(fused, dtype=np.float64)
    m = np.asarray(mask)
    if f.ndim != 2 or m.shape != f.shape:
        raise ValueError(f"fused and mask must be 2-D of one shape, got {f.shape} and {m.shape}")
    if m.dtype != bool:
        raise ValueError(f"mask must be bool, got {m.dtype}")
    return f, m


def cut_level(fused: np.ndarray, mask: np.ndarray) -> float:
    """The level ``t`` with ``fused > t`` equal to ``mask``, halfway between the two classes.

    ``t`` is the midpoint between the largest value outside ``mask`` and the smallest inside (or the largest
    outside, if float64 has no number strictly between them), so ``fused > t`` reproduces ``mask`` exactly on
    its grid when compared in float64, and the same ``t`` cuts a resampled ``fused`` at the same level.

    Parameters
    ----------
    fused : ndarray, float, shape (h, w)
    mask : ndarray, bool, shape (h, w)
        An upper level set of ``fused`` (``fused > t`` or ``fused >= t`` for some ``t``).

    Returns
    -------
    float
        ``+inf`` for an empty mask, ``-inf`` for a full one.

    Raises
    ------
    ValueError
        If ``mask`` is not an upper level set of ``fused`` (some value outside is >= some value inside).
    """
    f, m = _check_map_and_mask(fused, mask)
    if not m.any():
        return float("inf")
    if m.all():
        return float("-inf")
    lo, hi = float(f[~m].max()), float(f[m].min())
    if not lo < hi:
        raise ValueError(f"mask is not an upper level set of fused: max outside {lo} >= min inside {hi}")
    mid = lo + (hi - lo) / 2.0
    return mid if mid < hi else lo


def none(fused: np.ndarray, mask: np.ndarray, *, size: tuple[int, int],
         features: np.ndarray | None = None) -> list[np.ndarray]:
    """The thresholded explanation at image size: ``fused`` resized bilinearly, cut at :func:`cut_level`.

    Parameters
    ----------
    fused : ndarray, float, shape (gh, gw), in [0, 1]
    mask : ndarray, bool, shape (gh, gw), an upper level set of ``fused``
    size : (H, W) of the output masks
    features : ignored (part of the common refiner signature)

    Returns
    -------
    list of ndarray, bool, shape (H, W)
        ``[mask]``, or ``[]`` when it is empty.
    """
    f, m = _check_map_and_mask(fused, mask)
    out = resize_bilinear(f, size) > cut_level(f, m)
    return [out] if out.any() else []


def _strength(y: np.ndarray, fg_hi: bool, idx: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Signed distance of each remaining token to the split, towards the foreground (-inf on removed tokens)."""
    split = float(y.mean())
    strength = np.full(grid[0] * grid[1], -np.inf)
    strength[idx] = (y - split) if fg_hi else (split - y)
    return strength.reshape(grid)


def _foreground_side(y: np.ndarray, prior: np.ndarray, idx: np.ndarray, grid: tuple[int, int], *, foreground: str,
                     corner_veto: bool) -> tuple[np.ndarray, bool]:
    """ncut's step 2: the cut's side ``hi = y > mean(y)`` (bool over the cut's tokens ``idx`` of the grid) and
    whether it is the foreground, by the explanation ``prior`` (``mass``/``mean``, then the corner veto) or by
    TokenCut's/MaskCut's own rule (``eigvec``/``corners``)."""
    split = float(y.mean())
    hi = y > split
    if foreground not in ("mass", "mean"):
        return hi, bool(np.array_equal(cutrules.eigvec_side(y, split, idx, grid, corners=foreground == "corners"), hi))
    fg_hi = foreground_is_high(y, prior, rule=foreground)
    return hi, cutrules.corner_veto(hi, fg_hi, idx, grid) if corner_veto else fg_hi


def _cut(sub: np.ndarray, idx: np.ndarray, prior: np.ndarray, grid: tuple[int, int], *, eps: float, solver: str,
         foreground: str, corner_veto: bool, recut: int) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray]:
    """ncut's steps 1-2 on the graph ``sub`` over the tokens ``idx`` (``edges[np.ix_(idx, idx)]``, which has a cut):
    the Fiedler vector ``y``, the tokens it is over, whether ``y > mean(y)`` is the foreground, and the foreground
    side (bool grid). While that side holds two or more grid corners (:func:`segfromxai.ops.cutrules.corners_held`),
    up to ``recut`` times, its own tokens are cut again and the side rule applied to that cut (``y`` and the tokens
    are then the last cut's)."""
    while True:
        y = fiedler(sub, eps=eps, solver=solver)
        hi, fg_hi = _foreground_side(y, prior[idx], idx, grid, foreground=foreground, corner_veto=corner_veto)
        keep = hi if fg_hi else ~hi
        side = np.zeros(grid[0] * grid[1], dtype=bool)
        side[idx[keep]] = True
        side = side.reshape(grid)
        if recut == 0 or cutrules.corners_held(side) < 2 or keep.sum() < 4:
            return y, idx, fg_hi, side
        inner = sub[np.ix_(keep, keep)]
        if not has_cut(inner):
            return y, idx, fg_hi, side
        sub, idx, recut = inner, idx[keep], recut - 1


def _kept_components(side: np.ndarray, m_grid: np.ndarray, e: np.ndarray, components: str, *,
                     strength: np.ndarray) -> np.ndarray:
    """The 4-connected components of the foreground ``side`` (bool grid) that ncut keeps (its step 3); ``"seed"``
    keeps the one holding the strongest token (:func:`segfromxai.ops.cutrules.seed_component`)."""
    if components == "seed":
        return cutrules.seed_component(side, strength)
    if components == "all":
        return side
    labels, _ = scipy.ndimage.label(side)  # 4-connectivity
    touching = np.unique(labels[side & m_grid])
    if components == "largest":
        masses = np.bincount(labels.ravel(), weights=e.ravel())[touching]
        touching = touching[[int(np.argmax(masses))]]
    return np.isin(labels, touching)


def _soft_instance(y: np.ndarray, fg_hi: bool, kept: np.ndarray, idx: np.ndarray, grid: tuple[int, int],
                   size: tuple[int, int]) -> np.ndarray:
    """ncut's step 4: the signed distance to the split on the kept tokens, resized to ``size`` and cut at 0."""
    split = float(y.mean())
    dist = (y - split) if fg_hi else (split - y)
    scale = float(np.abs(dist).max()) or 1.0
    soft = np.full(grid[0] * grid[1], -scale)
    keep_sub = kept[idx]
    soft[idx[keep_sub]] = np.maximum(dist[keep_sub], 1e-12 * scale)
    return resize_bilinear(soft.reshape(grid), size) > 0


def _accepted(inst: np.ndarray, found: list[np.ndarray], *, min_area: float, max_overlap: float) -> bool:
    """ncut's step 6: non-empty, at least ``min_area`` of the image, and overlapping no kept instance too much."""
    area = int(inst.sum())
    if area == 0 or area < min_area * inst.size:
        return False
    return not any(np.logical_and(inst, g).sum() > max_overlap * np.logical_or(inst, g).sum() for g in found)


def on_grid(fused: np.ndarray, mask: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``fused`` and its mask on another grid: area-averaged (:func:`resize_area`) and cut at the same level
    (:func:`cut_level`), or, when no area mean reaches that level (a sparse pixel map on a coarse grid), the same
    share of cells with the highest means; as they are when already on ``grid``."""
    if fused.shape == tuple(grid):
        return fused, mask
    e = resize_area(fused, grid)
    m_grid = e > cut_level(fused, mask)
    if mask.any() and not m_grid.any():  # the level is never reached by the area means: keep the same share
        k = max(1, int(round(mask.mean() * e.size)))
        m_grid = e >= np.sort(e, axis=None)[-k]
    return e, m_grid


def _as_features(features: np.ndarray | None) -> np.ndarray:
    if features is None:
        raise ValueError("ncut needs per-token features (fh, fw, C); got None")
    feats = np.asarray(features)
    if feats.ndim != 3:
        raise ValueError(f"features must be (fh, fw, C), got shape {feats.shape}")
    return feats


def _edges(feats: np.ndarray, prior: np.ndarray, *, tau: float, tau_quantile: float | None, position_weight: float,
           position_sigma: float, prior_weight: float) -> np.ndarray:
    """ncut's binary graph: :func:`similarity` above ``tau`` (or above its ``tau_quantile`` per image)."""
    fh, fw, _ = feats.shape
    sim = similarity(feats.reshape(fh * fw, -1), positions=grid_positions((fh, fw)) if position_weight else None,
                     position_weight=position_weight, position_sigma=position_sigma, prior=prior,
                     prior_weight=prior_weight)
    return sim > (tau if tau_quantile is None else cutrules.similarity_quantile(sim, tau_quantile))


def _check_ncut_numbers(*, instances: int, min_area: float, max_overlap: float, eps: float) -> None:
    if not (isinstance(instances, (int, np.integer)) and instances >= 1):
        raise ValueError(f"instances must be an integer >= 1, got {instances!r}")
    if not 0.0 <= min_area <= 1.0 or not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"min_area and max_overlap must be in [0, 1], got {min_area} and {max_overlap}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def ncut(fused: np.ndarray, mask: np.ndarray, *, size: tuple[int, int], features: np.ndarray | None = None,
         tau: Annotated[float, Range(-1.0, lo_open=True)] = 0.2,
         eps: Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True)] = 1e-5,
         position_weight: NonNegative = 0.0, position_sigma: Positive = 0.1, prior_weight: NonNegative = 0.0,
         solver: Solver = "lanczos", foreground: Literal["mass", "mean", "eigvec", "corners"] = "mass",
         components: Literal["overlap", "largest", "all", "seed"] = "overlap",
         combine: Literal["none", "intersection", "union"] = "none", instances: PositiveInt = 1,
         min_area: Fraction = 0.0, max_overlap: Fraction = 0.5, tau_quantile: Fraction | None = None,
         corner_veto: bool = False, recut_corners: Annotated[int, Range(0)] = 0,
         retry_missed: Annotated[int, Range(0)] = 0) -> list[np.ndarray]:
    """Normalized-cut refinement on the classifier's token features, guided by the explanation.

    TokenCut (Wang et al. 2022, CVPR) bipartitions the token graph of :func:`affinity` with :func:`ncut_bipartition`;
    the explanation picks the foreground and the components kept; MaskCut (Wang et al. 2023, "Cut and Learn for
    unsupervised object detection and instance segmentation", CVPR) repeats the cut for more instances.

    Steps, per instance:

    1. Bipartition the remaining tokens: ``y > split`` versus the rest, ``split = mean(y)``.
    2. Foreground = the side with more explanation mass (``foreground="mass"``: the sum of the fused map over
       it) or the higher mean explanation (``"mean"``: mass per token, which does not favour the larger side);
       on a tie the side with fewer tokens; on a tie of both the side ``y > split``. With ``corner_veto``,
       MaskCut's corner rule then overrules the explanation: a chosen side holding two or more grid corners,
       opposite one holding fewer, is reversed (:func:`segfromxai.ops.cutrules.corner_veto`). It must overlap the
       thresholded explanation on the feature grid, else this cut gives no instance (its tokens leave the graph as
       in step 7); with ``retry_missed`` = r > 0 such a cut does not count as one of the ``instances``, up to r
       times in all: e.g. a cut that splits off one or two odd background tokens of a self-supervised ViT, whose
       explained side the corner veto then refuses, is followed by a cut of the rest. With ``recut_corners`` = k > 0,
       a foreground side that still holds two or more grid corners (both sides hold them, so the corner rule could
       not reverse it: e.g. the top half of a street scene against the road) is not taken as the object: its own
       tokens are cut again and the same rule picks a side, up to k times (MaskCut's rule applied within the
       side it could not settle; 0 is TokenCut/MaskCut as published).
       A graph with no cut (every pair of remaining tokens joined, or none) has no unique Fiedler vector; the
       first instance is then the :func:`none` mask (the thresholded explanation) and the search stops.
    3. Keep 4-connected components of the foreground side: ``"overlap"`` those that overlap the thresholded
       explanation, ``"largest"`` the overlapping one with most explanation mass (the first in raster order on
       ties), ``"all"`` every one. With ``foreground`` ``"eigvec"`` or ``"corners"`` the explanation is not read:
       every component overlaps, and ``"largest"`` is the one with most tokens.
    4. Soft map on the grid: ``sign * (y - split)`` on kept tokens (``sign`` makes it positive there; floored at
       1e-12 times the scale below), ``-max |y - split|`` on every other token, so the grid mask is exactly
       ``{s > 0}``; resized bilinearly to ``size`` (:func:`resize_bilinear`) and cut at ``> 0``.
    5. ``combine`` with the :func:`none` mask: ``"none"`` keeps the cut's mask, ``"intersection"``/``"union"``
       combine pixelwise.
    6. The instance is dropped when empty, smaller than ``min_area * H * W`` pixels, or when its IoU with an
       instance already kept exceeds ``max_overlap`` (tests on the mask after ``combine``).
    7. The kept tokens (the whole foreground side if step 2 failed) leave the graph: the next cut solves on the
       sub-graph of the remaining tokens (rather than setting the removed tokens' affinities to eps, as
       TokenCut/MaskCut do, so removed tokens take no part in the split, the mass rule or the components).
       Stops after ``instances`` cuts or when fewer than 2 tokens remain.

    If ``fused`` is on another grid than ``features``, it is resampled to the feature grid by area averaging
    (:func:`resize_area`) and the mask recomputed there as ``fused > cut_level(fused, mask)``; when no area mean
    reaches that level (a sparse pixel-level map cut on a finer grid), the mask is the same share of the feature
    grid's tokens instead, the highest (at least one), so a grid mismatch never leaves the image without a mask.

    Parameters
    ----------
    fused : ndarray, float, shape (gh, gw), in [0, 1]
    mask : ndarray, bool, shape (gh, gw), an upper level set of ``fused``
    size : (H, W) of the output masks
    features : ndarray, float, shape (fh, fw, C)
        Per-token features (ViT keys/queries/values/tokens of one block, or a CNN feature map). Required.
    tau, eps, position_weight, position_sigma, prior_weight
        Graph parameters, see :func:`affinity`; the prior is the fused map on the feature grid.
    solver : {"lanczos", "dense"}
        See :func:`ncut_bipartition`.
    foreground : {"mass", "mean", "eigvec", "corners"}
        Which side of the cut is foreground, see step 2. ``"eigvec"`` is TokenCut's rule with no explanation: the
        side holding the eigenvector's largest-magnitude entry; ``"corners"`` is MaskCut's (CutLER): the same, but
        reversed when it holds two or more grid corners (:func:`segfromxai.ops.cutrules.eigvec_side`). Both ignore
        ``fused`` and ``mask`` (no overlap test, no fallback to the thresholded map).
    components : {"overlap", "largest", "all", "seed"}
        ``"seed"``: the component holding the side's strongest token (TokenCut's object,
        :func:`segfromxai.ops.cutrules.seed_component`).
    combine : {"none", "intersection", "union"}
    instances : int >= 1
        The number of cuts (each gives at most one instance).
    min_area : float in [0, 1]
        Smallest instance area, as a fraction of H * W.
    max_overlap : float in [0, 1]
        Largest IoU of an instance with any instance kept before it.
    tau_quantile : float in [0, 1], optional
        Set ``tau`` per image to this quantile of the off-diagonal similarities instead
        (:func:`segfromxai.ops.cutrules.similarity_quantile`), for backbones whose keys are near-parallel.
    corner_veto : bool
        With ``foreground`` ``"mass"`` or ``"mean"``: reverse the explanation's side when it holds two or more grid
        corners and the other side fewer (step 2). Measured on synth: the explanation of a large object often
        favours the background around it (README: Boundary).
    recut_corners : int >= 0
        Cut a foreground side holding two or more grid corners again, up to this many times (step 2).
    retry_missed : int >= 0
        At most this many cuts in all whose foreground side misses the thresholded explanation do not count as
        instances (step 2); 0 (the default) counts every cut, as before.

    Returns
    -------
    list of ndarray, bool, shape (H, W)
        The instances in the order found; possibly empty.
    """
    _check_choices("ncut", solver=solver, components=components, combine=combine,
                   foreground=foreground)
    _check_ncut_numbers(instances=instances, min_area=min_area, max_overlap=max_overlap, eps=eps)
    H, W = check_size(size)
    f, m = _check_map_and_mask(fused, mask)
    feats = _as_features(features)
    fh, fw, _ = feats.shape
    e, m_grid = on_grid(f, m, (fh, fw))
    explained = foreground in ("mass", "mean")  # else TokenCut/MaskCut's own rule: the explanation is not read
    if explained and not m_grid.any():
        return []
    base = none(f, m, size=(H, W)) if explained else []
    base_mask = base[0] if base else np.zeros((H, W), dtype=bool)

    n, prior = fh * fw, e.ravel()
    edges = _edges(feats, prior, tau=tau, tau_quantile=tau_quantile, position_weight=position_weight,
                   position_sigma=position_sigma, prior_weight=prior_weight)
    if not explained:  # components are chosen without the explanation: every token counts, with weight 1
        e, m_grid = np.ones((fh, fw)), np.ones((fh, fw), dtype=bool)
    alive = np.ones(n, dtype=bool)
    found: list[np.ndarray] = []
    cuts, retries = 0, retry_missed
    while cuts < instances:
        cuts += 1
        idx = np.flatnonzero(alive)
        if idx.size < 2:
            break
        sub = edges[np.ix_(idx, idx)]
        if not has_cut(sub):
            if not found and base:
                found.append(base_mask)
            break
        y, idx, fg_hi, side = _cut(sub, idx, prior, (fh, fw), eps=eps, solver=solver, foreground=foreground,
                                   corner_veto=corner_veto, recut=recut_corners)
        if explained and not (side & m_grid).any():
            alive &= ~side.ravel()
            if retries:
                retries, cuts = retries - 1, cuts - 1
            continue
        kept = _kept_components(side, m_grid, e, components, strength=_strength(y, fg_hi, idx, (fh, fw)))
        inst = _soft_instance(y, fg_hi, kept.ravel(), idx, (fh, fw), (H, W))
        if combine == "intersection":
            inst &= base_mask
        elif combine == "union":
            inst |= base_mask
        alive &= ~kept.ravel()
        if _accepted(inst, found, min_area=min_area, max_overlap=max_overlap):
            found.append(inst)
    return found


__all__ = ["CHOICES", "REFINERS", "affinity", "cut_level", "grid_positions", "ncut", "ncut_bipartition",
           "none"]


REFINERS: dict[str, Entry] = {
    "none": Entry(none, "the thresholded map at image size"),
    "ncut": Entry(ncut, "normalized cut on token features (TokenCut/MaskCut)", frozenset({"features"})),
}
"""Refiners; one that requires ``"features"`` gets per-token features of the recipe's ``[features]`` layer from
the shared pass, as ``features``."""

CHOICES: dict[str, dict[str, tuple]] = {
    name: {k: p.choices for k, p in declared(r.fn, context=("size", "features")).items() if p.choices is not None}
    for name, r in REFINERS.items()}
"""Per refiner, the allowed values of each parameter with a closed set of choices (read from the signatures)."""
