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
float64 as two small matrix products (:func:`segfromxai.resize.resize_bilinear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.linalg
import scipy.ndimage
from scipy.sparse.linalg import LinearOperator, eigsh
from scipy.spatial.distance import cdist

from . import cutrules
from .resize import check_size, resize_area, resize_bilinear

CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "none": {},
    "ncut": {
        "solver": ("lanczos", "dense"),
        "components": ("overlap", "largest", "all", "seed"),
        "combine": ("none", "intersection", "union"),
        "foreground": ("mass", "mean", "eigvec", "corners"),
    },
}

_LANCZOS_MIN_NODES = 8  # ARPACK needs a Krylov space of a few vectors; smaller graphs go to the dense solver
_LANCZOS_TOL = 1e-12


def _check_choices(refiner: str, **values: str) -> None:
    for name, value in values.items():
        valid = CHOICES[refiner][name]
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


def grid_positions(shape: tuple[int, int]) -> np.ndarray:
    """Token coordinates (row, col) of a (fh, fw) grid in raster order, divided by the grid diagonal hypot(fh, fw).

    Returns
    -------
    ndarray, float64, shape (fh * fw, 2)
    """
    fh, fw = shape
    rr, cc = np.meshgrid(np.arange(fh, dtype=np.float64), np.arange(fw, dtype=np.float64), indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1) / np.hypot(fh, fw)


def _similarity(features: np.ndarray, *, positions: np.ndarray | None, position_weight: float,
                position_sigma: float, prior: np.ndarray | None, prior_weight: float) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, C), got shape {x.shape}")
    n = x.shape[0]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)  # zero rows: cos 0
    s = x @ x.T
    if position_weight != 0.0:
        if positions is None:
            raise ValueError("position_weight != 0 needs positions (N, 2)")
        if not position_sigma > 0:
            raise ValueError(f"position_sigma must be > 0, got {position_sigma}")
        p = np.asarray(positions, dtype=np.float64)
        if p.shape != (n, 2):
            raise ValueError(f"positions must be ({n}, 2), got {p.shape}")
        s += position_weight * np.exp(-cdist(p, p, "sqeuclidean") / (2.0 * position_sigma**2))
    if prior_weight != 0.0:
        if prior is None:
            raise ValueError("prior_weight != 0 needs a prior (N,)")
        e = np.asarray(prior, dtype=np.float64).ravel()
        if e.shape != (n,):
            raise ValueError(f"prior must have {n} values, got {e.shape}")
        s += prior_weight * np.outer(e, e)
    return s


def affinity(features: np.ndarray, *, tau: float = 0.2, eps: float = 1e-5, positions: np.ndarray | None = None,
             position_weight: float = 0.0, position_sigma: float = 0.1, prior: np.ndarray | None = None,
             prior_weight: float = 0.0) -> np.ndarray:
    """TokenCut's binarised affinity graph (Wang et al. 2022, "Self-supervised transformers for unsupervised
    object discovery using normalized cut", CVPR), with optional positional and explanation-prior terms.

    ``S_ij = cos(f_i, f_j) + position_weight * exp(-d_ij^2 / (2 position_sigma^2)) + prior_weight * e_i e_j`` and
    ``W_ij = 1 if S_ij > tau else eps``. The positional term follows R-Cut (Niu et al. 2023, arXiv 2307.09050),
    which adds positional relationships to the cosine graph. Self-loops are kept, as in TokenCut.

    Parameters
    ----------
    features : ndarray, float, shape (N, C)
        One feature vector per node; a zero vector has cosine 0 with everything.
    tau, eps : float
        Binarisation threshold and the weight of non-edges (``eps > 0`` keeps the graph connected).
    positions : ndarray, float, shape (N, 2), optional
        Node coordinates, already divided by the grid diagonal (see :func:`grid_positions`); needed when
        ``position_weight != 0``.
    position_weight, position_sigma : float
    prior : ndarray, float, shape (N,), optional
        The explanation on the nodes, in [0, 1]; needed when ``prior_weight != 0``.
    prior_weight : float

    Returns
    -------
    ndarray, float64, shape (N, N)
        Symmetric, entries in {eps, 1}.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    s = _similarity(features, positions=positions, position_weight=position_weight, position_sigma=position_sigma,
                    prior=prior, prior_weight=prior_weight)
    return np.where(s > tau, 1.0, eps)


def _start_vector(n: int) -> np.ndarray:
    # A fixed quasi-random sequence (golden-angle phases): no RNG, so the same on every platform and NumPy version.
    return np.cos(2.399963229728653 * np.arange(n) + 1.0)


def fiedler(edges: np.ndarray, *, eps: float, solver: str) -> np.ndarray:
    """Second generalized eigenvector of (D - W) y = lambda D y for ``W = eps + (1 - eps) edges``, D-normalised,
    sign fixed so that its largest-magnitude entry (first on ties) is positive."""
    n = edges.shape[0]
    if n < 2:
        raise ValueError(f"a bipartition needs at least 2 nodes, got {n}")
    counts = edges.sum(axis=1, dtype=np.float64)
    d = counts + eps * (n - counts)
    if solver == "dense" or n < _LANCZOS_MIN_NODES:
        w = np.where(edges, 1.0, eps)
        dd = np.diag(d)
        y = scipy.linalg.eigh(dd - w, dd, subset_by_index=[1, 1])[1][:, 0]
    else:
        # Second-largest eigenvector of M = D^-1/2 W D^-1/2 (y = D^-1/2 z). The largest is known exactly:
        # z0 = D^1/2 1 with eigenvalue 1; M - 2 z0 z0^T moves it to -1, below the rest of the spectrum ([-1, 1]),
        # so the largest eigenpair of the shifted operator is the one wanted.
        b = edges.astype(np.float64)
        r = 1.0 / np.sqrt(d)
        z0 = np.sqrt(d) / np.sqrt(d.sum())

        def matvec(v: np.ndarray) -> np.ndarray:
            v = np.ravel(v)
            u = r * v
            return r * ((1.0 - eps) * (b @ u) + eps * u.sum()) - 2.0 * z0 * (z0 @ v)

        op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        v0 = _start_vector(n)
        v0 -= z0 * (z0 @ v0)
        z = eigsh(op, k=1, which="LA", v0=v0, tol=_LANCZOS_TOL, ncv=min(n, 20))[1][:, 0]
        y = r * z
    y = y / np.sqrt(y @ (d * y))
    return -y if y[np.argmax(np.abs(y))] < 0 else y


def ncut_bipartition(features: np.ndarray, *, tau: float = 0.2, eps: float = 1e-5,
                     positions: np.ndarray | None = None, position_weight: float = 0.0,
                     position_sigma: float = 0.1, prior: np.ndarray | None = None, prior_weight: float = 0.0,
                     solver: str = "lanczos") -> tuple[np.ndarray, float]:
    """Normalized-cut bipartition of a token graph (Shi & Malik 2000; TokenCut, Wang et al. 2022).

    Builds ``W`` as :func:`affinity` does and solves ``(D - W) y = lambda D y`` for the eigenvector of the second
    smallest eigenvalue. The bipartition is ``y > split`` versus the rest, ``split = mean(y)`` (TokenCut's rule).

    Solvers
    -------
    ``"lanczos"`` (default): ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``, k=1, largest
    algebraic, tol 1e-12, 20 Lanczos vectors) on ``M - 2 z0 z0^T``, ``M = D^-1/2 W D^-1/2`` and ``z0 = D^1/2 1 /
    ||D^1/2 1||`` its known top eigenvector, with ``y = D^-1/2 z``. The matrix-vector product uses the binary graph
    ``B`` (``W = eps + (1 - eps) B``), so ``W`` is never formed. Start vector: ``v0_i = cos(2.39996323 i + 1)``
    (golden-angle phases, no RNG) made orthogonal to ``z0``. Graphs of fewer than 8 nodes use the dense solver.
    ``"dense"`` (reference): ``scipy.linalg.eigh(D - W, D, subset_by_index=[1, 1])``.

    Parameters
    ----------
    features : ndarray, float, shape (N, C), N >= 2
    tau, eps, positions, position_weight, position_sigma, prior, prior_weight
        As in :func:`affinity`.
    solver : {"lanczos", "dense"}

    Returns
    -------
    y : ndarray, float64, shape (N,)
        The generalized eigenvector, normalised to ``y^T D y = 1`` with its largest-magnitude entry (the first one
        on ties) positive. Which side is foreground is the caller's rule, not the sign.
    split : float
        ``mean(y)``.
    """
    _check_choices("ncut", solver=solver)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    s = _similarity(features, positions=positions, position_weight=position_weight, position_sigma=position_sigma,
                    prior=prior, prior_weight=prior_weight)
    y = fiedler(s > tau, eps=eps, solver=solver)
    return y, float(y.mean())


def ncut(fused: np.ndarray, mask: np.ndarray, *, size: tuple[int, int], features: np.ndarray | None = None,
         tau: float = 0.2, eps: float = 1e-5, position_weight: float = 0.0,
         position_sigma: float = 0.1, prior_weight: float = 0.0, solver: str = "lanczos",
         foreground: str = "mass", components: str = "overlap", combine: str = "none", instances: int = 1,
         min_area: float = 0.0, max_overlap: float = 0.5, tau_quantile: float | None = None) -> list[np.ndarray]:
    """Normalized-cut refinement on the classifier's token features, guided by the explanation.

    TokenCut (Wang et al. 2022, CVPR) bipartitions the token graph of :func:`affinity` with :func:`ncut_bipartition`;
    the explanation picks the foreground and the components kept; MaskCut (Wang et al. 2023, "Cut and Learn for
    unsupervised object detection and instance segmentation", CVPR) repeats the cut for more instances.

    Steps, per instance:

    1. Bipartition the remaining tokens: ``y > split`` versus the rest, ``split = mean(y)``.
    2. Foreground = the side with more explanation mass (``foreground="mass"``: the sum of the fused map over
       it) or the higher mean explanation (``"mean"``: mass per token, which does not favour the larger side);
       on a tie the side with fewer tokens; on a tie of both the side ``y > split``. It must overlap the
       thresholded explanation on the feature grid, else this cut gives no instance.
       A graph with no cut (every pair of remaining tokens joined, or none) has no unique Fiedler vector; the
       first instance is then the :func:`none` mask (the thresholded explanation) and the search stops.
    3. Keep 4-connected components of the foreground side: ``"overlap"`` those that overlap the thresholded
       explanation, ``"largest"`` the overlapping one with most explanation mass (the first in raster order on
       ties), ``"all"`` every one.
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
        reversed when it holds two or more grid corners (:func:`segfromxai.cutrules.eigvec_side`). Both ignore
        ``fused`` and ``mask`` (no overlap test, no fallback to the thresholded map).
    components : {"overlap", "largest", "all", "seed"}
        ``"seed"``: the component holding the side's strongest token (TokenCut's object,
        :func:`segfromxai.cutrules.seed_component`).
    combine : {"none", "intersection", "union"}
    instances : int >= 1
        The number of cuts (each gives at most one instance).
    min_area : float in [0, 1]
        Smallest instance area, as a fraction of H * W.
    max_overlap : float in [0, 1]
        Largest IoU of an instance with any instance kept before it.
    tau_quantile : float in [0, 1], optional
        Set ``tau`` per image to this quantile of the off-diagonal similarities instead
        (:func:`segfromxai.cutrules.similarity_quantile`), for backbones whose keys are near-parallel.

    Returns
    -------
    list of ndarray, bool, shape (H, W)
        The instances in the order found; possibly empty.
    """
    _check_choices("ncut", solver=solver, components=components, combine=combine,
                   foreground=foreground)
    if features is None:
        raise ValueError("ncut needs per-token features (fh, fw, C); got None")
    if not (isinstance(instances, (int, np.integer)) and instances >= 1):
        raise ValueError(f"instances must be an integer >= 1, got {instances!r}")
    if not 0.0 <= min_area <= 1.0 or not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"min_area and max_overlap must be in [0, 1], got {min_area} and {max_overlap}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    H, W = check_size(size)
    f, m = _check_map_and_mask(fused, mask)
    feats = np.asarray(features)
    if feats.ndim != 3:
        raise ValueError(f"features must be (fh, fw, C), got shape {feats.shape}")
    fh, fw, _ = feats.shape
    if f.shape == (fh, fw):
        e, m_grid = f, m
    else:
        e = resize_area(f, (fh, fw))
        m_grid = e > cut_level(f, m)
        if m.any() and not m_grid.any():  # the level is never reached by the area means: keep the same share
            k = max(1, int(round(m.mean() * e.size)))
            m_grid = e >= np.sort(e, axis=None)[-k]
    explained = foreground in ("mass", "mean")  # else TokenCut/MaskCut's own rule: the explanation is not read
    if explained and not m_grid.any():
        return []
    base = none(f, m, size=(H, W)) if explained else []
    base_mask = base[0] if base else np.zeros((H, W), dtype=bool)

    n = fh * fw
    prior = e.ravel()
    sim = _similarity(feats.reshape(n, -1), positions=grid_positions((fh, fw)) if position_weight else None,
                      position_weight=position_weight, position_sigma=position_sigma, prior=prior,
                      prior_weight=prior_weight)
    edges = sim > (tau if tau_quantile is None else cutrules.similarity_quantile(sim, tau_quantile))
    alive = np.ones(n, dtype=bool)
    found: list[np.ndarray] = []
    for _ in range(instances):
        idx = np.flatnonzero(alive)
        if idx.size < 2:
            break
        sub = edges[np.ix_(idx, idx)]
        if sub.all() or not (sub & ~np.eye(idx.size, dtype=bool)).any():  # no cut: every eigenvector ties
            if not found and base:
                found.append(base_mask)
            break
        y = fiedler(sub, eps=eps, solver=solver)
        split = float(y.mean())
        hi = y > split
        mass_hi, mass_lo = prior[idx[hi]].sum(), prior[idx[~hi]].sum()
        if foreground == "mean":
            mass_hi, mass_lo = mass_hi / max(int(hi.sum()), 1), mass_lo / max(int((~hi).sum()), 1)
        n_hi = int(hi.sum())
        fg_hi = mass_hi > mass_lo or (mass_hi == mass_lo and n_hi <= idx.size - n_hi)
        if not explained:
            fg_hi = bool(np.array_equal(cutrules.eigvec_side(y, split, idx, (fh, fw),
                                                             corners=foreground == "corners"), hi))
        side = np.zeros(n, dtype=bool)
        side[idx[hi if fg_hi else ~hi]] = True
        side = side.reshape(fh, fw)
        if explained and not (side & m_grid).any():
            alive &= ~side.ravel()
            continue
        dist = (y - split) if fg_hi else (split - y)
        if components == "seed":
            strength = np.full(n, -np.inf)
            strength[idx] = dist
            kept = cutrules.seed_component(side, strength.reshape(fh, fw))
        elif components == "all":
            kept = side
        else:
            labels, _ = scipy.ndimage.label(side)  # 4-connectivity
            touching = np.unique(labels[side & m_grid])
            if components == "largest":
                masses = np.bincount(labels.ravel(), weights=e.ravel())[touching]
                touching = touching[[int(np.argmax(masses))]]
            kept = np.isin(labels, touching)

        scale = float(np.abs(dist).max()) or 1.0
        soft = np.full(n, -scale)
        keep_sub = kept.ravel()[idx]
        soft[idx[keep_sub]] = np.maximum(dist[keep_sub], 1e-12 * scale)
        inst = resize_bilinear(soft.reshape(fh, fw), (H, W)) > 0
        if combine == "intersection":
            inst &= base_mask
        elif combine == "union":
            inst |= base_mask
        alive &= ~kept.ravel()

        area = int(inst.sum())
        if area == 0 or area < min_area * H * W:
            continue
        if any(np.logical_and(inst, g).sum() > max_overlap * np.logical_or(inst, g).sum() for g in found):
            continue
        found.append(inst)
    return found


@dataclass(frozen=True)
class Refiner:
    """A registered refiner: its function and what it needs from the shared pass (``needs_features``: per-token
    features of the recipe's ``[features]`` layer, given as ``features``)."""

    fn: Callable[..., list[np.ndarray]]
    needs_features: bool
    summary: str

    def __call__(self, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        return self.fn(*args, **kwargs)


REFINERS: dict[str, Refiner] = {
    "none": Refiner(none, needs_features=False, summary="the thresholded map at image size"),
    "ncut": Refiner(ncut, needs_features=True, summary="normalized cut on token features (TokenCut/MaskCut)"),
}
