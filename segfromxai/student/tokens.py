"""The student's frozen trunk and its token cache.

The trunk is a timm ViT (by default the embedded classifier, :func:`segfromxai.models.model.load_model`), frozen; its
last-block patch tokens (after the final norm) are computed once per image, for the image and its left-right
mirror, and kept in memory as float16 (:class:`Tokens`; on disk too when a cache folder is given,
:func:`stored_tokens`). A student of :data:`segfromxai.student.heads.SEGMENTERS` reads the image itself (the
:class:`Pixels` trunk).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write
from ..io.images import load_image
from ..io.progress import progress_bar
from ..models.features import Backbone, load_backbone
from ..models.model import LoadedModel, is_vit, sha256, tokens_to_grid
from .config import settings_key


@dataclass
class Tokens:
    """Frozen trunk outputs of a set of images.

    ``grid``: float16 (N, V, gh, gw, D), view 1 (when V = 2) the left-right mirror; ``probs``: float32 (N, C) the
    trunk classifier's class probabilities (C = 0 without a classifier head); ``sizes``: (H, W) of each image;
    ``root``: the folder of the images (the boundary stage's guides), None when not known.
    """

    names: list[str]
    sizes: list[tuple[int, int]]
    grid: torch.Tensor
    probs: np.ndarray
    root: Path | None = None


class Pixels(nn.Module):
    """The trunk of a student that reads the image itself (:data:`segfromxai.student.heads.SEGMENTERS`): the
    preprocessed image as a "token" grid (B, h, w, 3), one token per pixel."""

    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def trunk_tokens(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last-block patch tokens after the final norm as a grid (B, gh, gw, D), and the classifier's probabilities
    (B, C) (None for a trunk without a head). The grid and prefix tokens are read from the model; a
    :class:`Pixels` trunk gives the image itself and no probabilities."""
    if isinstance(module, Pixels):
        return module(x), None
    if not is_vit(module):
        raise TypeError(f"the student's trunk must be a timm ViT, got {type(module).__name__}")
    feats = module.forward_features(x)
    grid = tokens_to_grid(module, feats, tuple(x.shape[-2:]))
    probs = module.forward_head(feats).softmax(1) if getattr(module, "num_classes", 0) else None
    return grid, probs


def student_trunk(model: LoadedModel, img_size: int = 0, *, pixels: bool = False) -> Backbone:
    """The student's frozen trunk: the classifier itself (``img_size`` 0 or its own input size), or the classifier
    rebuilt at ``img_size`` x ``img_size`` with its position embedding resampled
    (:func:`segfromxai.models.features.load_backbone`; a ViT-S/14 at 392 px gives a 28 x 28 token grid). With
    ``pixels`` (a student of :data:`segfromxai.student.heads.SEGMENTERS`), the :class:`Pixels` trunk with the
    classifier's preprocessing at that size."""
    if pixels:
        size = (img_size, img_size) if img_size else model.preprocess.size
        return Backbone(Pixels(), dataclasses.replace(model.preprocess, size=size), "pixels")
    if img_size and model.preprocess.size != (img_size, img_size):
        return load_backbone(model, {"model": "classifier", "img_size": int(img_size)})
    return Backbone(model.module, model.preprocess, model.source)


def batch_tokens(model: LoadedModel, trunk: Backbone, ims: list[np.ndarray], flip: bool
                  ) -> tuple[torch.Tensor, np.ndarray]:
    """Token grids (B, V, gh, gw, D) float16 of a batch of images, and the classifier's probabilities (B, C) at its
    own input size (the class ``run`` explains, also when the trunk runs at another size)."""
    x = trunk.preprocess.batch(ims).to(model.device)
    g, p = trunk_tokens(trunk.module, x)
    views = [g] + ([trunk_tokens(trunk.module, x.flip(-1))[0]] if flip else [])
    if trunk.module is not model.module and getattr(model.module, "num_classes", 0):
        p = model.module(model.preprocess.batch(ims).to(model.device)).softmax(1)
    probs = p.float().cpu().numpy() if p is not None else np.zeros((len(ims), 0), np.float32)
    return torch.stack(views, 1).half().cpu(), probs


def cache_tokens(model: LoadedModel, root: str | Path, names: list[str], *, flip: bool = True, batch_size: int = 16,
                 progress: bool = False, desc: str = "tokens", trunk: Backbone | None = None) -> Tokens:
    """:class:`Tokens` of the images ``root/name`` (with their mirrors when ``flip``), computed once, no gradient,
    by ``trunk`` (default: :func:`student_trunk` of ``model``, the classifier at its own size). With ``progress``,
    a bar on a terminal and ``progress: <desc>: n/N images`` lines elsewhere
    (:func:`segfromxai.io.progress.progress_bar`)."""
    trunk = trunk if trunk is not None else student_trunk(model)
    root, grids, probs, sizes = Path(root), [], [], []
    model.module.eval()
    bar = progress_bar(len(names), 0, desc=desc) if progress else None
    with torch.no_grad():
        for s in range(0, len(names), batch_size):
            ims = [load_image(root / n) for n in names[s:s + batch_size]]
            sizes += [im.shape[:2] for im in ims]
            g, p = batch_tokens(model, trunk, ims, flip)
            grids.append(g)
            probs.append(p)
            if bar is not None:
                bar.update(len(ims))
    if bar is not None:
        bar.close()
    d = trunk.module.num_features
    grid = torch.cat(grids) if grids else torch.zeros((0, 2 if flip else 1, 1, 1, d), dtype=torch.float16)
    return Tokens(list(names), sizes, grid, np.concatenate(probs) if probs else np.zeros((0, 0), np.float32), root)


def token_key(model: LoadedModel, trunk: Backbone, root: Path, names: list[str], flip: bool) -> str:
    """What identifies a set of cached tokens: the classifier, the trunk and its input, the images (relative names
    and the SHA-256 of their bytes, so an image replaced at the same size and time is read again) and the views."""
    stats = [(n, sha256(root / n)) for n in names]
    return settings_key(model.timm_name, model.source, trunk.source, trunk.preprocess.to_dict(), flip,
                        str(root.resolve()), stats)


def stored_tokens(model: LoadedModel, root: str | Path, names: list[str], *, cache: Path | None,
                  trunk: Backbone, flip: bool = True, progress: bool = False, desc: str = "tokens") -> Tokens:
    """:func:`cache_tokens`, kept on disk as ``cache/<key>.safetensors`` (:func:`token_key`) when ``cache`` is
    given, so a resumed job or one with another boundary or round count does not run the trunk again."""
    from safetensors.torch import load_file, save

    if cache is None:
        return cache_tokens(model, root, names, flip=flip, progress=progress, desc=desc, trunk=trunk)
    root = Path(root)
    path = cache / f"{token_key(model, trunk, root, names, flip)}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        sizes = [tuple(int(v) for v in hw) for hw in t["sizes"].tolist()]
        return Tokens(list(names), sizes, t["grid"], t["probs"].numpy(), root)
    tokens = cache_tokens(model, root, names, flip=flip, progress=progress, desc=desc, trunk=trunk)
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {"grid": tokens.grid.contiguous(), "probs": torch.from_numpy(np.ascontiguousarray(tokens.probs)),
               "sizes": torch.tensor(tokens.sizes, dtype=torch.int64).reshape(-1, 2)}
    with atomic_write(path, "wb") as f:
        f.write(save(tensors))
    return tokens
