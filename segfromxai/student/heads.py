"""Student heads: what maps the trunk's tokens (or the image's pixels) to K logits, the :data:`HEADS` registry, and
starting a head from local weights.

A head from :data:`HEADS` (default ``linear``: a 1x1 linear probe, the linear evaluation of DINO/DINOv2, Caron et
al. 2021, Oquab et al. 2023; ``std-linear`` first standardises each channel with the training tokens' statistics)
maps each token to K logits: background plus foreground (``binary``) or background plus one
channel per category of the run (``classes``). Logits are upsampled bilinearly to the input size for the loss and
to each image's size for prediction (:func:`view_probs`).

For users with a GPU, ``head`` may instead name a standard segmentation model from torchvision
(:data:`SEGMENTERS`: LR-ASPP or DeepLabV3 on MobileNetV3-Large), trained end to end on the images themselves (the
:class:`segfromxai.student.tokens.Pixels` trunk) with the same targets, rounds, checkpoints and outputs; its
weights come only from a local file (``head_weights``, :func:`load_head_weights`), never from a download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..models.model import read_state_dict
from ..registry import Entry


def linear_head(dim: int, k: int) -> nn.Module:
    """A 1x1 convolution: one linear map per token (``dim * k + k`` parameters)."""
    return nn.Conv2d(dim, k, 1)


class Standardize(nn.Module):
    """Fixed per-channel standardisation of a token grid (B, D, h, w): ``(x - mean) / std``, the statistics of the
    training tokens (:meth:`fit`, before training), kept as buffers so that a saved head carries them."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, chunks: Iterable[torch.Tensor]) -> None:
        """Set mean and standard deviation (population, float64 sums, floor 1e-6) per channel over every token of
        ``chunks``, tensors (..., D) read one at a time (no copy of all the tokens)."""
        n, s, ss = 0, 0.0, 0.0
        for c in chunks:
            x = c.reshape(-1, c.shape[-1]).double()
            n, s, ss = n + len(x), s + x.sum(0), ss + (x * x).sum(0)
        mean = s / max(n, 1)
        self.mean.copy_(mean.float())
        self.std.copy_((ss / max(n, 1) - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[:, None, None]) / self.std[:, None, None]


def std_linear_head(dim: int, k: int) -> nn.Module:
    """Per-channel standardisation with the training tokens' statistics (:class:`Standardize`), then a 1x1
    convolution: the linear probe on tokens of several blocks, whose channels differ in scale by up to 36x (the
    DINOv2 ViT-S/14's last four blocks; a few channels of its inner blocks are tens of times larger than the rest)."""
    return nn.Sequential(Standardize(dim), nn.Conv2d(dim, k, 1))


def bn_linear_head(dim: int, k: int) -> nn.Module:
    """Batch norm, then a 1x1 convolution: DINOv2's linear segmentation head (``BNHead``, Oquab et al. 2023). The
    norm puts every channel on one scale, which a head on several blocks' tokens needs (some channels of a ViT's
    inner blocks are tens of times larger than the rest); at prediction it uses the running statistics of
    training. On the dev photos (issue 32, last four blocks of ``data/dinov2`` at 392 px) it scored 0.588 mean IoU
    against :func:`std_linear_head`'s 0.609: batch statistics and a learnt scale train less well here than a
    fixed standardisation."""
    return nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, k, 1))


def mlp_head(dim: int, k: int, hidden: int = 1024) -> nn.Module:
    """Two 1x1 convolutions with a GELU between (measured worse than the linear probe: it fits label noise)."""
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, k, 1))


def context_head(dim: int, k: int) -> nn.Module:
    """A 3x3 convolution: one linear map of each token and its 8 neighbours (``9 dim k + k`` parameters), so a
    token's label can follow its neighbourhood (a patterned object's tokens that look like background alone)."""
    return nn.Conv2d(dim, k, 3, padding=1, padding_mode="replicate")


# torchvision segmentation models a student can be (trained on the pixels, not on the trunk's tokens)
SEGMENTERS = {"lraspp": "lraspp_mobilenet_v3_large", "deeplabv3": "deeplabv3_mobilenet_v3_large"}


class Segmenter(nn.Module):
    """A torchvision segmentation model (``SEGMENTERS``: LR-ASPP, Howard et al. 2019, or DeepLabV3, Chen et al.
    2017, on a MobileNetV3-Large) as a student on the image itself: input the normalised image (B, 3, h, w), output
    its ``out`` logits (B, K, h, w) at the input size. Built with no weights (``weights=None,
    weights_backbone=None``: torchvision downloads nothing); start it from local weights with ``head_weights``
    (:func:`load_head_weights`). Trained end to end, so it wants a GPU: on 2 CPU cores an LR-ASPP from scratch learned
    nothing in 30 minutes (issue 23)."""

    def __init__(self, arch: str, k: int) -> None:
        super().__init__()
        from torchvision.models import segmentation

        self.net = getattr(segmentation, SEGMENTERS[arch])(weights=None, weights_backbone=None, num_classes=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def _segmenter(arch: str) -> Callable[[int, int], nn.Module]:
    def build(dim: int, k: int) -> nn.Module:
        if dim != 3:
            raise ValueError(f"student {arch!r} reads the image's 3 channels, got features of {dim}")
        return Segmenter(arch, k)
    build.__doc__ = f"torchvision's {SEGMENTERS[arch]} on the image (:class:`Segmenter`)."
    return build


HEADS: dict[str, Entry] = {
    "linear": Entry(linear_head, "a 1x1 convolution: one linear map per token (dim * k + k parameters)"),
    "std-linear": Entry(std_linear_head, "per-channel standardisation with the training tokens' statistics, then "
                                         "a 1x1 convolution"),
    "bn-linear": Entry(bn_linear_head, "batch norm, then a 1x1 convolution (DINOv2's linear segmentation head; "
                                       "measured below std-linear on the dev photos)"),
    "mlp": Entry(mlp_head, "two 1x1 convolutions with a GELU between (measured worse than the linear probe: it fits "
                           "label noise)"),
    "context": Entry(context_head, "a 3x3 convolution: one linear map of each token and its 8 neighbours "
                                   "(9 dim k + k parameters)"),
    **{a: Entry(_segmenter(a), f"torchvision's {SEGMENTERS[a]} on the image (Segmenter)")
       for a in SEGMENTERS},
}


def read_head_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``--head-weights`` file (:func:`segfromxai.models.model.read_state_dict`: a safetensors
    file, or a torch file read with ``weights_only=True``, so a pickle never runs), checked to hold at least one
    tensor and only finite values. Raises ValueError naming the flag and the file."""
    path = Path(path)
    try:
        given, _ = read_state_dict(path)
    except (ValueError, OSError) as e:
        cause = e.__cause__ or e  # its first line: torch's refusal of a pickle runs over many
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise ValueError(f"--head-weights {path}: not weights that can be read safely (a safetensors file, or a "
                         f"torch file of tensors; no pickle is run): {reason}") from e
    if not given:
        raise ValueError(f"--head-weights {path}: holds no tensor")
    for name, t in given.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"--head-weights {path}: tensor {name!r} holds non-finite values (NaN or inf)")
    return given


def load_head_weights(module: nn.Module, path: str | Path) -> int:
    """Start ``module`` from a local state dict (read by :func:`segfromxai.models.model.read_state_dict`:
    ``.safetensors``, else ``torch.load(weights_only=True)``) and return how many tensors it took.

    Lenient, unlike :func:`segfromxai.models.model.load_weights`: a tensor is taken when its name, or the name with
    ``net.`` or (for a classification backbone, ``features.N...`` as torchvision's MobileNetV3 names them)
    ``net.backbone.N...`` in front, is one of the module's with the same shape; the rest (e.g. a classifier of
    another class count) are left as initialised. Raises ValueError when the file cannot be read, holds a
    non-finite value (:func:`read_head_weights`) or none of its tensors fits."""
    path = Path(path)
    given = read_head_weights(path)
    own = module.state_dict()
    taken = {}
    for name, t in given.items():
        for cand in (name, f"net.{name}", "net.backbone." + name.removeprefix("features.")):
            if cand in own and own[cand].shape == t.shape and cand not in taken:
                taken[cand] = t
                break
    if not taken:
        raise ValueError(f"--head-weights {path}: none of its {len(given)} tensors fits the student "
                         f"{type(module).__name__}")
    module.load_state_dict({**own, **taken})
    return len(taken)


def head_logits(head: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """Logits (B, K, gh, gw) of a batch of token grids (B, gh, gw, D)."""
    return head(grid.float().permute(0, 3, 1, 2))


def view_probs(head: nn.Module, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probabilities (B, K, H, W) at ``size`` of token grids with views (B, V, gh, gw, D): logits upsampled
    bilinearly, softmax, averaged over the views (view 1 mirrored back)."""
    out = 0
    for v in range(grid.shape[1]):
        p = F.interpolate(head_logits(head, grid[:, v]), size=size, mode="bilinear", align_corners=False).softmax(1)
        out = out + (p.flip(-1) if v == 1 else p)
    return out / grid.shape[1]
