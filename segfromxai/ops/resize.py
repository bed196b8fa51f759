"""The one home of map resizing.

NumPy, exact in float64 as two matrix products (rows, then columns): grid maps (a model's token grid) go to image
size with :func:`resize_bilinear` and to another grid with :func:`resize_area`; both are separable,
``R_h @ grid @ R_w.T`` with 1-D weight matrices built here. Torch, batched on the maps' device:
:func:`upsample_maps` (bilinear, the same convention) for maps that meet an input batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be (H, W) with positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation, half-pixel centres, edges clamped (align_corners=False)."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    r = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(r, (rows, i0), 1.0 - w1)
    np.add.at(r, (rows, i1), w1)
    return r


def _area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D area averaging: output cell o covers input [o n_in/n_out, (o+1) n_in/n_out)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1.0) - np.maximum(lo, cells), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _separable(grid: np.ndarray, size: tuple[int, int], weights) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {g.shape}")
    H, W = check_size(size)
    return weights(H, g.shape[0]) @ g @ weights(W, g.shape[1]).T


def resize_bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float (h, w) map to float64 (H, W) = ``size``, exactly.

    Half-pixel centres and clamped edges, no antialiasing: equal (up to rounding) to
    ``torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)`` and to ``cv2.resize(...,
    INTER_LINEAR)`` (whose weights are float32).
    """
    return _separable(grid, size, _bilinear_matrix)


def resize_area(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-averaging resize of a float (h, w) map to float64 (H, W) = ``size``, exactly: each output cell averages
    the input it covers.

    For integer shrink factors this is block averaging and equals ``cv2.resize(..., INTER_AREA)`` up to cv2's
    float32 weights; when enlarging, each output cell takes the area-weighted mean of the input cells it overlaps.
    """
    return _separable(grid, size, _area_matrix)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a batch of maps (B, h, w) to (B, H, W) = ``size`` on their device and dtype, half-pixel
    centres and clamped edges (``align_corners=False``), the convention of :func:`resize_bilinear`; maps already
    at ``size`` come back as they are."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
