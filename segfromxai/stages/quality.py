"""Mask quality: a label-free estimate of a pseudo-label's IoU with the object, from what the run already has.

Each mask gets five terms, every one in [0, 1] or close to it (:func:`quality_terms`):

- ``border``: the share of the image's outermost pixel ring that the mask covers. Masks that run along the frame
  are mostly background: a sky, a road, a table top.
- ``area``: the mask's share of the image (large masks are more often a background region).
- ``confidence``: the softmax probability of the explained class (1 for a headless model).
- ``cohesion``: how well the mask splits the cut's token features: with unit-normalised tokens, the mean cosine of
  each side's tokens to its own side's mean, minus the mean cosine of the mask's tokens to the background's mean
  (the normalized-cut view of a good partition: tight sides, far apart). 0 without token features.
- ``kept``: the IoU of the mask with the refiner's mask it came from (the best match), before the boundary stage
  and cleaning. A boundary step that moves the outline far from the cut has lost the object.

Two more terms were tried and left out, as they added nothing to the cross-validated ranking on the dev benchmark:
the fused explanation's mean inside the mask minus outside (Spearman +0.23 alone), and the share of the mask inside
the thresholded explanation (+0.17 alone).

The score (:func:`quality_score`) is ``clip(BIAS + sum(WEIGHTS[t] * terms[t]), 0, 1)``: a linear model of the
mask's IoU fitted by least squares on the dev benchmark's masks (``bench/fit_quality.py``, which prints the
weights, the Spearman correlation with the true IoU and its 5-fold cross-validated value). It is each COCO
annotation's ``score``, so COCOeval's AP ranks by it, and ``run --min-score`` leaves out masks below it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..ops.masks import mask_iou
from ..ops.resize import resize_bilinear

TERMS = ("border", "area", "confidence", "cohesion", "kept")

# Fitted by bench/fit_quality.py on the dev benchmark (make dev-bench): `default` (GrabCut at 2 iterations, 320 px) on
# the embedded model, 108 photos, one mask each. Spearman with the true IoU 0.643 in sample, 0.580 cross-validated
# (5 folds by image); 0.644 on the shipped default's masks, 0.388 on synth (seed 303). Confidence
# enters negatively once cohesion is in: images the classifier is sure of are cut on its own values, whose cohesion
# runs higher (0.5-0.9) than the self-supervised keys' (0.1-0.3), and its weight offsets that.
WEIGHTS = {"border": -1.0132, "area": -0.5928, "confidence": -0.1728, "cohesion": 0.2314, "kept": 0.8918}
BIAS = 0.1186


def border_share(mask: np.ndarray) -> float:
    """The share of the image's outermost pixel ring inside ``mask`` (H, W) bool."""
    h, w = mask.shape
    if h < 3 or w < 3:
        return float(mask.mean())
    ring = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(ring.mean())


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


def quality_terms(mask: np.ndarray, *, confidence: float, refined: Sequence[np.ndarray],
                  tokens: np.ndarray | None = None) -> dict[str, float]:
    """The terms of one mask (H, W) bool (see the module's docstring): ``refined`` the refiner's masks (H, W);
    ``tokens`` the refiner's token features (fh, fw, C), if it had any."""
    return {"border": border_share(mask), "area": float(mask.mean()), "confidence": float(confidence),
            "cohesion": cohesion(mask, tokens), "kept": max((mask_iou(mask, r) for r in refined), default=0.0)}


def quality_score(terms: dict[str, float], weights: dict[str, float] | None = None, bias: float | None = None
                  ) -> float:
    """``clip(bias + sum(weights[t] * terms[t]), 0, 1)``, by default with the fitted :data:`WEIGHTS` and
    :data:`BIAS`."""
    weights = WEIGHTS if weights is None else weights
    bias = BIAS if bias is None else bias
    return float(np.clip(bias + sum(weights[t] * terms[t] for t in TERMS), 0.0, 1.0))
