"""Training targets: uint8 label maps at the trunk's input size, from the run's pseudo-labels
(:func:`pseudo_targets`) or from the previous round's student (:func:`student_targets`).

Label cleaning (the student learns from noisy labels, so a few gross errors matter more than many small ones):
``max_area`` drops training images whose pseudo-mask covers more than that share of the image (a swapped
foreground/background), ``min_score`` drops annotations scored below it. Self-training relabels the training images
with the previous round's student (averaging the image and its mirror); ``confident`` keeps only pixels whose top
probability reaches it (the rest are :data:`IGNORE`), as CutLER keeps only confident masks (Wang et al. 2023, "Cut
and Learn for Unsupervised Object Detection and Instance Segmentation").
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from ..io.png import IGNORE
from ..ops import masks as mask_ops
from .config import MODES, Mode
from .heads import view_probs
from .tokens import Tokens


def label_map(anns: list[dict], size: tuple[int, int], channel: dict[int, int]) -> np.ndarray:
    """uint8 (H, W) label map of an image's annotations: 0 background, ``channel[category_id]`` inside a mask
    (later annotations over earlier ones)."""
    out = np.zeros(size, np.uint8)
    for a in anns:
        out[mask_ops.decode(a["segmentation"])] = channel[int(a["category_id"])]
    return out


def choose_mode(mode: Mode, anns: dict[str, list[dict]]) -> str:
    """``auto``: ``classes`` when some training image has masks of two categories, else ``binary``."""
    if mode not in MODES:
        raise ValueError(f"unknown student mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    several = any(len({a["category_id"] for a in v}) > 1 for v in anns.values())
    return "classes" if several else "binary"


def pseudo_targets(anns: dict[str, list[dict]], sizes: dict[str, tuple[int, int]], names: list[str],
                   input_size: tuple[int, int], channel: dict[int, int], *, max_area: float | None = None,
                   min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training targets from pseudo-labels: uint8 (N, h, w) label maps at the input size (nearest), and which
    images to train on (bool (N,)): those with a mask left after ``min_score`` whose foreground share of the
    image is at most ``max_area``."""
    h, w = input_size
    targets, keep = np.zeros((len(names), h, w), np.uint8), np.zeros(len(names), bool)
    for i, n in enumerate(names):
        kept = [a for a in anns.get(n, []) if min_score is None or float(a.get("score", 1.0)) >= min_score]
        if not kept:
            continue
        lab = label_map(kept, sizes[n], channel)
        keep[i] = max_area is None or (lab > 0).mean() <= max_area
        targets[i] = cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST)
    return targets, keep


def student_targets(head: nn.Module, tokens: Tokens, input_size: tuple[int, int], *, confident: float | None = None,
                    max_area: float | None = None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Self-training targets: the student's labels of the training images at the input size, pixels whose top
    probability is below ``confident`` marked 255 (ignored), and which images to train on (``max_area`` as in
    :func:`pseudo_targets`; an image with no foreground is kept as background)."""
    n = len(tokens.names)
    targets, keep = np.zeros((n, *input_size), np.uint8), np.ones(n, bool)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            p = view_probs(head, tokens.grid[s:s + batch_size], input_size)
            top, lab = p.max(1)
            lab = lab.to(torch.uint8)
            if max_area is not None:
                keep[s:s + batch_size] = ((lab > 0).float().mean((1, 2)) <= max_area).numpy()
            if confident is not None:
                lab[top < confident] = IGNORE
            targets[s:s + batch_size] = lab.numpy()
    return targets, keep
