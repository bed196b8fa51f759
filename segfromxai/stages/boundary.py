"""Boundary stage: snap a refined mask to the image's edges (after the refiner, before cleaning).

The refiners cut on the model's token grid (14x14 for a ViT-S/14 at 224 px) and upsample, so a mask's outline is
only as fine as a token. This stage moves it onto the image's own edges, with edge-aware filters from kept
libraries. ``BOUNDARIES`` maps a name to a :class:`Boundary`; every function has one call shape::

    fn(soft, image, *, <its own keyword-only parameters with defaults>) -> bool (H, W)

- ``soft``: float (H, W) in [0, 1], the foreground belief at image size; ``soft > 0.5`` is the mask to refine.
  The pipeline builds it from each refined instance with :func:`mask_soft` (a ramp one token wide across the
  refined outline), so the stage works after every refiner and on every model.
- ``image``: uint8 (H, W, 3) RGB, the guide.

A function never mutates its inputs and is deterministic. Lengths are fractions of the image's geometric-mean side
``sqrt(H W)``, so one recipe fits every image size and aspect ratio. ``none`` returns ``soft > 0.5``.
"""

from __future__ import annotations

from typing import Annotated, Any

import cv2
import numpy as np

from ..params import Fraction, NonNegative, Positive, PositiveInt, Range
from ..registry import Entry
from ..ops.masks import keep_largest, mask_iou
from ..ops.resize import check_size


def _check(soft: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(soft, dtype=np.float32)
    im = np.asarray(image)
    if s.ndim != 2 or im.shape != s.shape + (3,):
        raise ValueError(f"soft must be (H, W) and image (H, W, 3) of the same H, W; got {s.shape} and {im.shape}")
    if im.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got {im.dtype}")
    return s, np.ascontiguousarray(im)


def _pixels(fraction: float, shape: tuple[int, int]) -> float:
    """A length given as a fraction of the geometric-mean side, in pixels."""
    return float(fraction) * float(np.sqrt(shape[0] * shape[1]))


def mask_soft(mask: np.ndarray, cell: tuple[float, float], *, band: float = 1.0) -> np.ndarray:
    """A bool mask as a soft map: a linear ramp across its outline, ``band`` tokens wide.

    ``soft = clip(0.5 + d / (band * c), 0, 1)`` with ``d`` the signed distance of a pixel centre to the outline
    (exact Euclidean distance transform, OpenCV's ``distanceTransform`` with ``DIST_MASK_PRECISE``: inside, the
    distance to the nearest outside pixel minus 1/2; outside, minus the distance to the nearest inside pixel plus
    1/2) and ``c = sqrt(cell_h * cell_w)`` the token's side in pixels.
    So ``soft > 0.5`` is exactly ``mask``, and the belief falls off over the width of one token, the resolution the
    refiner cut at.

    Parameters
    ----------
    mask : ndarray, bool, shape (H, W)
    cell : (float, float)
        A token's height and width in image pixels (``H / gh``, ``W / gw``).
    band : float > 0
        Width of the ramp in tokens.

    Returns
    -------
    ndarray, float32, shape (H, W), in [0, 1]
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != bool:
        raise ValueError(f"mask must be bool (H, W), got {m.dtype} {m.shape}")
    if not band > 0 or not min(cell) > 0:
        raise ValueError(f"band and cell must be > 0, got {band} and {cell}")
    if not m.any() or m.all():
        return np.full(m.shape, 1.0 if m.any() else 0.0, dtype=np.float32)
    u8 = m.astype(np.uint8)
    inside = cv2.distanceTransform(u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    d = np.where(m, inside - 0.5, 0.5 - outside)
    width = band * float(np.sqrt(cell[0] * cell[1]))
    return np.clip(0.5 + d / width, 0.0, 1.0).astype(np.float32)


def none(soft: np.ndarray, image: np.ndarray) -> np.ndarray:
    """No boundary step: ``soft > 0.5`` (with :func:`mask_soft`, the refined mask itself).

    Parameters
    ----------
    soft : ndarray, float, shape (H, W), in [0, 1]
    image : ndarray, uint8, shape (H, W, 3) (checked, otherwise unused)

    Returns
    -------
    ndarray, bool, shape (H, W)
    """
    s, _ = _check(soft, image)
    return s > 0.5


Far = Annotated[float, Range(0.0, 0.5, hi_open=True)]
"""A soft value in [0, 0.5): GrabCut's sure-background level, the CRF's bias."""
Side = Annotated[int, Range(0)]
"""A working size in pixels (0: full size)."""


def guided(soft: np.ndarray, image: np.ndarray, *, radius: Positive = 0.12, eps: Positive = 3e-3) -> np.ndarray:
    """Guided filter of the soft map by the image, cut at 0.5 (He, Sun & Tang 2013, "Guided image filtering",
    TPAMI; OpenCV ``ximgproc.guidedFilter``).

    The output is locally an affine function of the image's colours, fitted to ``soft`` in windows of side
    ``2 r + 1``, so the 0.5 contour moves onto colour edges within about ``r`` pixels of the refined outline.

    Parameters
    ----------
    soft : ndarray, float, shape (H, W), in [0, 1]
    image : ndarray, uint8, shape (H, W, 3), RGB
    radius : float > 0
        Window radius ``r`` as a fraction of ``sqrt(H W)`` (at least 1 pixel).
    eps : float > 0
        Regularisation of the local fit, on colours scaled to [0, 1]: edges whose local colour variance is well
        below ``eps`` are smoothed over.

    Returns
    -------
    ndarray, bool, shape (H, W)
    """
    s, im = _check(soft, image)
    if not radius > 0 or not eps > 0:
        raise ValueError(f"radius and eps must be > 0, got {radius} and {eps}")
    r = max(1, int(round(_pixels(radius, s.shape))))
    out = cv2.ximgproc.guidedFilter(im.astype(np.float32) / 255.0, s, r, float(eps))
    return out > 0.5


def _work_scale(shape: tuple[int, int], work_side: int) -> float:
    """The factor (<= 1) that brings the geometric-mean side of ``shape`` down to ``work_side`` (0: no limit)."""
    side = float(np.sqrt(shape[0] * shape[1]))
    return 1.0 if work_side <= 0 or side <= work_side else work_side / side


def _crop(keep: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The bounding box of ``keep`` grown by ``pad`` pixels on every side, clipped to the array."""
    rows, cols = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))
    h, w = keep.shape
    return (slice(max(0, rows[0] - pad), min(h, rows[-1] + pad + 1)),
            slice(max(0, cols[0] - pad), min(w, cols[-1] + pad + 1)))


def _shrink(s: np.ndarray, im: np.ndarray, work_side: int) -> tuple[np.ndarray, np.ndarray]:
    """``s`` and ``im`` area-averaged down to a geometric-mean side of at most ``work_side`` (0: as they are)."""
    k = _work_scale(s.shape, work_side)
    if k == 1.0:
        return s, im
    small = (max(1, round(s.shape[1] * k)), max(1, round(s.shape[0] * k)))  # cv2's (width, height)
    return cv2.resize(s, small, interpolation=cv2.INTER_AREA), cv2.resize(im, small, interpolation=cv2.INTER_AREA)


def _grow(fg: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float foreground map back at ``shape`` (bilinear), cut at 0.5."""
    if fg.shape != shape:
        fg = cv2.resize(fg.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return fg > 0.5


def grabcut(soft: np.ndarray, image: np.ndarray, *, far: Far = 0.25, iterations: PositiveInt = 1,
            pad: NonNegative = 0.1, work_side: Side = 320, init_stride: PositiveInt = 2) -> np.ndarray:
    """GrabCut (Rother, Kolmogorov & Blake 2004, "GrabCut: interactive foreground extraction using iterated
    graph cuts", SIGGRAPH; OpenCV ``grabCut``) started from the soft map.

    Pixels with ``soft > 0.5`` start as probable foreground, ``far < soft <= 0.5`` as probable background and
    ``soft <= far`` as sure background; there is no sure foreground, so background colours inside the refined mask
    (a hole, a corner of the token grid) can leave it. Colour models are 5-component Gaussian mixtures per side;
    each iteration refits them and solves a min-cut with a contrast-sensitive smoothness term, so the outline moves
    onto colour edges. The cut runs on the bounding box of ``soft > far`` grown by ``pad`` (the rest stays
    background) and, when the image is larger, at a geometric-mean side of ``work_side`` pixels (area-averaged
    down; the result comes back by bilinear interpolation cut at 0.5).

    The mixtures start from k-means clusters (OpenCV's initialisation) of every ``init_stride``-th pixel in each
    direction of the working box; every iteration then reassigns and refits them on all its pixels, as in the paper
    (the k-means start on a quarter of the pixels is most of the saving: it was a third of the cost on the full box).
    OpenCV seeds k-means from its per-thread generator; it is reseeded with 0 before each call, so the result is
    deterministic.

    Parameters
    ----------
    soft : ndarray, float, shape (H, W), in [0, 1]
    image : ndarray, uint8, shape (H, W, 3), RGB
    far : float in [0, 0.5)
        Soft values at or below it are sure background.
    iterations : int >= 1
    pad : float >= 0
        Margin of the working box, as a fraction of ``sqrt(H W)``.
    work_side : int >= 0
        Largest geometric-mean side the cut runs at (0: full size).
    init_stride : int >= 1
        The k-means start of the mixtures sees every ``init_stride``-th row and column (1: every pixel).

    Returns
    -------
    ndarray, bool, shape (H, W)
    """
    s, im = _check(soft, image)
    if not 0 <= far < 0.5 or iterations < 1 or pad < 0 or work_side < 0 or init_stride < 1:
        raise ValueError(f"need 0 <= far < 0.5, iterations >= 1, pad >= 0, work_side >= 0, init_stride >= 1; got "
                         f"{far}, {iterations}, {pad}, {work_side}, {init_stride}")
    out = np.zeros(s.shape, dtype=bool)
    if not (s > 0.5).any():
        return out
    box = _crop(s > far, int(round(_pixels(pad, s.shape))))
    sb, ib = _shrink(s[box], im[box], work_side)
    init = np.where(sb > 0.5, cv2.GC_PR_FGD, np.where(sb > far, cv2.GC_PR_BGD, cv2.GC_BGD)).astype(np.uint8)
    if (init == cv2.GC_PR_FGD).all():  # no background to learn from: nothing to move
        fg = np.ones(sb.shape, dtype=np.float32)
    else:
        fg = (_grabcut(cv2.cvtColor(ib, cv2.COLOR_RGB2BGR), init, int(iterations), int(init_stride)) % 2
              ).astype(np.float32)  # GC_FGD and GC_PR_FGD are the odd labels
    out[box] = _grow(fg, (box[0].stop - box[0].start, box[1].stop - box[1].start))
    return out


def _grabcut(bgr: np.ndarray, init: np.ndarray, iterations: int, stride: int) -> np.ndarray:
    """OpenCV's GrabCut from the label map ``init``, its mixtures started on every ``stride``-th pixel."""
    models = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)
    sub = np.ascontiguousarray(init[::stride, ::stride])
    if stride > 1 and min((sub % 2 == 0).sum(), (sub % 2 == 1).sum()) >= 5:  # k-means needs 5 pixels a side
        cv2.grabCut(np.ascontiguousarray(bgr[::stride, ::stride]), sub, None, *models, 0, cv2.GC_INIT_WITH_MASK)
        return cv2.grabCut(bgr, init, None, *models, iterations, cv2.GC_EVAL)[0]
    return cv2.grabCut(bgr, init, None, *models, iterations, cv2.GC_INIT_WITH_MASK)[0]  # start on every pixel


def crf(soft: np.ndarray, image: np.ndarray, *, bias: Far = 0.0,
        floor: Annotated[float, Range(0.0, 0.5, lo_open=True, hi_open=True)] = 0.1, spatial: Positive = 0.5,
        colour: Positive = 13.0, weight: Positive = 10.0, smooth: Positive = 3.0, iterations: PositiveInt = 5,
        work_side: Side = 256) -> np.ndarray:
    """Fully connected CRF with Gaussian edge potentials (Kraehenbuehl & Koltun 2011, "Efficient inference in fully
    connected CRFs with Gaussian edge potentials", NeurIPS; the ``pydensecrf2`` build of their code), as used after
    DeepLab and CutLER's MaskCut.

    Two labels; the unary is ``-log p`` with ``p = clip(soft - bias, floor, 1 - floor)`` (``bias > 0``: the refined
    outline is believed too large); the pairwise terms are an
    appearance kernel (position bandwidth ``spatial`` as a fraction of ``sqrt(H W)``, colour bandwidth ``colour``
    in 8-bit levels, weight ``weight``) and a 3-pixel smoothness kernel of weight ``smooth``, Potts compatibility.
    Mean-field inference for ``iterations`` steps; a pixel is foreground where its marginal is the larger. Runs at
    a geometric-mean side of at most ``work_side`` pixels (area-averaged down, marginals bilinear back up).

    Parameters
    ----------
    soft : ndarray, float, shape (H, W), in [0, 1]
    image : ndarray, uint8, shape (H, W, 3), RGB
    bias : float in [0, 0.5)
        Taken off ``soft`` before the unary: with :func:`mask_soft`, ``bias * band`` tokens inward.
    floor : float in (0, 0.5)
        Smallest unary probability: lower trusts ``soft`` more.
    spatial, colour, weight, smooth : float > 0
    iterations : int >= 1
    work_side : int >= 0
        Largest geometric-mean side inference runs at (0: full size).

    Returns
    -------
    ndarray, bool, shape (H, W)
    """
    s, im = _check(soft, image)
    if not (0 <= bias < 0.5 and 0 < floor < 0.5) or min(spatial, colour, weight, smooth) <= 0 or iterations < 1 \
            or work_side < 0:
        raise ValueError("need 0 <= bias < 0.5, 0 < floor < 0.5, spatial, colour, weight, smooth > 0, iterations >= 1 "
                         "and work_side >= 0")
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError("boundary method 'crf' needs pydensecrf2: pip install 'segfromxai[crf]'") from e
    ss, ims = _shrink(s, im, work_side)
    h, w = ss.shape
    p = np.clip(ss - bias, floor, 1.0 - floor)
    model = dcrf.DenseCRF2D(w, h, 2)
    model.setUnaryEnergy(np.ascontiguousarray(-np.log(np.stack([1.0 - p, p]).reshape(2, -1)), dtype=np.float32))
    model.addPairwiseGaussian(sxy=3.0, compat=float(smooth))
    model.addPairwiseBilateral(sxy=max(1.0, _pixels(spatial, (h, w))), srgb=float(colour),
                               rgbim=np.ascontiguousarray(ims), compat=float(weight))
    q = np.asarray(model.inference(int(iterations)), dtype=np.float32).reshape(2, h, w)
    return _grow(q[1] - q[0] + 0.5, s.shape)


def checked(soft: np.ndarray, image: np.ndarray, *, min_iou: Fraction = 0.6, iterations: PositiveInt = 2,
            far: Far = 0.25, work_side: Side = 320, radius: Positive = 0.12, eps: Positive = 3e-3) -> np.ndarray:
    """GrabCut (:func:`grabcut`), kept only where it agrees with the guided filter (:func:`guided`) of the same
    soft map: when the IoU of the two masks' largest connected components (the object a ``keep = "largest"``
    recipe keeps) is below ``min_iou``, GrabCut's colour models have taken or dropped a region (a road, a wall, half
    the object) and the guided filter's mask, which keeps the cut's outline, is returned.

    GrabCut snaps outlines to colour edges and opens holes, which the guided filter cannot; on the dev benchmark it
    also carves parts off real objects and spreads into similar-coloured background, the failures the check
    catches. ``min_iou`` = 0.6 was chosen there (README: "Deciding on evidence"); ``iterations``, ``far`` and
    ``work_side`` are GrabCut's, ``radius`` and ``eps`` the guided filter's; GrabCut's ``pad`` and ``init_stride``
    keep their defaults.

    Returns
    -------
    ndarray, bool, shape (H, W)
    """
    if not 0 <= min_iou <= 1:
        raise ValueError(f"need 0 <= min_iou <= 1, got {min_iou}")
    snapped = guided(soft, image, radius=radius, eps=eps)
    carved = grabcut(soft, image, far=far, iterations=iterations, work_side=work_side)
    # both empty: either is the (empty) answer
    return carved if mask_iou(keep_largest(snapped), keep_largest(carved)) >= min_iou else snapped


BOUNDARIES: dict[str, Entry] = {
    "none": Entry(none, "the refined mask as it is"),
    "guided": Entry(guided, "guided filter of the refined mask by the image (He et al. 2013)"),
    "crf": Entry(crf, "fully connected CRF on the soft map (Kraehenbuehl & Koltun 2011)"),
    "grabcut": Entry(grabcut, "GrabCut colour models and graph cut from the refined mask (Rother et al. 2004)"),
    "checked": Entry(checked, "GrabCut where it agrees with the guided filter (IoU >= min_iou), else the guided "
                     "filter's mask"),
}


def refine_boundary(masks: list[np.ndarray], image: np.ndarray, cell: tuple[float, float], method: str,
                    params: dict[str, Any] | None = None, *, band: float = 1.0) -> list[np.ndarray]:
    """Apply ``BOUNDARIES[method]`` to each instance mask (via :func:`mask_soft`); empty results are dropped."""
    if method not in BOUNDARIES:
        raise ValueError(f"unknown boundary method {method!r}; valid: {', '.join(sorted(BOUNDARIES))}")
    check_size(np.shape(image)[:2])
    out = [BOUNDARIES[method](mask_soft(m, cell, band=band), image, **(params or {})) for m in masks]
    return [m for m in out if m.any()]
