"""Refiners: turn a thresholded explanation into the final mask. ``REFINERS`` maps names to functions.

Each refiner takes the bool mask (h, w) first, then keyword context (the fused map, features), and returns a bool
mask of the same shape. The normalized-cut refiner arrives with the pseudo-label issue.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def none(mask: np.ndarray, **context: Any) -> np.ndarray:
    """The thresholded mask unchanged (a copy, so the caller's array is never shared)."""
    return np.array(mask, dtype=bool, copy=True)


REFINERS: dict[str, Callable[..., np.ndarray]] = {"none": none}
