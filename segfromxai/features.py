"""Per-token features for the refiners' graphs, read from a layer of the shared forward pass.

A ViT gives a block's keys, queries or values (the output of ``attn.qkv``, split) or the block's output tokens;
a CNN gives its last feature stage (the Grad-CAM layer), one vector per spatial position.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .explainers.gradient import default_layer
from .model import is_vit, tokens_to_grid

FEATURES = ("k", "q", "v", "tokens")


def feature_layer(module: torch.nn.Module, *, feature: Literal["k", "q", "v", "tokens"] = "k", block: int = -1
                  ) -> str:
    """The module whose output gives the token features: a block's ``attn.qkv`` (q, k, v) or the block itself
    (tokens) for a ViT; the Grad-CAM layer (last feature stage) for a CNN. Its keyword parameters are a recipe's
    ``[features]`` section: ``feature`` (keys, queries, values of the block's attention, or its output tokens) and
    ``block`` (index, negative from the end)."""
    if not is_vit(module):
        return default_layer(module)
    n = len(module.blocks)
    if not -n <= block < n:
        raise ValueError(f"block {block} out of range for a model with {n} blocks")
    b = block % n
    return f"blocks.{b}" if feature == "tokens" else f"blocks.{b}.attn.qkv"


def token_features(module: torch.nn.Module, out: torch.Tensor, feature: str, input_size: tuple[int, int]
                   ) -> np.ndarray:
    """Per-token features float32 (B, fh, fw, C) from the output of :func:`feature_layer`'s module."""
    out = out.detach().float()
    if not is_vit(module):
        return out.permute(0, 2, 3, 1).cpu().numpy()
    if feature != "tokens":
        b, n, three_d = out.shape
        out = out.reshape(b, n, 3, three_d // 3)[:, :, "qkv".index(feature)]
    return tokens_to_grid(module, out, input_size).cpu().numpy()
