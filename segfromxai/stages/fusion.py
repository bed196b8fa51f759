"""Fusion: several explanation maps of one batch in, one map (B, h, w) in [0, 1] out.

Each map is first normalised to [0, 1] per image (min-max, after an optional clip of the values above a
percentile), then resampled to one grid, then combined. ``FUSIONS`` maps a name to its combiner; every combiner
takes a list of k maps (B, h, w) in [0, 1] and a weight per map.

Choices, stated once:

* **Normalisation** is per image: ``(m - min) / (max - min)``; a constant map becomes all zeros (it ranks
  nothing). ``clip=p`` first replaces values above the p-th percentile of each map by that percentile, so that a
  few extreme pixels (common in gradient maps) do not squash the rest towards 0.
* **Pooling** (``pool``), before normalisation: maps finer than the coarsest map of the batch (pixel-level
  saliency, gradient x input, LRP to pixels beside a 7 x 7 CNN map or a 14 x 14 token map) are brought to the
  coarsest map's scale so that their sparse mass is not lost: ``"area"`` averages them onto the coarsest grid
  (then they are resampled with the rest), ``"smooth"`` blurs them with a Gaussian of sigma = half a coarse cell
  in their own pixels, keeping their resolution; ``"none"`` leaves them. Without it, a sparse pixel map fused on
  the input grid scores most pixels near 0, the geometric mean follows it, and Otsu keeps scattered pixels.
* **Resampling** to a smaller grid averages areas (``F.interpolate(mode="area")``); to a larger grid it is
  bilinear with ``align_corners=False``, the convention under which a token covers its patch.
* **Geometric mean** of k maps is the k-th root of their product, computed in log space with an ``eps`` floor:
  ``exp(sum_i w_i log(max(m_i, eps)) / sum_i w_i)``. With equal weights this is ``(prod_i m_i) ** (1/k)``, for any
  k (not a square root of a product of three). A pixel that any map scores 0 gets ``eps`` to the power of its
  weight share, so it sinks but does not make every other comparison undefined.
* **Product** is the plain element-wise product (weights are exponents); **mean** the weighted arithmetic mean
  (for ablations).
* After combining, the fused map is min-max normalised again (``renormalise=True``), so the ``fixed`` threshold
  reads on [0, 1]. Otsu, percentile and mean thresholds do not depend on this affine step.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..params import NonNegative, Percentile, Positive
from ..registry import Entry

Maps = torch.Tensor


def normalise(maps: Maps, *, clip: float | None = None) -> Maps:
    """Min-max normalise each map of a batch (B, h, w) to [0, 1]; float32, a new tensor.

    ``clip`` in (0, 100]: values above the ``clip``-th percentile of each map are set to it first. A constant map
    becomes all zeros.
    """
    m = torch.as_tensor(maps).float()
    if m.ndim != 3:
        raise ValueError(f"expected maps of shape (B, h, w), got {tuple(m.shape)}")
    flat = m.reshape(m.shape[0], -1)
    if clip is not None:
        if not 0 < clip <= 100:
            raise ValueError(f"clip must be a percentile in (0, 100], got {clip}")
        top = torch.quantile(flat, clip / 100.0, dim=1, keepdim=True)
        flat = torch.minimum(flat, top)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(m.shape)


def resample(maps: Maps, size: tuple[int, int]) -> Maps:
    """Resample maps (B, h, w) to ``size``: area averaging when shrinking an axis, bilinear when growing it."""
    m = torch.as_tensor(maps).float()
    size = (int(size[0]), int(size[1]))
    if tuple(m.shape[-2:]) == size:
        return m
    x = m[:, None]
    if size[0] < m.shape[-2] or size[1] < m.shape[-1]:  # shrink the shrinking axes first, by areas
        x = F.interpolate(x, size=(min(size[0], m.shape[-2]), min(size[1], m.shape[-1])), mode="area")
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[:, 0]


POOLS = ("none", "area", "smooth")


def gaussian_blur(maps: Maps, sigma: tuple[float, float]) -> Maps:
    """Separable Gaussian blur of maps (B, h, w) with ``sigma`` (rows, cols) in pixels, truncated at 3 sigma, edges
    reflected (``scipy.ndimage.gaussian_filter(mode="reflect", truncate=3)`` up to float32 rounding)."""
    m = torch.as_tensor(maps).float()
    out = m
    for axis, s in zip((1, 2), sigma):
        if s <= 0:
            continue
        r = int(3.0 * s + 0.5)
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = (k / k.sum()).float()
        x = out.movedim(axis, -1)
        shape = x.shape
        x = x.reshape(-1, 1, shape[-1])
        x = F.conv1d(_pad_symmetric(x, r), k.view(1, 1, -1))
        out = x.reshape(shape).movedim(-1, axis)
    return out


def _pad_symmetric(x: torch.Tensor, r: int) -> torch.Tensor:
    # scipy's "reflect" is symmetric padding (the edge value repeated), tiled for pads longer than the axis
    idx = torch.arange(-r, x.shape[-1] + r)
    n = x.shape[-1]
    idx = idx % (2 * n)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    return x[..., idx]


def pool_maps(maps: Mapping[str, Maps], pool: str) -> dict[str, Maps]:
    """Bring maps finer than the coarsest one to its scale (see the module docstring, *Pooling*)."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
    coarse = min((tuple(m.shape[-2:]) for m in maps.values()), key=lambda s: s[0] * s[1])
    out = {}
    for name, m in maps.items():
        m = torch.as_tensor(m).float()
        h, w = m.shape[-2:]
        if pool == "none" or (h <= coarse[0] and w <= coarse[1]):
            out[name] = m
        elif pool == "area":
            out[name] = F.adaptive_avg_pool2d(m[:, None], coarse)[:, 0]
        else:
            out[name] = gaussian_blur(m, (0.5 * h / coarse[0], 0.5 * w / coarse[1]))
    return out


def _weights(k: int, weights: Sequence[float] | None) -> list[float]:
    w = [1.0] * k if weights is None else [float(v) for v in weights]
    if len(w) != k or any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"need {k} non-negative weights with a positive sum, got {weights}")
    return w


def geometric_mean(maps: Sequence[Maps], *, weights: Sequence[float] | None = None, eps: float = 1e-6) -> Maps:
    """Weighted geometric mean ``exp(sum w_i log max(m_i, eps) / sum w_i)`` of k maps (the k-th root of the
    product for equal weights), in log space."""
    w = _weights(len(maps), weights)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    logs = sum(wi * torch.log(torch.clamp(m, min=eps)) for wi, m in zip(w, maps))
    return torch.exp(logs / sum(w))


def product(maps: Sequence[Maps], *, weights: Sequence[float] | None = None, eps: float = 1e-6) -> Maps:
    """Element-wise product ``prod_i m_i ** w_i`` (no root: it shrinks with k; ``eps`` unused)."""
    w = _weights(len(maps), weights)
    out = torch.ones_like(maps[0])
    for wi, m in zip(w, maps):
        out = out * m.clamp_min(0) ** wi
    return out


def arithmetic_mean(maps: Sequence[Maps], *, weights: Sequence[float] | None = None, eps: float = 1e-6) -> Maps:
    """Weighted arithmetic mean ``sum w_i m_i / sum w_i`` (``eps`` unused)."""
    w = _weights(len(maps), weights)
    return sum(wi * m for wi, m in zip(w, maps)) / sum(w)


FUSIONS: dict[str, Entry] = {
    "geometric": Entry(geometric_mean, "weighted geometric mean, in log space with an eps floor (the default)"),
    "product": Entry(product, "weighted product of the maps"),
    "mean": Entry(arithmetic_mean, "weighted arithmetic mean"),
}

GRIDS = ("tokens", "input")
"""Where maps meet: the model's token grid (for a CNN, the coarsest map's grid), or the model's input size."""
Method = Literal[tuple(FUSIONS)]  # the choices are the registry's names
Grid = Literal[GRIDS]


def fuse(maps: Mapping[str, Maps], *, method: str = "geometric", size: tuple[int, int] | None = None,
         clip: float | None = None, eps: float = 1e-6, weights: Mapping[str, float] | None = None,
         renormalise: bool = True, pool: str = "none") -> Maps:
    """Normalise, resample and combine ``{name: (B, h_i, w_i)}`` maps into one float32 (B, h, w) map in [0, 1].

    ``size`` is the common grid (default: the largest map's); ``weights`` maps a name to its weight (missing names
    weigh 1); ``pool`` brings finer maps to the coarsest map's scale first. See the module docstring for every choice.
    """
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; valid: {', '.join(sorted(FUSIONS))}")
    if not maps:
        raise ValueError("nothing to fuse")
    unknown = set(weights or {}) - set(maps)
    if unknown:
        raise ValueError(f"weights for maps that are not fused: {sorted(unknown)}; fused: {sorted(maps)}")
    if size is None:
        size = max((tuple(m.shape[-2:]) for m in maps.values()), key=lambda s: s[0] * s[1])
    ready = [resample(normalise(m, clip=clip), size) for m in pool_maps(maps, pool).values()]
    w = [float((weights or {}).get(name, 1.0)) for name in maps]
    out = FUSIONS[method](ready, weights=w, eps=eps)
    return normalise(out) if renormalise else out.float()


def as_numpy(maps: Maps) -> np.ndarray:
    """A fused batch as a float32 NumPy array on the CPU."""
    return maps.detach().float().cpu().numpy()


def grid_size(maps: Mapping[str, Maps], grid: str, *, token_grid: tuple[int, int] | None,
              input_size: tuple[int, int]) -> tuple[int, int]:
    """The common grid: ``"input"`` the model's input size; ``"tokens"`` the model's token grid, or for a model
    without one (a CNN) the coarsest map's grid."""
    if grid == "input":
        return tuple(input_size)
    if token_grid is not None:
        return tuple(token_grid)
    return min((tuple(m.shape[-2:]) for m in maps.values()), key=lambda s: s[0] * s[1])


def fuse_on_grid(maps: Mapping[str, Maps], *, token_grid: tuple[int, int] | None, input_size: tuple[int, int],
                 method: Method = "geometric", grid: Grid = "tokens", clip: Percentile | None = None,
                 eps: Positive = 1e-6, weights: dict[str, NonNegative] = {}, renormalise: bool = True,
                 pool: Literal["none", "area", "smooth"] = "area") -> Maps:
    """:func:`fuse` on the grid named by ``grid`` (:func:`grid_size`). Its keyword parameters after the two sizes
    are a recipe's ``[fusion]`` section (their declaration: defaults, choices and ranges)."""
    size = grid_size(maps, grid, token_grid=token_grid, input_size=input_size)
    return fuse(maps, method=method, size=size, clip=clip, eps=eps, weights=weights, renormalise=renormalise,
                pool=pool)
