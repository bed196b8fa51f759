"""Build a timm classifier (name, local checkpoint, model card, or the embedded default) with its preprocessing.

Weights are read only from local files with ``weights_only=True`` or safetensors; ``pretrained=True`` asks timm's
hub loader and is for users with internet access. Preprocessing resizes the whole image to the model's input size
(no centre crop, so every pixel of the image is covered by the token grid and masks can be mapped back to the full
image), then normalises with the model's mean and std.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write

CARD_FORMAT = "segfromxai-model-card/1"
CARD_NAME = "card.json"
_INTERPOLATIONS = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1}  # PIL resampling codes


def data_dir() -> Path:
    """The folder holding the embedded default model and samples (``$SEGFROMXAI_DATA`` or the repo's ``data/``)."""
    env = os.environ.get("SEGFROMXAI_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def default_card_path() -> Path:
    return data_dir() / "model" / CARD_NAME


@dataclass(frozen=True)
class Preprocess:
    """Resize to ``size`` (H, W) with ``interpolation``, scale to [0, 1], normalise with ``mean``/``std``."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize": "whole image, no crop"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        size = d["input_size"]
        return cls(size=(int(size[-2]), int(size[-1])), mean=tuple(map(float, d["mean"])),
                   std=tuple(map(float, d["std"])), interpolation=d.get("interpolation", "bicubic"))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Preprocess one RGB uint8 image (H, W, 3) into a float32 tensor (3, h, w)."""
        from PIL import Image

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        h, w = self.size
        if image.shape[:2] != (h, w):
            resample = _INTERPOLATIONS.get(self.interpolation, 3)
            image = np.array(Image.fromarray(image).resize((w, h), resample=resample))
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def batch(self, images: list[np.ndarray]) -> torch.Tensor:
        """Preprocess a list of RGB images into one (B, 3, h, w) batch."""
        return torch.stack([self(im) for im in images])


@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready to explain: the module (eval mode), its class names and its preprocessing.

    Frozen: a changed copy is made with :func:`dataclasses.replace` (it shares the module); caches built for the
    classifier live beside it, keyed by its module (e.g. :func:`segfromxai.models.features.backbone_for`)."""

    module: nn.Module
    classes: list[str]
    preprocess: Preprocess
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] | None = None
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def is_vit(self) -> bool:
        return is_vit(self.module)

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """Logits (B, C) of a list of RGB images."""
        with torch.no_grad():
            return self.module(self.preprocess.batch(images).to(self.device))


def is_vit(module: nn.Module) -> bool:
    """True for timm transformer classifiers with a token sequence (``blocks``, ``patch_embed``, prefix tokens)."""
    return all(hasattr(module, a) for a in ("blocks", "patch_embed", "num_prefix_tokens"))


def token_grid(module: nn.Module, input_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The patch grid (h, w) of a timm ViT, read from the model (for ``input_size`` when it is dynamic)."""
    if not is_vit(module):
        raise TypeError(f"{type(module).__name__} is not a Vision Transformer (no patch embedding / token blocks)")
    pe = module.patch_embed
    if input_size is not None and hasattr(pe, "dynamic_feat_size"):
        return tuple(pe.dynamic_feat_size(input_size))
    return tuple(pe.grid_size)


def tokens_to_grid(module: nn.Module, tokens: torch.Tensor, input_size: tuple[int, int] | None = None
                   ) -> torch.Tensor:
    """A ViT's token sequence (B, N, ...) as its patch grid (B, gh, gw, ...): prefix tokens (class, registers,
    distillation) dropped, patches in row-major order; the grid is read from the model."""
    gh, gw = token_grid(module, input_size)
    patches = tokens[:, int(module.num_prefix_tokens):]
    return patches.reshape(tokens.shape[0], gh, gw, *tokens.shape[2:])


# ------------------------------------------------------------------------------------------------ construction
def _check_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}" if close else "; see timm.list_models() for the names"
    raise ValueError(f"unknown timm model {name!r}{hint}")


def create(name: str, *, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
           pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Create timm model ``name``; returns the module and the kwargs that rebuild it."""
    import timm

    _check_name(name)
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if img_size is not None:
        kw["img_size"] = img_size if isinstance(img_size, int) else list(img_size)
    try:
        module = timm.create_model(name, pretrained=pretrained, **kw)
    except TypeError as e:  # CNNs take no img_size
        if "img_size" not in kw:
            raise
        kw.pop("img_size")
        try:
            module = timm.create_model(name, pretrained=pretrained, **kw)
        except TypeError:
            raise e from None
    return module, kw


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read weights from a local safetensors or torch file (``weights_only=True``); returns (state_dict, metadata).

    A torch file may hold the state dict itself or wrap it under ``state_dict``, ``model`` or ``state_dict_ema``;
    a ``module.`` prefix (DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        sd, meta = {}, {}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on truncated or bad files
            raise ValueError(f"cannot read checkpoint {path} as a safetensors file (truncated or not safetensors): "
                             f"{e}") from e
        return sd, meta
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported as a bad checkpoint
        raise ValueError(f"cannot read checkpoint {path} as a torch file with weights_only=True: {e}") from e
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def head_keys(module: nn.Module) -> list[str]:
    """State-dict keys of the classifier head, from timm's ``pretrained_cfg['classifier']``."""
    cls = getattr(module, "pretrained_cfg", {}).get("classifier") or "head"
    names = [cls] if isinstance(cls, str) else list(cls)
    return [k for k in module.state_dict() if any(k == n or k.startswith(n + ".") for n in names)]


def checkpoint_num_classes(module: nn.Module, sd: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of the head stored in ``sd`` (None when it stores no head).

    The head is found by timm's ``pretrained_cfg['classifier']`` name in ``sd`` itself, so a model built without a
    head (``num_classes=0``, e.g. the DINOv2 ViTs) still reads the class count of a checkpoint that has one.
    """
    cls = getattr(module, "pretrained_cfg", {}).get("classifier") or "head"
    for name in [cls] if isinstance(cls, str) else list(cls):
        w = sd.get(f"{name}.weight")
        if w is not None and w.ndim >= 2:
            return int(w.shape[0])
    for k in head_keys(module):
        if k.endswith("weight") and k in sd:
            return int(sd[k].shape[0])
    return None


def adapt_state_dict(sd: dict[str, torch.Tensor], module: nn.Module, *,
                     drop_head: bool = False) -> dict[str, torch.Tensor]:
    """Fit ``sd`` to ``module``: resample a ViT position embedding to the model's grid, optionally drop the head.

    Position embeddings are resampled bicubically over the patch grid, prefix tokens kept
    (``timm.layers.resample_abs_pos_embed``).
    """
    from timm.layers import resample_abs_pos_embed

    sd = dict(sd)
    if drop_head:
        for k in head_keys(module):
            sd.pop(k, None)
    target = module.state_dict()
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        npt = 0 if getattr(module, "no_embed_class", False) else int(getattr(module, "num_prefix_tokens", 0))
        n_src = sd["pos_embed"].shape[1] - npt
        side = int(round(n_src**0.5))
        if side * side != n_src:
            raise ValueError(f"cannot resample a position embedding of {n_src} patch tokens (not a square grid)")
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"].float(), new_size=list(token_grid(module)),
                                                 old_size=[side, side], num_prefix_tokens=npt)
    return sd


def load_weights(module: nn.Module, sd: dict[str, torch.Tensor], *, source: str, strict: bool = True) -> None:
    """Load ``sd`` into ``module``, casting dtypes; a misfit raises ValueError naming missing/unexpected/mis-shaped keys."""
    target = module.state_dict()
    # BatchNorm's step counter is not a weight: torch fills it in for old checkpoints, and so do we
    sd = {**{k: v for k, v in target.items() if k.endswith("num_batches_tracked") and k not in sd}, **sd}
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in target.items() if k in sd and sd[k].shape != v.shape]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        for title, items in (("mis-shaped", shapes), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{title} keys: {', '.join(items[:5])}{more}")
        raise ValueError(f"checkpoint {source} does not fit the architecture {type(module).__name__}: "
                         + "; ".join(parts))
    module.load_state_dict({k: v.to(target[k].dtype) for k, v in sd.items() if k in target}, strict=strict)


def _preprocess_from_timm(module: nn.Module) -> Preprocess:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=module)
    size = cfg["input_size"][-2:]
    if is_vit(module):
        size = tuple(int(g * p) for g, p in zip(module.patch_embed.grid_size, module.patch_embed.patch_size))
    return Preprocess(size=tuple(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=cfg.get("interpolation", "bicubic"))


def sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, or ValueError when torch does not know it or this machine does not have it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(device)!r}; valid: cpu, cuda, cuda:N, mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r}: MPS is not available here (use --device cpu)")
    return dev


# ------------------------------------------------------------------------------------------------ model cards
def write_card(path: str | Path, card: dict[str, Any]) -> Path:
    """Write a model card (JSON) atomically; ``card['weights']`` is a path relative to the card's folder."""
    path = Path(path)
    card = {"format": CARD_FORMAT, **card}
    with atomic_write(path) as f:
        f.write(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"model card not found: {path}")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"model card {path} is not a JSON file: {e}") from e
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        card = card if isinstance(card, dict) else {}
        raise ValueError(f"{path} is not a segfromxai model card (format {card.get('format')!r}, "
                         f"expected {CARD_FORMAT!r})")
    for key in ("timm_name", "classes", "preprocess", "weights"):
        if key not in card:
            raise ValueError(f"model card {path} lacks the key {key!r}")
    return card


def _is_card(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".json"


def card_weights(card_path: str | Path, card: dict[str, Any]) -> Path:
    """The card's weights file: confined to the card's folder (no absolute path, no ``..``, no link out of it) and,
    when the card gives ``weights_sha256``, checked against it. Raises ValueError otherwise."""
    folder = Path(card_path).parent.resolve()
    weights = (folder / str(card["weights"])).resolve()
    if not weights.is_relative_to(folder):
        raise ValueError(f"model card {card_path}: weights {card['weights']!r} lie outside the card's folder {folder}")
    if not weights.is_file():
        raise FileNotFoundError(f"model card {card_path}: weights file not found: {weights}")
    expected = card.get("weights_sha256")
    if expected is not None and sha256(weights) != str(expected).lower():
        raise ValueError(f"model card {card_path}: {weights.name} does not match the card's weights_sha256 "
                         "(changed or corrupt weights)")
    return weights


def base_tensors(card_path: str | Path, base: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a card shares with a *base* card of ``data/`` (its ``"base"``: ``{"card": <folder name in
    data/>, "weights_sha256": ...}``): the base's weights, checked against that hash, less the tensors ``module``
    has no place for (e.g. the base's classifier head). The card's own weights then add or replace tensors, so a
    model that shares most of its weights with the embedded one ships only the rest (``data/dinov2``: the
    self-supervised ViT-S/14 that ``data/model`` was fine-tuned from, whose first 8 blocks stayed frozen)."""
    if not (isinstance(base, dict) and isinstance(base.get("card"), str) and base.get("weights_sha256")):
        raise ValueError(f"model card {card_path}: 'base' must be {{\"card\": <folder in data/>, "
                         f"\"weights_sha256\": ...}}, got {base!r}")
    name, root = base["card"], data_dir().resolve()
    folder = (root / name).resolve()
    if not name or "/" in name or "\\" in name or folder.parent != root:
        raise ValueError(f"model card {card_path}: base card {name!r} must be a folder name in {root}")
    base_path = folder / CARD_NAME
    base_card = read_card(base_path)
    if "base" in base_card:
        raise ValueError(f"model card {card_path}: its base {base_path} has a base of its own; a base must hold all "
                         "its weights")
    base_weights = card_weights(base_path, base_card)  # checked against the base card's own hash, if it has one
    recorded = base_card.get("weights_sha256")  # then that hash is the file's: the file is hashed once
    actual = str(recorded).lower() if recorded is not None else sha256(base_weights)
    if actual != str(base["weights_sha256"]).lower():
        raise ValueError(f"model card {card_path}: its base {base_weights} is not the weights it was built on "
                         "(weights_sha256 differs): rebuild it (README: data/)")
    sd, _ = read_state_dict(base_weights)
    own = module.state_dict()
    return {k: v for k, v in sd.items() if k in own}


def load_card_model(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    card_path = path / CARD_NAME if path.is_dir() else path
    card = read_card(card_path)
    weights = card_weights(card_path, card)
    kwargs = dict(card.get("timm_kwargs", {}))
    module, kwargs = create(card["timm_name"], **kwargs)
    sd, _ = read_state_dict(weights)
    if "base" in card:
        sd = {**base_tensors(card_path, card["base"], module), **sd}
    load_weights(module, sd, source=str(weights))
    return LoadedModel(module=module.to(device).eval(), classes=list(card["classes"]),
                       preprocess=Preprocess.from_dict(card["preprocess"]), timm_name=card["timm_name"],
                       timm_kwargs=kwargs, card=card, source=str(card_path))


def load_model(name: str | None = None, checkpoint: str | Path | None = None, pretrained: bool = False,
               device: str | torch.device = "cpu", *, classes: list[str] | None = None,
               **timm_kwargs: Any) -> LoadedModel:
    """Load a classifier to explain.

    Parameters
    ----------
    name : timm model name. With no ``name`` and no ``checkpoint``: the embedded default (``data/model``).
    checkpoint : a local file: a segfromxai model card (``card.json`` or its folder), a ``.safetensors`` file or a
        torch checkpoint (read with ``weights_only=True``). The number of classes follows the checkpoint's head. A
        safetensors file written by segfromxai names its timm model in its metadata, so ``name`` may be omitted.
    pretrained : download timm's pretrained weights (needs internet; never used by defaults or tests).
    device : torch device.
    classes : class names; default: the card's, else ``class_0 ... class_{C-1}``.
    **timm_kwargs : passed to ``timm.create_model`` (e.g. ``img_size``).

    Returns
    -------
    LoadedModel, in eval mode on ``device``.
    """
    device = check_device(device)
    if checkpoint is not None and _is_card(Path(checkpoint)):
        loaded = load_card_model(checkpoint, device=device)
        if classes is not None:
            return replace(loaded, classes=list(classes))
        return loaded
    if name is None and checkpoint is None:
        if pretrained:
            raise ValueError("pretrained=True needs a model name")
        return load_card_model(default_card_path(), device=device)

    sd, meta = (None, {})
    if checkpoint is not None:
        sd, meta = read_state_dict(checkpoint)
        if name is None and "timm_name" not in meta:
            raise ValueError(f"checkpoint {checkpoint} does not name its timm model: pass name=")
        if name is None or name == meta.get("timm_name"):  # the kwargs it was saved with, unless overridden
            name = meta["timm_name"]
            timm_kwargs = {**json.loads(meta.get("timm_kwargs", "{}")), **timm_kwargs}
    assert name is not None
    if pretrained and sd is not None:
        raise ValueError("give either pretrained=True or a checkpoint, not both")
    module, kwargs = create(name, pretrained=pretrained, **timm_kwargs)
    if sd is not None:
        n = checkpoint_num_classes(module, sd)
        if n is not None and n != getattr(module, "num_classes", n) and "num_classes" not in timm_kwargs:
            module, kwargs = create(name, num_classes=n, **timm_kwargs)
        load_weights(module, adapt_state_dict(sd, module), source=str(checkpoint))
    n_cls = int(getattr(module, "num_classes", 0))
    if classes is None:
        classes = [f"class_{i}" for i in range(n_cls)]
    elif len(classes) != n_cls:
        raise ValueError(f"{len(classes)} class names given for a model with {n_cls} classes")
    return LoadedModel(module=module.to(device).eval(), classes=list(classes),
                       preprocess=_preprocess_from_timm(module), timm_name=name, timm_kwargs=kwargs,
                       source=str(checkpoint) if checkpoint else ("timm-pretrained" if pretrained else "random-init"))


def default_layer(model: nn.Module) -> str:
    """The layer Grad-CAM reads by default.

    ViT: the last block's first LayerNorm (``blocks.{L-1}.norm1``), the token activations that feed the last
    attention. CNN: the last feature stage that timm's ``feature_info`` names (e.g. ``layer4`` of a ResNet).
    """
    if is_vit(model):
        return f"blocks.{len(model.blocks) - 1}.norm1"
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.info[-1]
        if last.get("module"):
            return last["module"]
    raise ValueError(f"cannot choose a Grad-CAM layer for {type(model).__name__}; pass layer='<module name>'")
