"""Per-token features for the refiners' graphs: from the classifier's shared pass or from a feature backbone.

A ViT gives a block's keys, queries or values (the output of ``attn.qkv``, split) or the block's output tokens;
a CNN gives its last feature stage (the Grad-CAM layer), one vector per spatial position.

The recipe's ``[features]`` section says where the tokens come from (``model``): the classifier's own forward
pass, or a *feature backbone* apart from it (the embedded ViT-S/14 of ``data/model``, or any timm ViT with local
weights), run with one extra forward and no backward at its own input size or at ``img_size`` (a ViT's position
embedding resampled, so a ViT-S/14 at 392 px gives a 28 x 28 grid). ``"auto"`` (the default) is the classifier
when it is a ViT with the same input, else the embedded ViT-S/14: a CNN's explanation then picks the side of a
cut made on self-supervised tokens (TokenCut, Wang et al. 2022; CutLER, Wang et al. 2023).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .hooks import capture
from .model import LoadedModel, Preprocess, data_dir, default_layer, is_vit, tokens_to_grid
from ..params import Range

FEATURES = ("k", "q", "v", "tokens")
"""What a ViT block gives as token features: its attention's keys, queries or values, or its output tokens."""
Feature = Literal[FEATURES]
FEATURE_MODELS = ("auto", "classifier", "embedded", "dinov2")
"""Named feature models; any other value of ``[features] model`` is a timm model name (weights from
``checkpoint``). ``"dinov2"`` is the self-supervised ViT-S/14 that the embedded model was fine-tuned from
(``data/dinov2``, built by ``scripts/build_dinov2_features.py``): its last-block keys separate objects in real
photos, where the fine-tuned model's tokens know only the synthetic shapes."""


MAX_IMG_SIZE = 1024
"""The largest ``[features] img_size`` (``--features-img-size``): a ViT-S/14 at 1024 px has 73 x 73 tokens, whose
affinity graph (28 million entries) ncut still handles; much larger sizes run out of memory."""


def feature_options(*, model: str = "auto", checkpoint: str = "",
                    img_size: Annotated[int, Range(0, MAX_IMG_SIZE)] = 0,
                    feature: Feature = "k", block: int = -1, drop_key_bias: bool = False) -> None:
    """A recipe's ``[features]``: where a refiner that needs token features (``ncut``) reads them. ``model``:
    ``"auto"`` (the classifier when it is a ViT, else the embedded ViT-S/14), ``"classifier"``, ``"embedded"``,
    ``"dinov2"`` (the self-supervised ViT-S/14 the embedded model was fine-tuned from) or a timm name, with local
    weights ``checkpoint`` (required: a timm name without it would be randomly initialised); ``img_size`` > 0
    (at least the model's patch, at most :data:`MAX_IMG_SIZE`) runs that model at another input size (one extra
    forward, no backward); ``feature`` and ``block`` as in :func:`feature_layer`; ``drop_key_bias`` (ViT keys only) subtracts
    the block's key bias from every key (:func:`key_bias`)."""


def feature_layer(module: torch.nn.Module, *, feature: Feature = "k", block: int = -1) -> str:
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


def key_bias(module: torch.nn.Module, block: int = -1) -> np.ndarray:
    """The key part of a ViT block's ``attn.qkv`` bias, float32 (C,); zeros when the layer has no bias.

    Attention is ``softmax_j(q_i . (k_j + b))`` and ``q_i . b`` is the same for every key ``j``, so the bias ``b``
    shared by all keys never changes an attention weight: it is the part of the keys the model does not use. It
    does dominate their cosines when it is large: in DINOv2's ViT-S/14 (Oquab et al. 2024) its norm (47.7 in the
    last block) equals a key's typical norm, every pair of keys of a photo has cosine above 0.58, and TokenCut's
    graph at ``tau = 0.2`` is complete, with no cut. DINO's ViT-S/16, on which TokenCut was tuned, has no such
    offset.
    """
    if not is_vit(module):
        raise ValueError("drop_key_bias needs a ViT's keys; this model is not a ViT")
    qkv = module.blocks[block].attn.qkv
    c = qkv.weight.shape[0] // 3
    if qkv.bias is None:
        return np.zeros(c, dtype=np.float32)
    return qkv.bias.detach().float().cpu().numpy()[c:2 * c]


def layer_features(module: torch.nn.Module, outputs: dict[str, torch.Tensor], spec: dict[str, Any],
                   input_size: tuple[int, int]) -> np.ndarray:
    """The token features float32 (B, fh, fw, C) of a ``[features]`` section ``spec`` from the recorded ``outputs``
    of ``module`` (keyed by :func:`feature_layer`'s name), less the key bias when ``spec`` asks."""
    layer = feature_layer(module, feature=spec["feature"], block=spec["block"])
    out = token_features(module, outputs[layer], spec["feature"], input_size)
    if spec.get("drop_key_bias"):
        if spec["feature"] != "k":
            raise ValueError(f"drop_key_bias applies to keys (feature = \"k\"), not {spec['feature']!r}")
        out = out - key_bias(module, spec["block"])
    return out


# ------------------------------------------------------------------------------------------------ backbones
@dataclass
class Backbone:
    """A feature model apart from the classifier: its module (eval mode) and its own preprocessing."""

    module: torch.nn.Module
    preprocess: Preprocess
    source: str


def backbone_key(spec: dict[str, Any]) -> tuple[str, str, int]:
    """What identifies a feature model in a recipe's ``[features]`` section: (model, checkpoint, img_size)."""
    return str(spec.get("model", "auto")), str(spec.get("checkpoint", "")), int(spec.get("img_size", 0))


def uses_classifier(classifier: LoadedModel, spec: dict[str, Any]) -> bool:
    """True when the features come from the classifier's own shared pass (no extra forward).

    ``model = "classifier"`` at the classifier's own input size, or ``"auto"`` with a ViT classifier at its own
    size; a CNN classifier with ``"classifier"`` reads its last feature stage.
    """
    model, checkpoint, img_size = backbone_key(spec)
    same_size = img_size == 0 or classifier.preprocess.size == (img_size, img_size)
    if model == "classifier":
        return same_size or not classifier.is_vit
    return model == "auto" and not checkpoint and classifier.is_vit and same_size


def _source_model(classifier: LoadedModel, model: str, checkpoint: str) -> LoadedModel:
    from .model import load_model

    if model == "classifier" or (model == "auto" and classifier.is_vit and not checkpoint):
        return classifier
    if model in ("auto", "embedded"):
        return load_model(None, checkpoint or None, device=classifier.device)  # a checkpoint names its model
    if model == "dinov2":
        return load_model(None, checkpoint or data_dir() / "dinov2", device=classifier.device)
    return load_model(model, checkpoint or None, device=classifier.device)


def load_backbone(classifier: LoadedModel, spec: dict[str, Any]) -> Backbone:
    """Build the feature model of a ``[features]`` section (used when :func:`uses_classifier` is false).

    ``model``: ``"classifier"`` (a copy of it), ``"embedded"`` (the ViT-S/14 of ``data/model``), ``"dinov2"``
    (the self-supervised ViT-S/14 it was fine-tuned from, ``data/dinov2``), ``"auto"``
    (the classifier if it is a ViT, else the embedded model) or a timm name; ``checkpoint``: local weights (a
    model card, safetensors or torch file; with ``"auto"``/``"embedded"`` it replaces the embedded model and names
    its own timm model; a timm name needs one, random weights are refused). ``img_size`` > 0 (at least the
    patch) rebuilds a ViT at that input with its position embedding resampled
    bicubically (:func:`segfromxai.models.model.adapt_state_dict`). Only local files are read.
    """
    from .model import adapt_state_dict, create, load_weights

    model, checkpoint, img_size = backbone_key(spec)
    src = _source_model(classifier, model, checkpoint)
    if src is not classifier and src.source == "random-init":
        raise ValueError(f"model {model!r} has no weights (checkpoint is empty): it would cut on a randomly "
                         "initialised network; give its local weights as checkpoint (--features-checkpoint)")
    pre, module = src.preprocess, src.module
    patch = max(getattr(getattr(module, "patch_embed", None), "patch_size", None) or (0,))
    if img_size and is_vit(module) and img_size < patch:
        raise ValueError(f"img_size = {img_size} is below the model's patch ({patch} px): give 0 (its own input "
                         f"size) or at least {patch}")
    if img_size and is_vit(module) and pre.size != (img_size, img_size):
        module, _ = create(src.timm_name, **{**src.timm_kwargs, "img_size": img_size})
        load_weights(module, adapt_state_dict(src.module.state_dict(), module), source=src.source)
        module = module.to(classifier.device).eval()
        pre = Preprocess(size=(img_size, img_size), mean=pre.mean, std=pre.std, interpolation=pre.interpolation)
    return Backbone(module, pre, f"{src.source or src.timm_name} @ {pre.size[0]}x{pre.size[1]}")


def backbone_input(backbone: Backbone, x: torch.Tensor, classifier_pre: Preprocess,
                   images: Sequence[np.ndarray] | None = None) -> torch.Tensor:
    """The backbone's batch: the original images preprocessed its way, or (no images given) the classifier's
    batch ``x`` un-normalised, resized bicubically to the backbone's size and normalised its way."""
    if images is not None:
        return backbone.preprocess.batch(list(images)).to(x.device)
    mean = torch.tensor(classifier_pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(classifier_pre.std, device=x.device).view(1, 3, 1, 1)
    rgb = x * std + mean
    if tuple(rgb.shape[-2:]) != backbone.preprocess.size:
        rgb = F.interpolate(rgb, size=backbone.preprocess.size, mode="bicubic", align_corners=False,
                            antialias=True).clamp(0, 1)
    bm = torch.tensor(backbone.preprocess.mean, device=x.device).view(1, 3, 1, 1)
    bs = torch.tensor(backbone.preprocess.std, device=x.device).view(1, 3, 1, 1)
    return (rgb - bm) / bs


def backbone_outputs(backbone: Backbone, xb: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """One forward of the backbone (no gradient) recording the outputs of ``layers``."""
    with torch.no_grad(), capture(backbone.module, layers=tuple(layers)) as got:
        backbone.module(xb)
    return {name: got.outputs[name].detach() for name in layers}


_BUILT: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Backbone]] = weakref.WeakKeyDictionary()
"""Backbones built per classifier module; an entry goes with its module (a cache beside the frozen LoadedModel)."""


def backbone_for(classifier: LoadedModel, spec: dict[str, Any]) -> Backbone:
    """The loaded backbone of ``spec``, built once per classifier (per module: copies of a LoadedModel share it)."""
    built = _BUILT.setdefault(classifier.module, {})
    key = backbone_key(spec)
    if key not in built:
        built[key] = load_backbone(classifier, spec)
    return built[key]
