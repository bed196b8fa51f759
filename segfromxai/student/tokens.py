"""The student's frozen trunk and its token cache.

The trunk is a timm ViT (by default the embedded classifier, :func:`segfromxai.models.model.load_model`), frozen; the
patch tokens of its last block, or of its last ``blocks`` blocks each after the final norm and concatenated
(:class:`LastBlocks`, the multi-layer linear probe of DINOv2, Oquab et al. 2023), are computed once per image, for the
image and its left-right mirror (in bfloat16 where the device multiplies it natively, :func:`use_bf16`), and kept in
memory as float16 (:class:`Tokens`; on disk too when a cache folder is given, :func:`stored_tokens`). A student
of :data:`segfromxai.student.heads.SEGMENTERS` reads the image itself (the :class:`Pixels` trunk).
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
from .config import check_trunk_dtype, settings_key


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


def used_blocks(vit: nn.Module, blocks: int) -> int:
    """How many last blocks a student reads: ``blocks``, at most the trunk's depth (1 for a trunk that is not a
    ViT)."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    return min(int(blocks), len(vit.blocks)) if is_vit(vit) else 1


class LastBlocks(nn.Module):
    """A ViT trunk whose tokens are its last ``blocks`` blocks' patch tokens (at most its depth,
    :func:`used_blocks`), each after the final norm, concatenated on the channel axis (the earliest block first,
    the last block last): ``num_features`` is that many times the ViT's. The classifier's probabilities come from
    the last block, as without it."""

    def __init__(self, vit: nn.Module, blocks: int) -> None:
        super().__init__()
        if not is_vit(vit):
            raise TypeError(f"a student on several blocks needs a timm ViT trunk, got {type(vit).__name__}")
        self.vit, self.blocks = vit, used_blocks(vit, blocks)
        self.num_features = self.blocks * int(vit.num_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token grid (B, gh, gw, blocks * D) and the classifier's probabilities (B, C) (None without a head)."""
        final, inter = self.vit.forward_intermediates(x, indices=self.blocks, norm=True, output_fmt="NCHW")
        grid = torch.cat([t.permute(0, 2, 3, 1) for t in inter], -1)
        probs = self.vit.forward_head(final).softmax(1) if getattr(self.vit, "num_classes", 0) else None
        return grid, probs


def trunk_tokens(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last-block patch tokens after the final norm as a grid (B, gh, gw, D), and the classifier's probabilities
    (B, C) (None for a trunk without a head). The grid and prefix tokens are read from the model; a
    :class:`Pixels` trunk gives the image itself and no probabilities; a :class:`LastBlocks` trunk its blocks'
    tokens."""
    if isinstance(module, LastBlocks):
        return module(x)
    if isinstance(module, Pixels):
        return module(x), None
    if not is_vit(module):
        raise TypeError(f"the student's trunk must be a timm ViT, got {type(module).__name__}")
    feats = module.forward_features(x)
    grid = tokens_to_grid(module, feats, tuple(x.shape[-2:]))
    probs = module.forward_head(feats).softmax(1) if getattr(module, "num_classes", 0) else None
    return grid, probs


def student_trunk(model: LoadedModel, img_size: int = 0, *, pixels: bool = False, blocks: int = 1) -> Backbone:
    """The student's frozen trunk: the classifier itself (``img_size`` 0 or its own input size), or the classifier
    rebuilt at ``img_size`` x ``img_size`` with its position embedding resampled
    (:func:`segfromxai.models.features.load_backbone`; a ViT-S/14 at 392 px gives a 28 x 28 token grid); with
    ``blocks`` > 1, its last ``blocks`` blocks' tokens (at most its depth; :class:`LastBlocks`). With ``pixels`` (a
    student of
    :data:`segfromxai.student.heads.SEGMENTERS`), the :class:`Pixels` trunk with the classifier's preprocessing at
    that size."""
    if pixels:
        size = (img_size, img_size) if img_size else model.preprocess.size
        return Backbone(Pixels(), dataclasses.replace(model.preprocess, size=size), "pixels")
    if img_size and model.preprocess.size != (img_size, img_size):
        trunk = load_backbone(model, {"model": "classifier", "img_size": int(img_size)})
    else:
        trunk = Backbone(model.module, model.preprocess, model.source)
    if not is_vit(trunk.module) or used_blocks(trunk.module, blocks) == 1:
        return trunk
    n = used_blocks(trunk.module, blocks)
    return Backbone(LastBlocks(trunk.module, n), trunk.preprocess, f"{trunk.source}, last {n} blocks")


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16 among the ``flags`` of ``cpuinfo``):
    where it does not, oneDNN emulates bfloat16 and a trunk runs slower than in float32. False where the file
    cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(trunk_dtype: str, device: str | torch.device) -> bool:
    """Whether the trunk runs under bfloat16 autocast: ``bfloat16`` yes, ``float32`` no, ``auto`` where the device
    multiplies bfloat16 natively (a CUDA GPU that supports it, :func:`cpu_has_bf16` on the CPU)."""
    check_trunk_dtype(trunk_dtype)
    if trunk_dtype != "auto":
        return trunk_dtype == "bfloat16"
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(torch.device(device)):  # the model's GPU, natively (not emulated on pre-Ampere cards)
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.device(device).type == "cpu" and cpu_has_bf16()


@torch.no_grad()
def batch_tokens(model: LoadedModel, trunk: Backbone, ims: list[np.ndarray], flip: bool, *, bf16: bool = False
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """Token grids (B, V, gh, gw, D) float16 of a batch of images, and the classifier's probabilities (B, C) at its
    own input size (the class ``run`` explains, also when the trunk runs at another size). With ``bf16`` the trunk
    runs under bfloat16 autocast (measured on the dev photos: the same mean IoU, 2.6x faster on an AMX CPU)."""
    x = trunk.preprocess.batch(ims).to(model.device)
    with torch.autocast(torch.device(model.device).type, dtype=torch.bfloat16, enabled=bf16):
        g, p = trunk_tokens(trunk.module, x)
        views = [g] + ([trunk_tokens(trunk.module, x.flip(-1))[0]] if flip else [])
    own = getattr(trunk.module, "vit", trunk.module) is model.module  # the classifier at its own size
    if not own and getattr(model.module, "num_classes", 0):
        p = model.module(model.preprocess.batch(ims).to(model.device)).softmax(1)
    probs = p.float().cpu().numpy() if p is not None else np.zeros((len(ims), 0), np.float32)
    return torch.stack(views, 1).half().cpu(), probs


def cache_tokens(model: LoadedModel, root: str | Path, names: list[str], *, flip: bool = True, batch_size: int = 16,
                 progress: bool = False, desc: str = "tokens", trunk: Backbone | None = None,
                 bf16: bool = False) -> Tokens:
    """:class:`Tokens` of the images ``root/name`` (with their mirrors when ``flip``), computed once, no gradient,
    by ``trunk`` (default: :func:`student_trunk` of ``model``, the classifier at its own size; under bfloat16
    autocast with ``bf16``, :func:`batch_tokens`). With ``progress``,
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
            g, p = batch_tokens(model, trunk, ims, flip, bf16=bf16)
            grids.append(g)
            probs.append(p)
            if bar is not None:
                bar.update(len(ims))
    if bar is not None:
        bar.close()
    d = trunk.module.num_features
    grid = torch.cat(grids) if grids else torch.zeros((0, 2 if flip else 1, 1, 1, d), dtype=torch.float16)
    return Tokens(list(names), sizes, grid, np.concatenate(probs) if probs else np.zeros((0, 0), np.float32), root)


def token_key(model: LoadedModel, trunk: Backbone, root: Path, names: list[str], flip: bool,
              bf16: bool = False) -> str:
    """What identifies a set of cached tokens: the classifier, the trunk and its input, the images (relative names
    and the SHA-256 of their bytes, so an image replaced at the same size and time is read again), the views and
    the trunk's precision."""
    stats = [(n, sha256(root / n)) for n in names]
    return settings_key(model.timm_name, model.source, trunk.source, trunk.preprocess.to_dict(), flip,
                        str(root.resolve()), stats, *(["bfloat16"] if bf16 else []))


def stored_tokens(model: LoadedModel, root: str | Path, names: list[str], *, cache: Path | None,
                  trunk: Backbone, flip: bool = True, progress: bool = False, desc: str = "tokens",
                  bf16: bool = False) -> Tokens:
    """:func:`cache_tokens`, kept on disk as ``cache/<key>.safetensors`` (:func:`token_key`) when ``cache`` is
    given, so a resumed job or one with another boundary or round count does not run the trunk again."""
    from safetensors.torch import load_file, save

    if cache is None:
        return cache_tokens(model, root, names, flip=flip, progress=progress, desc=desc, trunk=trunk, bf16=bf16)
    root = Path(root)
    path = cache / f"{token_key(model, trunk, root, names, flip, bf16)}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        sizes = [tuple(int(v) for v in hw) for hw in t["sizes"].tolist()]
        return Tokens(list(names), sizes, t["grid"], t["probs"].numpy(), root)
    tokens = cache_tokens(model, root, names, flip=flip, progress=progress, desc=desc, trunk=trunk, bf16=bf16)
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {"grid": tokens.grid.contiguous(), "probs": torch.from_numpy(np.ascontiguousarray(tokens.probs)),
               "sizes": torch.tensor(tokens.sizes, dtype=torch.int64).reshape(-1, 2)}
    with atomic_write(path, "wb") as f:
        f.write(save(tensors))
    return tokens
