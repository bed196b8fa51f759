"""Which side of a normalized cut is the object, and how the graph's threshold is set, when no explanation decides.

TokenCut (Wang et al. 2022, "Self-supervised transformers for unsupervised object discovery using normalized
cut", CVPR) takes as foreground the side of the bipartition that holds the eigenvector's largest-magnitude entry
(the *seed*) and keeps the connected component of that side that contains the seed. MaskCut (CutLER; Wang et al.
2023, "Cut and learn for unsupervised object detection and instance segmentation", CVPR) first reverses the
bipartition when the foreground holds two or more of the grid's four corners. :func:`similarity_quantile` sets the
graph's threshold from the similarity distribution of one image, for backbones whose keys are near-parallel (every
cosine above TokenCut's 0.2, so the fixed-tau graph is complete and has no cut).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage


def similarity_quantile(similarity: np.ndarray, q: float) -> float:
    """The ``q``-quantile (``q`` in [0, 1]) of the off-diagonal entries of a symmetric (N, N) similarity matrix."""
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 2:
        raise ValueError(f"similarity must be square (N, N) with N >= 2, got {s.shape}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"the quantile must lie in [0, 1], got {q}")
    return float(np.quantile(s[~np.eye(s.shape[0], dtype=bool)], q))


def corners_held(side: np.ndarray) -> int:
    """How many of the four corner tokens of a bool (fh, fw) grid lie in ``side``."""
    s = np.asarray(side, dtype=bool)
    return int(s[0, 0]) + int(s[0, -1]) + int(s[-1, 0]) + int(s[-1, -1])


def eigvec_side(y: np.ndarray, split: float, idx: np.ndarray, shape: tuple[int, int], *, corners: bool
                ) -> np.ndarray:
    """TokenCut's foreground of a cut: bool (len(idx),) over the cut's tokens, True on the side ``y > split`` or
    ``y <= split`` that holds the largest-magnitude entry of ``y`` (first on ties). With ``corners`` (MaskCut), a
    foreground that holds two or more corners of the (fh, fw) grid (``idx`` maps the cut's tokens to it) is
    reversed instead.
    """
    hi = y > split
    fg = hi if hi[int(np.argmax(np.abs(y)))] else ~hi
    if corners:
        grid = np.zeros(shape[0] * shape[1], dtype=bool)
        grid[idx[fg]] = True
        if corners_held(grid.reshape(shape)) >= 2:
            fg = ~fg
    return fg


def corner_veto(hi: np.ndarray, fg_hi: bool, idx: np.ndarray, shape: tuple[int, int]) -> bool:
    """MaskCut's corner rule applied to a side chosen by the explanation: whether ``y > split`` (``hi``, bool over the
    cut's tokens; ``idx`` maps them to the (fh, fw) grid) is the foreground, given that the explanation chose it
    (``fg_hi``). The choice is reversed when the chosen side holds two or more of the grid's four corners and the
    other side fewer than two (an object seldom fills the corners of the frame; a background that the explanation
    favours, e.g. around a large object whose inside the classifier does not look at, often does). A side holding
    corners the other side also holds keeps the explanation's choice.
    """
    fg, bg = np.zeros(shape[0] * shape[1], dtype=bool), np.zeros(shape[0] * shape[1], dtype=bool)
    fg[idx[hi if fg_hi else ~hi]] = True
    bg[idx[~hi if fg_hi else hi]] = True
    if corners_held(fg.reshape(shape)) >= 2 and corners_held(bg.reshape(shape)) < 2:
        return not fg_hi
    return fg_hi


def seed_component(side: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """The 4-connected component of bool ``side`` (fh, fw) that holds its strongest token (largest ``strength``,
    float (fh, fw), first in raster order on ties): TokenCut's object. Empty ``side`` gives an empty mask."""
    s = np.asarray(side, dtype=bool)
    if not s.any():
        return s.copy()
    labels, _ = scipy.ndimage.label(s)
    st = np.where(s, np.asarray(strength, dtype=np.float64), -np.inf)
    return labels == labels.flat[int(np.argmax(st))]
