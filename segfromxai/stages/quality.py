"""Mask quality: a label-free estimate of a pseudo-label's IoU with the object, from what the run already has.

Each mask gets six terms, every one in [0, 1] or close to it (:func:`quality_terms`):

- ``border``: the share of the image's outermost pixel ring that the mask covers. Masks that run along the frame
  are mostly background: a sky, a road, a table top.
- ``contrast``: the fused explanation's mean inside the mask minus its mean outside (both in [0, 1]).
- ``confidence``: the softmax probability of the explained class (1 for a headless model).
- ``cohesion``: how well the mask splits the cut's token features: with unit-normalised tokens, the mean cosine of
  each side's tokens to its own side's mean, minus the mean cosine of the mask's tokens to the background's mean
  (the normalized-cut view of a good partition: tight sides, far apart). 0 without token features.
- ``kept``: the IoU of the mask with the refiner's mask it came from (the best match), before the boundary stage
  and cleaning. A boundary step that moves the outline far from the cut has lost the object.
- ``explained``: the share of the mask inside the thresholded explanation (the threshold stage's mask, on the
  token grid, resampled bilinearly to the image and cut at 0.5).

The score (:func:`quality_score`) is ``clip(BIAS + sum(WEIGHTS[t] * terms[t]), 0, 1)``: a linear model of the
mask's IoU fitted by least squares on the dev benchmark's masks (``bench/fit_quality.py``, which prints the
weights, the Spearman correlation with the true IoU and its 5-fold cross-validated value). It is each COCO
annotation's ``score``, so COCOeval's AP ranks by it, and ``run --min-score`` leaves out masks below it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..ops.resize import resize_bilinear

TERMS = ("border", "contrast", "confidence", "cohesion", "kept", "explained")

# Fitted by bench/fit_quality.py on the dev benchmark (make dev-bench): `default` on the embedded model, 108 photos.
WEIGHTS = {"border": -1.0, "contrast": 0.0, "confidence": 0.1, "cohesion": 0.5, "kept": 0.3, "explained": 0.1}
BIAS = 0.3


def border_share(mask: np.ndarray) -> float:
    """The share of the image's outermost pixel ring inside ``mask`` (H, W) bool."""
    h, w = mask.shape
    if h < 3 or w < 3:
        return float(mask.mean())
    ring = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(ring.mean())


def contrast(mask: np.ndarray, fused_px: np.ndarray) -> float:
    """Mean of ``fused_px`` (H, W) inside ``mask`` minus its mean outside (0 for an empty or full mask)."""
    if not mask.any() or mask.all():
        return 0.0
    return float(fused_px[mask].mean() - fused_px[~mask].mean())


def cohesion(mask: np.ndarray, tokens: np.ndarray | None) -> float:
    """How well ``mask`` (H, W) splits ``tokens`` (fh, fw, C): the tokens, unit-normalised, whose cell is at least
    half inside the mask form the foreground F, the rest the background G; with m_F and m_G the unit sides'
    means, ``(mean_F cos(t, m_F) + mean_G cos(t, m_G)) / 2 - mean_F cos(t, m_G)``. 0 when either side is empty or
    there are no tokens."""
    if tokens is None:
        return 0.0
    t = np.asarray(tokens, dtype=np.float32)
    t = t / (np.linalg.norm(t, axis=-1, keepdims=True) + 1e-6)
    inside = resize_bilinear(mask.astype(np.float32), t.shape[:2]) >= 0.5
    if not inside.any() or inside.all():
        return 0.0
    fg, bg = t[inside], t[~inside]
    m_f, m_g = fg.mean(0), bg.mean(0)
    m_f, m_g = m_f / (np.linalg.norm(m_f) + 1e-6), m_g / (np.linalg.norm(m_g) + 1e-6)
    return float(((fg @ m_f).mean() + (bg @ m_g).mean()) / 2 - (fg @ m_g).mean())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def quality_terms(mask: np.ndarray, *, fused_px: np.ndarray, confidence: float, refined: Sequence[np.ndarray],
                  explained: np.ndarray, tokens: np.ndarray | None = None) -> dict[str, float]:
    """The terms of one mask (H, W) bool (see the module's docstring): ``fused_px`` the fused map at the image's
    size; ``refined`` the refiner's masks (H, W); ``explained`` the threshold stage's mask on the fused map's grid;
    ``tokens`` the refiner's token features (fh, fw, C), if it had any."""
    inside = resize_bilinear(np.asarray(explained, dtype=np.float32), mask.shape) >= 0.5
    area = mask.sum()
    return {"border": border_share(mask), "contrast": contrast(mask, fused_px), "confidence": float(confidence),
            "cohesion": cohesion(mask, tokens), "kept": max((iou(mask, r) for r in refined), default=0.0),
            "explained": float((mask & inside).sum() / area) if area else 0.0}


def quality_score(terms: dict[str, float], weights: dict[str, float] | None = None, bias: float | None = None
                  ) -> float:
    """``clip(bias + sum(weights[t] * terms[t]), 0, 1)``, by default with the fitted :data:`WEIGHTS` and
    :data:`BIAS`."""
    weights = WEIGHTS if weights is None else weights
    bias = BIAS if bias is None else bias
    return float(np.clip(bias + sum(weights[t] * terms[t] for t in TERMS), 0.0, 1.0))
