"""Thresholds: a map (..., h, w) of non-negative floats in, a bool mask of the same shape out.

Each threshold applies per map over the last two axes. ``THRESHOLDS`` maps a name to its function; every function
takes the map first and its parameters as keywords.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..params import Fraction, Percentile
from ..registry import Entry


def _per_map(fn: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], np.ndarray]:
    def apply(maps: np.ndarray) -> np.ndarray:
        maps = np.asarray(maps, dtype=np.float64)
        if maps.ndim < 2:
            raise ValueError(f"expected maps of shape (..., h, w), got {maps.shape}")
        flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
        t = np.array([fn(m) for m in flat]).reshape(maps.shape[:-2] + (1, 1))
        return t
    return apply


def otsu_value(values: np.ndarray) -> float:
    """Otsu's threshold (Otsu, 1979) computed exactly on the sorted values, not on a histogram.

    Returns the value ``t`` that maximises the between-class variance ``w0 w1 (mu0 - mu1)^2`` of the split
    ``{v <= t}`` / ``{v > t}``, over splits between distinct values. A constant map returns its value (the mask
    ``v > t`` is then empty).
    """
    v = np.sort(np.ravel(values).astype(np.float64))
    n = v.size
    if n == 0:
        raise ValueError("otsu of an empty map")
    last = np.nonzero(np.diff(v) > 0)[0]  # split after index i: low class v[:i+1]
    if last.size == 0:
        return float(v[0])
    c = np.cumsum(v)
    n0 = last + 1.0
    n1 = n - n0
    mu0 = c[last] / n0
    mu1 = (c[-1] - c[last]) / n1
    between = n0 * n1 * (mu0 - mu1) ** 2
    return float(v[last[int(np.argmax(between))]])


def otsu(maps: np.ndarray) -> np.ndarray:
    """``map > t`` with ``t`` Otsu's threshold of each map (see :func:`otsu_value`)."""
    return np.asarray(maps) > _per_map(otsu_value)(maps)


def percentile(maps: np.ndarray, *, q: Percentile = 20.0) -> np.ndarray:
    """Keep the top ``q`` percent of each map: ``map >= t``, ``t`` the ``ceil(q/100 * n)``-th largest value.

    Ties at ``t`` are all kept, so a map with ties may keep more than q%. ``q`` in (0, 100].
    """
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], got {q}")

    def kth_largest(m: np.ndarray) -> float:
        k = max(1, int(np.ceil(q / 100.0 * m.size)))
        return float(np.partition(m, m.size - k)[m.size - k])

    return np.asarray(maps) >= _per_map(kth_largest)(maps)


def fixed(maps: np.ndarray, *, t: Fraction = 0.5) -> np.ndarray:
    """``map > t`` (maps normalised to [0, 1] by fusion, so ``t`` is on that scale)."""
    return np.asarray(maps) > t


def mean(maps: np.ndarray) -> np.ndarray:
    """``map > mean(map)`` per map."""
    maps = np.asarray(maps)
    return maps > maps.mean(axis=(-2, -1), keepdims=True)


THRESHOLDS: dict[str, Entry] = {
    "otsu": Entry(otsu, "Otsu's threshold per map (the between-class variance of its histogram at its maximum)"),
    "percentile": Entry(percentile, "keep the top q percent of each map's values"),
    "fixed": Entry(fixed, "map > t on the fused [0, 1] scale"),
    "mean": Entry(mean, "map > the map's mean"),
}
