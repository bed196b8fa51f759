"""Mask utilities: connected components, clean-up, and mask <-> COCO RLE / area / bbox / polygons.

Every function takes a 2-D mask ``(H, W)`` (any dtype; non-zero is foreground), never modifies it, and returns a
new ``bool (H, W)`` mask (or labels / RLE / numbers as documented). A non-2-D input raises ``ValueError``.

RLE here is the COCO run-length encoding of pycocotools: a dict ``{"size": [H, W], "counts": str}`` (compressed,
column-major). ``counts`` is always a ``str`` on output so the dict is JSON-serialisable.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from scipy import ndimage

from ..params import Fraction

_STRUCTURES = {
    4: ndimage.generate_binary_structure(2, 1),
    8: ndimage.generate_binary_structure(2, 2),
}


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """A new bool array from a 2-D mask (the input is never modified); raises ValueError otherwise."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D mask (H, W), got shape {arr.shape}")
    return arr.astype(bool, copy=True)


def components(mask: np.ndarray, *, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected components of the foreground.

    Parameters
    ----------
    mask : array_like, shape (H, W)
        Foreground where non-zero.
    connectivity : {4, 8}
        4: pixels touch through edges; 8: also through corners.

    Returns
    -------
    labels : ndarray of int32, shape (H, W)
        0 for background, ``1..n`` for the components, numbered in raster order (row by row, left to right) of
        each component's first pixel.
    n : int
        Number of components.
    """
    m = _as_mask(mask)
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    labels, n = ndimage.label(m, structure=_STRUCTURES[connectivity], output=np.int32)
    return labels, int(n)


def remove_small(mask: np.ndarray, *, min_area: int, connectivity: int = 8) -> np.ndarray:
    """Drop the components with fewer than ``min_area`` pixels.

    Parameters
    ----------
    mask : array_like, shape (H, W)
    min_area : int
        Components of ``area < min_area`` pixels are removed; ``min_area <= 1`` keeps everything.
    connectivity : {4, 8}
        See :func:`components`.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    labels, sizes = _sized_components(mask, connectivity)
    keep = sizes >= min_area
    keep[0] = False  # the background
    return keep[labels]


def _sized_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`components`' labels and each label's pixel count (index 0: the background; length n + 1)."""
    labels, n = components(mask, connectivity=connectivity)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def fill_holes(mask: np.ndarray, *, max_area: int | None = None) -> np.ndarray:
    """Fill holes: background regions that do not touch the image border.

    Background regions are found with 4-connectivity (the dual of the 8-connected foreground), so a background
    region that leaks out through a diagonal gap is still a hole; a region touching the border never is.

    Parameters
    ----------
    mask : array_like, shape (H, W)
    max_area : int, optional
        Fill only holes of at most ``max_area`` pixels; ``None`` fills every hole.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    m = _as_mask(mask)
    labels, n = ndimage.label(~m, structure=_STRUCTURES[4], output=np.int32)
    if n == 0:
        return m
    is_hole = np.ones(n + 1, dtype=bool)
    is_hole[0] = False
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    is_hole[border] = False
    if max_area is not None:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        is_hole &= sizes <= max_area
    return m | is_hole[labels]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def keep_largest(mask: np.ndarray, *, connectivity: int = 8) -> np.ndarray:
    """Keep only the largest component (ties: the first in raster order); an empty mask stays empty.

    Parameters
    ----------
    mask : array_like, shape (H, W)
    connectivity : {4, 8}
        See :func:`components`.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    labels, sizes = _sized_components(mask, connectivity)
    if len(sizes) == 1:  # no component
        return labels > 0
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def split_components(mask: np.ndarray, *, min_area: int = 1, connectivity: int = 8) -> list[np.ndarray]:
    """One mask per component of at least ``min_area`` pixels.

    Parameters
    ----------
    mask : array_like, shape (H, W)
    min_area : int
        Smaller components are left out.
    connectivity : {4, 8}
        See :func:`components`.

    Returns
    -------
    list of ndarray of bool, shape (H, W)
        Ordered by each component's first pixel in raster order (row by row, left to right).
    """
    labels, sizes = _sized_components(mask, connectivity)
    return [labels == k for k in range(1, len(sizes)) if sizes[k] >= min_area]


def encode(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a mask.

    Parameters
    ----------
    mask : array_like, shape (H, W)

    Returns
    -------
    dict
        ``{"size": [H, W], "counts": str}`` (pycocotools' compressed RLE with ``counts`` decoded to ASCII).
    """
    m = _as_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def pycoco_rle(rle: dict) -> dict:
    """pycocotools' compressed RLE (``counts`` bytes) from a compressed (str/bytes) or uncompressed (list) RLE."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"expected an RLE dict with 'size' and 'counts', got {type(rle).__name__}")
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [h, w], "counts": counts}
    if isinstance(counts, (list, tuple)):
        if sum(int(c) for c in counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected H*W = {h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
    raise ValueError(f"RLE counts must be str, bytes or a list of ints, got {type(counts).__name__}")


def decode(rle: dict) -> np.ndarray:
    """Decode a COCO RLE to a mask.

    Parameters
    ----------
    rle : dict
        ``{"size": [H, W], "counts": ...}`` with ``counts`` a compressed string (str or bytes) or an uncompressed
        list of run lengths. Polygons are not accepted.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    return mask_utils.decode(pycoco_rle(rle)).astype(bool)


def area(rle: dict) -> int:
    """Number of foreground pixels of an RLE (pycocotools ``area``)."""
    return int(mask_utils.area(pycoco_rle(rle)))


def bbox(rle: dict) -> list[float]:
    """COCO box ``[x, y, w, h]`` (pixels, floats) of an RLE (pycocotools ``toBbox``); all zeros when empty.

    For a non-empty mask this is ``[xmin, ymin, xmax - xmin + 1, ymax - ymin + 1]`` with ``x`` the column and
    ``y`` the row index.
    """
    return [float(v) for v in mask_utils.toBbox(pycoco_rle(rle))]


def to_polygons(mask: np.ndarray, *, tolerance: float = 0.0) -> list[list[float]]:
    """Outer contours of a mask as flat polygons ``[x1, y1, x2, y2, ...]``.

    Lossy: holes are dropped (only outer contours, ``cv2.RETR_EXTERNAL``), and vertices lie on the *centres* of
    the boundary pixels (``x`` = column index, ``y`` = row index, as OpenCV returns them), not on pixel corners,
    so a polygon rasterised back covers about half a pixel less on each side. Contours of fewer than 3 points
    (single pixels, one-pixel-wide straight lines) are dropped, so a non-empty mask can give no polygon.

    Parameters
    ----------
    mask : array_like, shape (H, W)
    tolerance : float
        If > 0, simplify each contour with ``cv2.approxPolyDP`` at this distance in pixels.

    Returns
    -------
    list of list of float
        One flat polygon per outer contour, ordered by each polygon's top-left vertex (smallest row, then column).
    """
    m = _as_mask(mask)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        if tolerance > 0:
            c = cv2.approxPolyDP(c, tolerance, True)
        pts = c.reshape(-1, 2)
        if len(pts) < 3:
            continue
        polygons.append(pts)
    polygons.sort(key=lambda p: min(zip(p[:, 1].tolist(), p[:, 0].tolist())))
    return [[float(v) for v in p.ravel()] for p in polygons]


def join_polygons(polygons: list[list[float]]) -> np.ndarray:
    """The parts of one instance as one polygon, float64 (N, 2) of (x, y), as ultralytics' COCO converter joins them
    (``merge_multi_segment``): each part is linked to the next by the shortest segment between their vertices, and
    the outline goes out along the parts and back, so every link is walked twice and encloses no area.

    Parameters
    ----------
    polygons : list of flat polygons ``[x1, y1, x2, y2, ...]`` (e.g. :func:`to_polygons`), at least one

    Returns
    -------
    ndarray, float64, shape (N, 2): part 0 around from its link to part 1, then each middle part from its link in to
    its link out, the last part all around, then the middle parts' other sides back to part 0.
    """
    parts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    if len(parts) == 1:
        return parts[0]
    links = []  # (vertex of part i, vertex of part i + 1) at the shortest distance
    for a, b in zip(parts, parts[1:]):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        links.append(np.unravel_index(int(np.argmin(d)), d.shape))
    out, back = [], []
    for i, p in enumerate(parts):
        start = links[i - 1][1] if i else links[0][0]  # where the walk enters the part
        ring = np.roll(p, -int(start), axis=0)
        if i in (0, len(parts) - 1):
            out.append(np.concatenate([ring, ring[:1]]))  # all around, back to where it entered
            continue
        k = (int(links[i][0]) - int(start)) % len(p)  # the link out, counted from the link in
        out.append(ring[:k + 1])
        back.append(np.concatenate([ring[k:], ring[:1]]))
    return np.concatenate(out + back[::-1])


_fill, _split = fill_holes, split_components  # the parameters of clean() below take these names


def clean(masks: list[np.ndarray], *, min_area: Fraction = 0.001, fill_holes: bool = True,
          max_hole: Fraction | None = None, keep: Literal["all", "largest"] = "all",
          split_components: bool = False) -> list[np.ndarray]:
    """Clean a list of instance masks: fill holes, drop small components, keep all or the largest, optionally
    split into components; never returns an empty mask. Its keyword parameters are a recipe's ``[masks]``.

    Parameters
    ----------
    masks : list of bool (H, W)
    min_area : fraction of the image area; smaller components are dropped (at least 1 pixel).
    fill_holes : fill holes, all of them or (``max_hole``) those up to that fraction of the image area.
    keep : every component, or the largest.
    split_components : one mask per connected component instead of one per instance.
    """
    out = []
    for m in masks:
        n = m.size
        if fill_holes:
            m = _fill(m, max_area=None if max_hole is None else int(round(max_hole * n)))
        m = remove_small(m, min_area=max(1, int(np.ceil(min_area * n))))
        if keep == "largest" and m.any():
            m = keep_largest(m)
        parts = _split(m) if split_components else [m]
        out.extend(p for p in parts if p.any())
    return out
