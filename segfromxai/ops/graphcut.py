"""Normalized-cut bipartitions of token graphs: the one home of the graph-cut maths, shared by the ``ncut`` refiner
(:mod:`segfromxai.stages.refine`) and the R-Cut explainer (:mod:`segfromxai.explainers.rcut`).

TokenCut (Wang et al. 2022, CVPR) builds a binarised cosine-similarity graph on a ViT's tokens and splits it with
the second generalized eigenvector of ``(D - W) y = lambda D y`` (Shi & Malik 2000); R-Cut (Niu et al. 2023)
adds a positional term. Which side of a cut is the foreground is :func:`foreground_is_high`'s rule.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.linalg
from scipy.sparse.linalg import LinearOperator, eigsh
from scipy.spatial.distance import cdist

SOLVERS = ("lanczos", "dense")
Solver = Literal[SOLVERS]
FOREGROUND_RULES = ("mass", "mean")
_LANCZOS_MIN_NODES = 8  # ARPACK needs a Krylov space of a few vectors; smaller graphs go to the dense solver
_LANCZOS_TOL = 1e-12


def grid_positions(shape: tuple[int, int]) -> np.ndarray:
    """Token coordinates (row, col) of a (fh, fw) grid in raster order, divided by the grid diagonal hypot(fh, fw).

    Returns
    -------
    ndarray, float64, shape (fh * fw, 2)
    """
    fh, fw = shape
    rr, cc = np.meshgrid(np.arange(fh, dtype=np.float64), np.arange(fw, dtype=np.float64), indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1) / np.hypot(fh, fw)


def similarity(features: np.ndarray, *, positions: np.ndarray | None, position_weight: float,
               position_sigma: float, prior: np.ndarray | None, prior_weight: float) -> np.ndarray:
    """``S_ij`` of :func:`affinity` before binarisation, float64 (N, N)."""
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
    s = similarity(features, positions=positions, position_weight=position_weight, position_sigma=position_sigma,
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
    _check_solver(solver)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    s = similarity(features, positions=positions, position_weight=position_weight, position_sigma=position_sigma,
                    prior=prior, prior_weight=prior_weight)
    y = fiedler(s > tau, eps=eps, solver=solver)
    return y, float(y.mean())


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")


def has_cut(edges: np.ndarray) -> bool:
    """False when a binary graph has no unique cut: every pair joined, or no edge but self-loops (then every
    eigenvector ties and no Fiedler vector is defined)."""
    n = edges.shape[0]
    return not (edges.all() or not (edges & ~np.eye(n, dtype=bool)).any())


def foreground_is_high(y: np.ndarray, weight: np.ndarray, *, rule: str = "mass") -> bool:
    """Whether the side ``y > mean(y)`` of a cut is the foreground, by the explanation ``weight`` on the nodes.

    ``rule="mass"``: the side with the larger sum of ``weight``; ``"mean"``: the larger mean (mass per node, which
    does not favour the larger side). On a tie the side with fewer nodes; on a tie of both the side ``y > mean``.
    """
    if rule not in FOREGROUND_RULES:
        raise ValueError(f"unknown foreground rule {rule!r}; valid: {', '.join(FOREGROUND_RULES)}")
    hi = y > y.mean()
    n_hi, n_lo = int(hi.sum()), int((~hi).sum())
    mass_hi, mass_lo = float(weight[hi].sum()), float(weight[~hi].sum())
    if rule == "mean":
        mass_hi, mass_lo = mass_hi / max(n_hi, 1), mass_lo / max(n_lo, 1)
    return mass_hi > mass_lo or (mass_hi == mass_lo and n_hi <= n_lo)
