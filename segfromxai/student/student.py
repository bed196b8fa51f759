"""Student segmenter: a light head on a frozen ViT trunk, trained on a run's pseudo-labels, and self-training.

The trunk is a timm ViT (by default the embedded classifier, :func:`segfromxai.models.model.load_model`), frozen; its
last-block patch tokens (after the final norm) are computed once per image, for the image and its left-right
mirror, and kept in memory as float16. A head from :data:`HEADS` (default: a 1x1 linear probe, the linear
evaluation of DINO/DINOv2, Caron et al. 2021, Oquab et al. 2023) maps each token to K logits: background plus
foreground (``binary``) or background plus one channel per category of the run (``classes``). Logits are upsampled
bilinearly to the input size for the loss (cross-entropy, pixels marked 255 ignored) and to each image's size for
prediction. Predicted masks are cleaned with the run recipe's ``[masks]`` section and written as COCO with the
run's categories, as ``run`` writes ``pseudo_labels.json``; in ``binary`` mode each image's category is the
trunk classifier's top-1 class, as ``run`` explains it.

Label cleaning (the student learns from noisy labels, so a few gross errors matter more than many small ones):
``max_area`` drops training images whose pseudo-mask covers more than that share of the image (a swapped
foreground/background), ``min_score`` drops annotations scored below it. Self-training (``rounds`` > 1) relabels
the training images with the previous round's student (averaging the image and its mirror) and trains a fresh
head on those labels; ``confident`` keeps only pixels whose top probability reaches it (the rest are ignored), as
CutLER keeps only confident masks (Wang et al. 2023, "Cut and Learn for Unsupervised Object Detection and
Instance Segmentation"). The seed paper's table (pseudo vs GT, student vs GT, pseudo vs student) comes from
:func:`segfromxai.quality.evaluate.comparisons`.

For users with a GPU, ``head`` may instead name a standard segmentation model from torchvision
(:data:`SEGMENTERS`: LR-ASPP or DeepLabV3 on MobileNetV3-Large), trained end to end on the images themselves (the
:class:`Pixels` trunk) with the same targets, rounds, checkpoints and outputs; its weights come only from a local
file (``head_weights``, :func:`load_weights`), never from a download.

Everything is seeded (head initialisation, batch order per epoch from ``(seed, round, epoch)``), so the same
inputs give the same masks. Each epoch ends with a checkpoint (safetensors: head, optimiser state, epoch) written
atomically; an interrupted run started again with the same settings continues from it and ends with the same
masks. Each finished round keeps its head (``round_<r>/head.safetensors``) and a model card (``card.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..ops import masks as mask_ops
from ..stages.boundary import BOUNDARIES
from ..io.coco import write_coco
from ..models.features import Backbone, load_backbone
from ..fileio import atomic_write
from ..io.images import find_images, load_image
from ..run.manifest import Manifest
from ..models.model import LoadedModel, is_vit, tokens_to_grid, write_card
from .masks import SOFT_MAPS, channel_masks

from ..io.png import IGNORE
UNTRAINED = ("rounds", "boundary", "soft")  # settings that do not change a round's head (its checkpoint key)
MODES = ("auto", "binary", "classes")


def linear_head(dim: int, k: int) -> nn.Module:
    """A 1x1 convolution: one linear map per token (``dim * k + k`` parameters)."""
    return nn.Conv2d(dim, k, 1)


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
    (:func:`load_weights`). Trained end to end, so it wants a GPU: on 2 CPU cores an LR-ASPP from scratch learned
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


HEADS: dict[str, Callable[[int, int], nn.Module]] = {"linear": linear_head, "mlp": mlp_head, "context": context_head,
                                                     **{a: _segmenter(a) for a in SEGMENTERS}}


def load_weights(module: nn.Module, path: str | Path) -> int:
    """Start ``module`` from a local state dict (``.safetensors``, else ``torch.load(weights_only=True)``) and
    return how many tensors it took. A tensor is taken when its name, or the name with ``net.`` or (for a
    classification backbone, ``features.N...`` as torchvision's MobileNetV3 names them) ``net.backbone.N...`` in
    front, is one of the module's with the same shape; the rest (e.g. a classifier of another class count) are
    left as initialised. Raises ValueError when none fits."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        given = load_file(str(path))
    else:
        given = torch.load(path, map_location="cpu", weights_only=True)
        given = given.get("state_dict", given) if isinstance(given, dict) else given
    own = module.state_dict()
    taken = {}
    for name, t in given.items():
        for cand in (name, f"net.{name}", "net.backbone." + name.removeprefix("features.")):
            if cand in own and own[cand].shape == t.shape and cand not in taken:
                taken[cand] = t
                break
    if not taken:
        raise ValueError(f"{path}: none of its {len(given)} tensors fits the student {type(module).__name__}")
    module.load_state_dict({**own, **taken})
    return len(taken)


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class RunSource:
    """What a ``run`` folder offers a student: its image folder, COCO file, categories and ``[masks]`` section."""

    folder: Path
    images: Path
    coco: Path
    categories: list[dict]
    mask_params: dict[str, Any]
    boundary: dict[str, Any] = field(default_factory=lambda: {"method": "none"})


def read_run(folder: str | Path) -> RunSource:
    """Read a ``run`` output folder: ``pseudo_labels.json`` (with the resolved recipe in its ``info``, as in
    ``run.json``) and the image folder named in its manifest header."""
    folder = Path(folder)
    coco, manifest = folder / "pseudo_labels.json", folder / "manifest.jsonl"
    if not coco.is_file():
        raise FileNotFoundError(f"{folder} is not a finished run folder (no pseudo_labels.json)")
    header = Manifest(manifest).read_header() if manifest.is_file() else None
    if not header or "images" not in header:
        raise ValueError(f"{folder}: its manifest.jsonl does not name the image folder")
    doc = json.loads(coco.read_text())
    recipe = doc.get("info", {}).get("recipe", {})
    return RunSource(folder, Path(header["images"]), coco, list(doc["categories"]), dict(recipe.get("masks", {})),
                     dict(recipe.get("boundary", {"method": "none"})))


def held_out(name: str, fraction: float) -> bool:
    """Whether image ``name`` (relative path) is in the held-out share ``fraction``: a stable hash (SHA-1) of the
    name, so the split is the same on every machine and does not move when images are added."""
    h = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < fraction


def image_names(root: str | Path) -> list[str]:
    """Relative paths (POSIX) of the images under ``root``, in :func:`segfromxai.io.images.find_images` order."""
    root = Path(root)
    return [p.name if p == root else p.relative_to(root).as_posix() for p in find_images(root)]


# ------------------------------------------------------------------------------------------------ the trunk
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
    """The trunk of a student that reads the image itself (:data:`SEGMENTERS`): the preprocessed image as a
    "token" grid (B, h, w, 3), one token per pixel."""

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
    (:func:`segfromxai.models.features.load_backbone`; a ViT-S/14 at 392 px gives a 28 x 28 token grid). With ``pixels``
    (a student of :data:`SEGMENTERS`), the :class:`Pixels` trunk with the classifier's preprocessing at that size."""
    if pixels:
        size = (img_size, img_size) if img_size else model.preprocess.size
        return Backbone(Pixels(), dataclasses.replace(model.preprocess, size=size), "pixels")
    if img_size and model.preprocess.size != (img_size, img_size):
        return load_backbone(model, {"model": "classifier", "img_size": int(img_size)})
    return Backbone(model.module, model.preprocess, model.source)


def _batch_tokens(model: LoadedModel, trunk: Backbone, ims: list[np.ndarray], flip: bool
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
    by ``trunk`` (default: :func:`student_trunk` of ``model``, the classifier at its own size)."""
    from tqdm import tqdm

    trunk = trunk if trunk is not None else student_trunk(model)
    root, grids, probs, sizes = Path(root), [], [], []
    model.module.eval()
    with torch.no_grad():
        for s in tqdm(range(0, len(names), batch_size), desc=desc, leave=False, disable=not progress):
            ims = [load_image(root / n) for n in names[s:s + batch_size]]
            sizes += [im.shape[:2] for im in ims]
            g, p = _batch_tokens(model, trunk, ims, flip)
            grids.append(g)
            probs.append(p)
    d = trunk.module.num_features
    grid = torch.cat(grids) if grids else torch.zeros((0, 2 if flip else 1, 1, 1, d), dtype=torch.float16)
    return Tokens(list(names), sizes, grid, np.concatenate(probs) if probs else np.zeros((0, 0), np.float32), root)


def token_key(model: LoadedModel, trunk: Backbone, root: Path, names: list[str], flip: bool) -> str:
    """What identifies a set of cached tokens: the classifier, the trunk and its input, the images (relative names,
    byte sizes and modification times) and the views."""
    stats = [(n, (root / n).stat().st_size, (root / n).stat().st_mtime_ns) for n in names]
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


# ------------------------------------------------------------------------------------------------ labels
def label_map(anns: list[dict], size: tuple[int, int], channel: dict[int, int]) -> np.ndarray:
    """uint8 (H, W) label map of an image's annotations: 0 background, ``channel[category_id]`` inside a mask
    (later annotations over earlier ones)."""
    out = np.zeros(size, np.uint8)
    for a in anns:
        out[mask_ops.decode(a["segmentation"])] = channel[int(a["category_id"])]
    return out


def read_annotations(coco: str | Path) -> tuple[dict[str, list[dict]], dict[str, tuple[int, int]], dict]:
    """A COCO file's annotations and (H, W) by image file name, and the whole document."""
    doc = json.loads(Path(coco).read_text())
    by_id = {img["id"]: img["file_name"] for img in doc["images"]}
    anns: dict[str, list[dict]] = {img["file_name"]: [] for img in doc["images"]}
    for a in doc["annotations"]:
        anns[by_id[a["image_id"]]].append(a)
    sizes = {img["file_name"]: (int(img["height"]), int(img["width"])) for img in doc["images"]}
    return anns, sizes, doc


def choose_mode(mode: Literal["auto", "binary", "classes"], anns: dict[str, list[dict]]) -> str:
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


# ------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class StudentConfig:
    """How a student is trained and used (every field is a ``segfromxai student`` option).

    head : a name in :data:`HEADS`. mode : ``binary``, ``classes`` or ``auto`` (see :func:`choose_mode`).
    epochs, lr, weight_decay, batch_size : AdamW on the head, batches of (image, view) pairs in an order drawn
    from ``(seed, round, epoch)``. max_area, min_score : label-cleaning filters (None: off). rounds : training
    rounds (round 1 on the pseudo-labels, each later one on the previous student's labels). confident : keep only
    pixels of the student's labels with a top probability at least this (None: all). flip : cache mirrored tokens
    too (flip augmentation). val_fraction, holdout : see :func:`split`. boundary : a name in
    :data:`segfromxai.stages.boundary.BOUNDARIES` for the predicted masks (None: the training run's recipe's method and
    parameters; another method runs with its defaults; ``none``: off). soft : the boundary method's soft map, a
    name in :data:`segfromxai.student.masks.SOFT_MAPS`. img_size : the trunk's input side in pixels (0: the
    classifier's own; see :func:`student_trunk`); 392 (28 x 28 tokens for the embedded ViT-S/14) measured better
    than its own 224 on synth; for a segmenter of :data:`SEGMENTERS` (``head`` ``lraspp`` or ``deeplabv3``, trained
    on the image itself at ``img_size``, 0: the classifier's input size) it is the training and prediction size.
    head_weights : a local state dict to start the head from (:func:`load_weights`; e.g. an ImageNet MobileNetV3
    for a segmenter's backbone), None: from scratch.
    """

    head: str = "linear"
    mode: str = "auto"
    epochs: int = 30
    lr: float = 0.01
    weight_decay: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    max_area: float | None = None
    min_score: float | None = None
    rounds: int = 1
    confident: float | None = None
    flip: bool = True
    val_fraction: float = 0.2
    holdout: bool = True
    boundary: str | None = None
    soft: str = "ramp"
    img_size: int = 392
    head_weights: str | None = None

    @property
    def pixels(self) -> bool:
        """Whether the student reads the image itself (a torchvision segmenter) rather than the trunk's tokens."""
        return self.head in SEGMENTERS

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown student head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.boundary is not None and self.boundary not in BOUNDARIES:
            raise ValueError(f"unknown boundary method {self.boundary!r}; choose one of {', '.join(BOUNDARIES)}")
        if self.soft not in SOFT_MAPS:
            raise ValueError(f"unknown soft map {self.soft!r}; choose one of {', '.join(SOFT_MAPS)}")
        if self.img_size < 0:
            raise ValueError(f"img_size must be >= 0 (0: the classifier's own), got {self.img_size}")
        if self.mode not in MODES:
            raise ValueError(f"unknown student mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def settings_key(*parts: Any) -> str:
    """A short digest of JSON-serialisable settings (which checkpoint belongs to which training)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, head: nn.Module, opt: torch.optim.Optimizer, epoch: int, key: str) -> None:
    """Head weights and AdamW state after ``epoch`` as safetensors, written atomically."""
    from safetensors.torch import save

    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v).cpu().reshape(-1).contiguous().clone()
                        for k, v in st.items()})
    with atomic_write(path, "wb") as f:
        f.write(save(tensors, metadata={"epoch": str(epoch), "key": key}))


def load_checkpoint(path: Path, head: nn.Module, opt: torch.optim.Optimizer, key: str) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint` for the same ``key``; returns its epoch (0: none)."""
    from safetensors import safe_open

    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            return 0
        sd = {k: f.get_tensor(k) for k in f.keys()}
    head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v.reshape(
                opt.param_groups[0]["params"][int(i)].shape)
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return int(meta["epoch"])


def new_head(config: StudentConfig, dim: int, k: int, round_: int) -> nn.Module:
    """A freshly initialised head, seeded by ``(seed, round)``, started from ``config.head_weights`` when given."""
    torch.manual_seed(config.seed * 1000 + round_)
    head = HEADS[config.head](dim, k)
    if config.head_weights:
        load_weights(head, config.head_weights)
    return head


def train_head(tokens: Tokens, targets: np.ndarray, keep: np.ndarray, k: int, config: StudentConfig, *,
               round_: int = 1, checkpoint: Path | None = None, key: str = "", progress: bool = False,
               on_epoch: Callable[[int, int], None] | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Train a head on cached tokens: targets uint8 (N, h, w) (255 ignored) for the images where ``keep``, every
    view (view 1's target mirrored). Resumes from ``checkpoint`` when it holds this ``key``; writes it after each
    epoch, then calls ``on_epoch(round, epoch)``. Trains on ``device`` (the tokens stay on the CPU, each batch is
    moved) and returns the head on the CPU."""
    from tqdm import tqdm

    head = new_head(config, tokens.grid.shape[-1], k, round_).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = load_checkpoint(checkpoint, head, opt, key) if checkpoint is not None else 0
    idx = np.flatnonzero(keep)
    pairs = np.array([(i, v) for i in idx for v in range(tokens.grid.shape[1])], dtype=np.int64).reshape(-1, 2)
    size = targets.shape[-2:]
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    for epoch in tqdm(range(start + 1, config.epochs + 1), desc=f"round {round_}", leave=False,
                      disable=not progress, initial=start, total=config.epochs):
        order = np.random.default_rng([config.seed, round_, epoch]).permutation(len(pairs))
        head.train()
        for s in range(0, len(order), config.batch_size):
            i, v = pairs[order[s:s + config.batch_size]].T
            if len(i) < 2 and batch_norm:  # batch norm cannot train on one image
                continue
            y = torch.from_numpy(targets[i]).long()
            y = torch.where(torch.from_numpy(v == 1)[:, None, None], y.flip(-1), y).to(device)
            if not (y != IGNORE).any():
                continue
            logits = F.interpolate(head_logits(head, tokens.grid[i, v].to(device)), size=size, mode="bilinear",
                                   align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        if checkpoint is not None:
            save_checkpoint(checkpoint, head, opt, epoch, key)
        if on_epoch is not None:
            on_epoch(round_, epoch)
    return head.cpu().eval()


# ------------------------------------------------------------------------------------------------ prediction
@dataclass(frozen=True)
class Labeller:
    """What turns a student's probabilities into COCO annotations: the mode, the run's categories, the category of
    each trunk class (binary mode; ``fallback`` for classes the run does not name), the ``[masks]`` section and the
    boundary stage (``boundary``, a name in :data:`segfromxai.stages.boundary.BOUNDARIES`, with ``boundary_params``, on
    the soft map ``soft`` of :data:`segfromxai.student.masks.SOFT_MAPS`)."""

    mode: str
    categories: list[dict]
    class_category: dict[int, int]
    fallback: int
    mask_params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    boundary: str = "none"
    boundary_params: dict[str, Any] = field(default_factory=dict)
    soft: str = "ramp"


def annotations_of(probs: np.ndarray, class_probs: np.ndarray, lab: Labeller, *, image: np.ndarray | None = None,
                   grid: tuple[int, int] = (1, 1)) -> list[dict]:
    """Annotations of one image from the student's probabilities float32 (K, H, W): per foreground channel, the
    cleaned masks of the pixels where it wins, moved onto the image's edges by ``lab.boundary``
    (:func:`segfromxai.student.masks.channel_masks`; ``image`` uint8 (H, W, 3) RGB is its guide, ``grid`` the
    student's token grid). Binary: category of the trunk's top-1 class, score = its probability times the mean
    foreground probability in the mask; classes: the channel's category, score = its mean probability in the
    mask."""
    found = channel_masks(probs, image, grid=grid, boundary=lab.boundary, params=lab.boundary_params, soft=lab.soft)
    out = []
    for c, mask in enumerate(found, start=1):
        if lab.mode == "binary":
            top = int(class_probs.argmax()) if class_probs.size else -1
            cat, conf = lab.class_category.get(top, lab.fallback), float(class_probs.max()) if class_probs.size else 1.0
        else:
            cat, conf = int(lab.categories[c - 1]["id"]), 1.0
        for m in mask_ops.clean([mask], **lab.mask_params):
            out.append({"category_id": cat, "segmentation": mask_ops.encode(m),
                        "score": conf * float(probs[c][m].mean()), "attributes": dict(lab.provenance)})
    return out


def predict(head: nn.Module, tokens: Tokens, lab: Labeller, *, chunk: int = 16, workers: int | None = None
            ) -> list[dict]:
    """COCO records (see :mod:`segfromxai.io.coco`) of every image of ``tokens``: image ids 1, 2, ... in order, each
    image written with or without masks, as ``run`` writes them. The boundary stage (unless ``none``) reads each
    image from ``tokens.root`` as its guide.

    ``chunk`` images at a time: their probabilities come from the head in this thread (no gradient), then their
    masks (image read, boundary stage, cleaning) on ``workers`` threads with a one-thread BLAS
    (:func:`segfromxai.run.pipeline.thread_map`, as ``run`` labels a batch); every step is deterministic per image, so
    the records do not depend on ``workers``."""
    from ..run.pipeline import thread_map

    if lab.boundary != "none" and tokens.root is None:
        raise ValueError(f"boundary method {lab.boundary!r} needs the images: tokens without a root folder")
    grid = tuple(tokens.grid.shape[2:4])
    records = []
    for s in range(0, len(tokens.names), chunk):
        idx = list(range(s, min(len(tokens.names), s + chunk)))
        with torch.no_grad():
            probs = {i: view_probs(head, tokens.grid[i:i + 1, :1], tuple(tokens.sizes[i]))[0].numpy() for i in idx}

        def masks_of(i: int) -> list[dict]:
            guide = load_image(Path(tokens.root) / tokens.names[i]) if lab.boundary != "none" else None
            return annotations_of(probs[i], tokens.probs[i], lab, image=guide, grid=grid)

        for i, anns in zip(idx, thread_map(masks_of, idx, workers)):
            h, w = tokens.sizes[i]
            image = {"id": i + 1, "file_name": tokens.names[i], "height": int(h), "width": int(w)}
            records.append({"image": image, "annotations": anns})
    return records


def write_labels(path: Path, records: list[dict], lab: Labeller, info: dict[str, Any]) -> dict:
    """Write a student's records as COCO (the run's categories)."""
    return write_coco(path, lambda: iter(records), categories=lab.categories, info=info)


def subset_coco(src: str | Path, names: list[str], path: Path) -> Path:
    """Write the images ``names`` of a COCO file (and their annotations) to ``path``: pseudo-labels scored on the
    same images as the student."""
    anns, sizes, doc = read_annotations(src)
    reserved = ("id", "image_id", "area", "bbox", "iscrowd")
    wanted = [n for n in names if n in sizes]
    images = {img["file_name"]: img for img in doc["images"]}
    records = [{"image": images[n], "annotations": [{k: v for k, v in a.items() if k not in reserved}
                                                    for a in anns[n]]} for n in wanted]
    write_coco(path, lambda: iter(records), categories=doc["categories"], info=doc.get("info", {}))
    return path


def score(student: Path, *, gt: str | Path | None, pseudo: Path | None) -> dict[str, dict[str, Any]]:
    """The seed paper's table for a student's masks: pseudo vs GT, student vs GT, pseudo vs student (the columns
    whose two sources are given), through :mod:`segfromxai.quality.evaluate`."""
    from ..quality.evaluate import comparisons, evaluate

    if pseudo is not None:
        return comparisons(pseudo, gt=gt, student=student)
    if gt is None:
        return {}
    return {"student vs GT": evaluate(student, gt)}


# ------------------------------------------------------------------------------------------------ a whole job
@dataclass(frozen=True)
class Split:
    """Images to train on (from the training run) and to predict (under ``--images``), by relative name."""

    train: list[str]
    test: list[str]
    held_out: bool


def split(train_names: list[str], train_root: Path, images: Path, config: StudentConfig) -> Split:
    """The student never predicts (for scoring) images it trained on unless asked: when ``images`` is the training
    run's image folder and ``config.holdout``, the images with :func:`held_out` (``val_fraction``) are left out of
    training and are the only ones predicted; otherwise it trains on every image and predicts every image."""
    test = image_names(images)
    same = Path(images).resolve() == Path(train_root).resolve()
    if not (same and config.holdout):
        return Split(sorted(train_names), test, False)
    f = config.val_fraction
    out = Split(sorted(n for n in train_names if not held_out(n, f)), [n for n in test if held_out(n, f)], True)
    if not out.test or not out.train:
        raise ValueError(f"holding out {f:.0%} of {len(test)} images leaves {len(out.train)} to train on and "
                         f"{len(out.test)} to score; change --val-fraction")
    return out


def make_labeller(model: LoadedModel, src: RunSource, anns: dict[str, list[dict]], mode: str,
                  config: StudentConfig) -> Labeller:
    """The :class:`Labeller` of a student trained on ``src`` (trunk classes matched to the run's categories by name;
    fallback: the category with most training masks)."""
    by_name = {c["name"]: int(c["id"]) for c in src.categories}
    counts: dict[int, int] = {}
    for v in anns.values():
        for a in v:
            counts[int(a["category_id"])] = counts.get(int(a["category_id"]), 0) + 1
    fallback = max(counts, key=lambda c: (counts[c], -c)) if counts else int(src.categories[0]["id"])
    class_category = {i: by_name[c] for i, c in enumerate(model.classes) if c in by_name}
    method, params = student_boundary(src.boundary, config.boundary)
    provenance = {"student": config.head, "mode": mode, "trunk": model.source, "boundary": method}
    return Labeller(mode, src.categories, class_category, fallback, src.mask_params, provenance, method, params,
                    config.soft)


def student_boundary(recipe: dict[str, Any], method: str | None = None) -> tuple[str, dict[str, Any]]:
    """The boundary method and parameters of a student's masks: the training run's recipe's ``[boundary]``
    (``{"method": ..., **params}``), or ``method`` when given (with the recipe's parameters when it is the recipe's
    method, else its own defaults)."""
    given = dict(recipe) if recipe else {"method": "none"}
    own = str(given.pop("method", "none"))
    if method is None or method == own:
        return own, given
    return method, {}


def save_round(folder: Path, head: nn.Module, model: LoadedModel, *, channels: list[str], key: str,
               extra: dict[str, Any]) -> Path:
    """Write a round's head (``head.safetensors``) and its model card (:func:`segfromxai.models.model.write_card`)."""
    from safetensors.torch import save

    from ..models.model import sha256

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "head.safetensors", "wb") as f:
        f.write(save({k: v.contiguous() for k, v in head.state_dict().items()}, metadata={"key": key}))
    card = {"timm_name": model.timm_name, "timm_kwargs": model.timm_kwargs, "classes": channels,
            "preprocess": model.preprocess.to_dict(), "weights": "head.safetensors",
            "weights_sha256": sha256(folder / "head.safetensors"), "kind": "segfromxai-student",
            "trunk": model.source, "key": key, **extra}
    return write_card(folder / "card.json", card)


def load_round(folder: Path, config: StudentConfig, dim: int, k: int, key: str) -> nn.Module | None:
    """A finished round's head when ``folder`` holds one for ``key``, else None."""
    from safetensors.torch import load_file

    card = folder / "card.json"
    if not card.is_file() or json.loads(card.read_text()).get("key") != key:
        return None
    head = HEADS[config.head](dim, k)
    head.load_state_dict(load_file(str(folder / "head.safetensors")))
    return head.eval()


def load_student(card: str | Path, *, device: str = "cpu") -> tuple[LoadedModel, nn.Module, dict[str, Any]]:
    """A trained student from its round folder or ``card.json``: the classifier (from the card's ``trunk``), the
    head and the card. The classifier is reloaded with :func:`segfromxai.models.model.load_model` (a card path, or the
    default); the head reads the tokens of ``student_trunk(model, card["config"]["img_size"])`` (with ``pixels`` for
    a segmenter of :data:`SEGMENTERS`)
    (:func:`student_trunk`, :func:`cache_tokens`)."""
    from safetensors.torch import load_file

    from ..models.model import load_model, read_card

    path = Path(card)
    path = path / "card.json" if path.is_dir() else path
    c = read_card(path)
    trunk = c["trunk"] if Path(c["trunk"]).exists() else None
    model = load_model(checkpoint=trunk, device=device)
    name = c["config"]["head"]
    head = HEADS[name](Pixels.num_features if name in SEGMENTERS else int(model.module.num_features),
                       len(c["classes"]))
    head.load_state_dict(load_file(str(path.parent / c["weights"])))
    return model, head.eval(), c


@dataclass
class Job:
    """A student job's data: the training run, the split, cached tokens, targets and the labeller."""

    src: RunSource
    split: Split
    train: Tokens
    test: Tokens
    targets: np.ndarray
    keep: np.ndarray
    channels: list[str]
    labeller: Labeller
    input_size: tuple[int, int] = (224, 224)


def prepare(train_run: str | Path, images: str | Path, *, model: LoadedModel, config: StudentConfig,
            progress: bool = False, cache: Path | None = None) -> Job:
    """Read the training run, split the images, cache the trunk's tokens once (on disk in ``cache`` when given,
    :func:`stored_tokens`) and build round 1's targets."""
    src = read_run(train_run)
    anns, sizes, _ = read_annotations(src.coco)
    sp = split(list(anns), src.images, Path(images), config)
    anns = {n: anns[n] for n in sp.train}
    mode = choose_mode(config.mode, anns)
    channel = {int(c["id"]): (1 if mode == "binary" else j + 1) for j, c in enumerate(src.categories)}
    channels = ["background", "foreground"] if mode == "binary" else ["background", *(c["name"] for c in
                                                                                     src.categories)]
    trunk = student_trunk(model, config.img_size, pixels=config.pixels)
    train = stored_tokens(model, src.images, sp.train, cache=cache, trunk=trunk, flip=config.flip, progress=progress,
                          desc="training tokens")
    if sp.test == sp.train and Path(images).resolve() == src.images.resolve():
        test = Tokens(train.names, train.sizes, train.grid[:, :1], train.probs, train.root)
    else:
        test = stored_tokens(model, images, sp.test, cache=cache, trunk=trunk, flip=False, progress=progress,
                             desc="tokens to predict")
    targets, keep = pseudo_targets(anns, sizes, sp.train, trunk.preprocess.size, channel,
                                   max_area=config.max_area, min_score=config.min_score)
    if not keep.any():
        raise ValueError(f"no training image left: {len(sp.train)} images in {src.coco}, none with a mask that "
                         "passes the filters (--max-area, --min-score)")
    return Job(src, sp, train, test, targets, keep, channels, make_labeller(model, src, anns, mode, config),
               trunk.preprocess.size)


def run_round(job: Job, round_: int, key: str, out: Path, *, model: LoadedModel, config: StudentConfig,
              progress: bool = False, on_epoch: Callable[[int, int], None] | None = None) -> nn.Module:
    """Train (or reload, when ``out/round_<r>`` holds it) round ``round_``'s head and write its labels."""
    folder = out / f"round_{round_}"
    dim, k = int(job.train.grid.shape[-1]), len(job.channels)
    head = load_round(folder, config, dim, k, key)
    if head is None:
        folder.mkdir(parents=True, exist_ok=True)
        ckpt = folder / "checkpoint.safetensors"
        head = train_head(job.train, job.targets, job.keep, k, config, round_=round_, checkpoint=ckpt, key=key,
                          progress=progress, on_epoch=on_epoch, device=model.device)
        extra = {"config": config.to_dict(), "round": round_, "mode": job.labeller.mode,
                 "train_run": str(job.src.folder), "n_train": int(job.keep.sum()), "held_out": job.split.held_out,
                 "input_size": list(job.input_size)}
        save_round(folder, head, model, channels=job.channels, key=key, extra=extra)
        ckpt.unlink(missing_ok=True)
    return head


def label_info(job: Job, config: StudentConfig, round_: int) -> dict[str, Any]:
    """The COCO ``info`` of a student's labels: what trained it, on what, and the versions."""
    from ..run.outdir import versions

    return {"description": f"segfromxai student masks (round {round_})", "student": config.to_dict(),
            "round": round_, "mode": job.labeller.mode, "train_run": str(job.src.folder),
            "n_train": int(job.keep.sum()), "held_out": job.split.held_out, "versions": versions()}


def train_student(train_run: str | Path, images: str | Path, out: str | Path, *, model: LoadedModel,
                  config: StudentConfig = StudentConfig(), gt: str | Path | None = None,
                  pseudo: str | Path | None = None, progress: bool = False,
                  on_epoch: Callable[[int, int], None] | None = None,
                  log: Callable[[str], None] | None = None, cache: str | Path | None = "tokens") -> dict[str, Any]:
    """Train a student on the pseudo-labels of ``train_run``, predict ``images``, and self-train ``config.rounds``.

    Writes ``out/round_<r>/`` (``head.safetensors``, ``card.json``, ``student_labels.json``, and with ``gt`` or
    ``pseudo`` ``metrics.json`` and ``per_image.csv``), then the last round's ``out/student_labels.json``,
    ``out/metrics.json`` (:func:`segfromxai.quality.evaluate.write_evaluation`'s format), ``out/report.html`` (the
    evaluation report with the student column and contact sheets, images from ``images``) and ``out/student.json``
    (the headline numbers of every round). ``pseudo`` is a run folder over ``images`` (default, when the student
    holds out part of the training folder: the training run); its labels are scored on the images the student
    predicts (``out/pseudo_scored.json``). ``log`` receives each round's table. ``cache``: the folder of the
    trunk's tokens (:func:`stored_tokens`; relative: under ``out``; None: kept in memory only). Returns
    ``student.json``'s content.
    """
    from ..quality.evaluate import headline, table, write_evaluation

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = None if cache is None else out / cache
    job = prepare(train_run, images, model=model, config=config, progress=progress, cache=cache)
    source = read_run(pseudo).coco if pseudo is not None else job.src.coco if job.split.held_out else None
    scored = subset_coco(source, job.split.test, out / "pseudo_scored.json") if source is not None else None
    trained = {k: v for k, v in config.to_dict().items() if k not in UNTRAINED}
    key = settings_key(trained, job.split.train, model.source)
    rounds, results, records = [], {}, []
    for r in range(1, config.rounds + 1):
        key = settings_key(key, r)
        head = run_round(job, r, key, out, model=model, config=config, progress=progress, on_epoch=on_epoch)
        records = predict(head, job.test, job.labeller)
        labels = out / f"round_{r}" / "student_labels.json"
        write_labels(labels, records, job.labeller, label_info(job, config, r))
        results = score(labels, gt=gt, pseudo=scored)
        if results:
            write_evaluation(labels.parent, results)
            if log is not None:
                log(f"round {r} ({job.labeller.mode} {config.head} student, {int(job.keep.sum())} training "
                    f"images, {len(job.split.test)} scored):\n" + table({n: headline(x) for n, x in results.items()}))
        rounds.append({"round": r, "n_train": int(job.keep.sum()),
                       "table": {n: headline(x) for n, x in results.items()}})
        if r < config.rounds:
            job.targets, job.keep = student_targets(head, job.train, job.input_size,
                                                    confident=config.confident, max_area=config.max_area)
    write_labels(out / "student_labels.json", records, job.labeller, label_info(job, config, config.rounds))
    summary = {"config": config.to_dict(), "train_run": str(job.src.folder), "images": str(images),
               "held_out": job.split.held_out, "n_predicted": len(job.split.test), "rounds": rounds}
    write_summary(out, summary, results, images=Path(images))
    return summary


def write_summary(out: Path, summary: dict[str, Any], results: dict[str, dict[str, Any]], *, images: Path) -> None:
    """The last round's ``metrics.json``, ``per_image.csv`` and ``report.html`` (when ``results`` holds scores,
    contact sheets from ``images``) and ``student.json`` (``summary``) in ``out``."""
    from ..quality.evaluate import json_safe, write_evaluation, write_evaluation_report

    if results:
        write_evaluation(out, results)
        write_evaluation_report(out, results, settings=summary, images=images, title="segfromxai student report")
    with atomic_write(out / "student.json") as f:
        json.dump(json_safe(summary), f, indent=2)
