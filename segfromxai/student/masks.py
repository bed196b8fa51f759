"""A student's probabilities to masks: the winning channel's pixels, optionally moved onto the image's edges.

The boundary stage (:data:`segfromxai.stages.boundary.BOUNDARIES`) takes a soft map whose ``> 0.5`` region is the mask
to refine. For a student there are two such maps, registered in :data:`SOFT_MAPS`:

- ``probs``: the student's own belief, ``p_c / (p_c + max_{j != c} p_j)`` of channel ``c`` (its foreground
  probability in binary mode), from its probabilities at image size (logits upsampled bilinearly). It is above 0.5
  exactly where ``c`` wins, and says how sure the student is near its outline.
- ``ramp`` (the student's default): :func:`segfromxai.stages.boundary.mask_soft` of the winning pixels, a linear ramp
  one token of the student's grid wide across the outline, as the pipeline builds it from a refined mask (the
  belief is discarded). Measured on synth it ties with ``probs`` under ``guided`` and beats it clearly under
  ``grabcut`` (whose probable-background band ``probs`` makes too thin).

Each function has one call shape ``fn(probs, c, *, grid) -> float32 (H, W) in [0, 1]`` with ``probs`` float32
(K, H, W) (softmax over K channels), ``c`` a foreground channel (1..K-1) and ``grid`` the student's token grid
``(gh, gw)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..registry import Entry, lookup
from ..stages.boundary import BOUNDARIES, mask_soft


def soft_probs(probs: np.ndarray, c: int, *, grid: tuple[int, int]) -> np.ndarray:
    """Channel ``c``'s probability against its strongest rival, ``p_c / (p_c + max_{j != c} p_j)``.

    Parameters
    ----------
    probs : ndarray, float32 (K, H, W), softmax over the K channels
    c : int, 1 <= c < K
    grid : (int, int)
        The student's token grid (unused: the probabilities carry their own resolution).

    Returns
    -------
    ndarray, float32 (H, W), in [0, 1]; in binary mode (K = 2) ``probs[1]`` itself.
    """
    p = np.asarray(probs, np.float32)
    rival = np.delete(p, c, axis=0).max(0)
    return (p[c] / np.maximum(p[c] + rival, 1e-12)).astype(np.float32)


def soft_ramp(probs: np.ndarray, c: int, *, grid: tuple[int, int]) -> np.ndarray:
    """The pixels where channel ``c`` wins as a ramp one token wide across their outline
    (:func:`segfromxai.stages.boundary.mask_soft` with the cell of the student's grid).

    Parameters
    ----------
    probs : ndarray, float32 (K, H, W)
    c : int, 1 <= c < K
    grid : (int, int)
        The student's token grid ``(gh, gw)``: a token is ``(H / gh, W / gw)`` pixels.

    Returns
    -------
    ndarray, float32 (H, W), in [0, 1]; ``> 0.5`` exactly where ``c`` wins.
    """
    p = np.asarray(probs)
    h, w = p.shape[1:]
    return mask_soft(p.argmax(0) == c, (h / grid[0], w / grid[1]))


SOFT_MAPS: dict[str, Entry] = {
    "probs": Entry(soft_probs, "channel c's probability against its strongest rival, p_c / (p_c + max_{j != c} p_j)"),
    "ramp": Entry(soft_ramp, "the pixels where channel c wins as a ramp one token wide across their outline"),
}


def channel_masks(probs: np.ndarray, image: np.ndarray | None, *, grid: tuple[int, int], boundary: str = "none",
                  params: dict[str, Any] | None = None, soft: str = "ramp") -> list[np.ndarray]:
    """One bool (H, W) mask per foreground channel of a student's probabilities: the pixels where the channel wins,
    moved by ``BOUNDARIES[boundary]`` (with ``params``) from the soft map ``SOFT_MAPS[soft]``.

    Parameters
    ----------
    probs : ndarray, float32 (K, H, W), softmax over K channels at image size
    image : ndarray, uint8 (H, W, 3) RGB, or None
        The boundary method's guide; needed unless ``boundary`` is ``none``.
    grid : (int, int)
        The student's token grid.
    boundary : str
        A name in :data:`segfromxai.stages.boundary.BOUNDARIES`; ``none`` keeps the winning pixels as they are.
    params : dict, optional
        The boundary method's keyword parameters (its defaults when None).
    soft : str
        A name in :data:`SOFT_MAPS`.

    Returns
    -------
    list of ndarray, bool (H, W), K - 1 masks (channel 1 first); a channel that wins nowhere gives an empty mask.
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"unknown boundary method {boundary!r}; choose one of {', '.join(BOUNDARIES)}")
    soft_map = lookup(SOFT_MAPS, soft, "soft map")
    if boundary != "none" and image is None:
        raise ValueError(f"boundary method {boundary!r} needs the image")
    arg = np.asarray(probs).argmax(0)
    out = []
    for c in range(1, probs.shape[0]):
        m = arg == c
        if boundary != "none" and m.any():
            m = BOUNDARIES[boundary](soft_map(probs, c, grid=grid), image, **(params or {}))
        out.append(m)
    return out
