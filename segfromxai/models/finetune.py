"""Fine-tune a timm classifier on a ``synth`` folder or an ImageFolder layout, and write weights plus a model card.

Training choices: AdamW (weight decay 0.05) with one learning rate for the trunk and another for the new head,
linear warm-up over the first 5% of steps then cosine decay, cross-entropy, batches drawn in a seeded order.
With ``freeze_blocks=K`` on a ViT, the patch embedding and blocks ``0..K-1`` are frozen; since that trunk is then
deterministic, its tokens are computed once (stored in float16) and reused across epochs, so an epoch costs only
the trainable blocks. Without a cache (``K=0`` or a CNN) images are flipped left-right at random (every synth
class is mirror-symmetric as a class). The reported validation accuracy is measured at the end with the weights
exactly as stored (after the cast to the storage dtype), on the full model.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write
from ..io.images import find_images, load_image
from .model import (
    CARD_NAME,
    Preprocess,
    adapt_state_dict,
    create,
    head_keys,
    is_vit,
    load_weights,
    read_card,
    read_state_dict,
    sha256,
    write_card,
)


@dataclass(frozen=True)
class LabelledSet:
    """Image paths with class indices into ``classes``."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]

    def subset(self, idx: np.ndarray) -> LabelledSet:
        return LabelledSet([self.paths[i] for i in idx], self.labels[idx], self.classes)


def read_labelled_folder(root: str | Path, classes: list[str] | None = None) -> LabelledSet:
    """Read a ``synth`` folder (``labels.csv`` + ``images/``) or an ImageFolder layout (one sub-folder per class).

    Class order: ``classes`` when given; else the synth ``annotations.json`` categories, or the sorted sub-folder
    names of an ImageFolder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder not found: {root}")
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        with open(labels_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        names = [r["file_name"] for r in rows]
        if len(set(names)) != len(names):
            raise ValueError(f"{labels_csv} lists some images more than once (a multi-object set): "
                             "classification fine-tuning needs one label per image")
        if classes is None:
            ann = root / "annotations.json"
            if ann.is_file():
                cats = sorted(json.loads(ann.read_text())["categories"], key=lambda c: c["id"])
                classes = [c["name"] for c in cats]
            else:
                classes = sorted({r["label"] for r in rows})
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({r["label"] for r in rows} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} in {labels_csv} are not among the classes {classes}")
        img_dir = root / "images" if (root / "images").is_dir() else root
        return LabelledSet([img_dir / n for n in names], np.array([index[r["label"]] for r in rows]), list(classes))
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise ValueError(f"{root} has neither labels.csv nor class sub-folders (ImageFolder layout)")
    classes = list(classes) if classes is not None else subdirs
    paths, labels = [], []
    for c in subdirs:
        if c not in classes:
            raise ValueError(f"folder {root / c} is not among the classes {classes}")
        for p in find_images(root / c):
            paths.append(p)
            labels.append(classes.index(c))
    return LabelledSet(paths, np.array(labels, dtype=np.int64), classes)


def _batches(n: int, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for s in range(0, n, batch_size):
        yield order[s:s + batch_size]


def _load_batch(ds: LabelledSet, idx: np.ndarray, pre: Preprocess) -> torch.Tensor:
    return pre.batch([load_image(ds.paths[i]) for i in idx])


def _trunk(module: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """timm ViT ``forward_features`` up to (not including) block ``k``."""
    x = module.patch_embed(x)
    x = module._pos_embed(x)
    x = module.patch_drop(x)
    x = module.norm_pre(x)
    for blk in module.blocks[:k]:
        x = blk(x)
    return x


def _cache_trunk(module: nn.Module, ds: LabelledSet, pre: Preprocess, k: int, *, batch_size: int,
                 device: torch.device | str, progress: bool) -> torch.Tensor:
    """Tokens after the frozen blocks ``0..k-1`` for every image of ``ds``, stored as float16 on the CPU."""
    module.eval()
    chunks = []
    with torch.no_grad():
        for idx in _progress(_batches(len(ds.paths), batch_size), math.ceil(len(ds.paths) / batch_size),
                             f"caching blocks 0..{k - 1}", progress):
            chunks.append(_trunk(module, _load_batch(ds, idx, pre).to(device), k).half().cpu())
    return torch.cat(chunks)


def _top(module: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    for blk in module.blocks[k:]:
        x = blk(x)
    return module.forward_head(module.norm(x))


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False, disable=None)


def accuracy(module: nn.Module, ds: LabelledSet, pre: Preprocess, *, batch_size: int = 32,
             device: torch.device | str = "cpu", progress: bool = False) -> float:
    """Top-1 accuracy of ``module`` on ``ds`` (full forward passes)."""
    module.eval()
    correct = 0
    with torch.no_grad():
        for idx in _progress(_batches(len(ds.paths), batch_size), math.ceil(len(ds.paths) / batch_size),
                             "eval", progress):
            pred = module(_load_batch(ds, idx, pre).to(device)).argmax(1).cpu().numpy()
            correct += int((pred == ds.labels[idx]).sum())
    return correct / max(len(ds.paths), 1)


def _init_state_dict(init: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if init.is_dir() or init.suffix == ".json":
        card_path = init / CARD_NAME if init.is_dir() else init
        card = read_card(card_path)
        w = card_path.parent / card["weights"]
        sd, _ = read_state_dict(w)
        return sd, {"checkpoint": str(init), "sha256": sha256(w), "source": f"segfromxai card {card['timm_name']}"}
    sd, meta = read_state_dict(init)
    return sd, {"checkpoint": str(init), "sha256": sha256(init), **meta}


def _split_data(data: str | Path, val: str | Path | None, val_fraction: float, limit: int | None,
                rng: np.random.Generator) -> tuple[LabelledSet, LabelledSet]:
    """Training and validation sets: ``val``, else a seeded ``val_fraction`` of ``data``; at most ``limit`` to train."""
    train_set = read_labelled_folder(data)
    if val is not None:
        val_set = read_labelled_folder(val, classes=train_set.classes)
    else:
        perm = rng.permutation(len(train_set.paths))
        n_val = max(1, int(round(val_fraction * len(perm))))
        val_set, train_set = train_set.subset(np.sort(perm[:n_val])), train_set.subset(np.sort(perm[n_val:]))
    if limit is not None:
        train_set = train_set.subset(np.arange(min(limit, len(train_set.paths))))
    return train_set, val_set


def _build_model(model_name: str, n_classes: int, img_size: int | None, init: str | Path | None,
                 device: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any] | None, Preprocess]:
    """The timm model on ``device`` (from ``init`` without its head, if given), its kwargs, init info, preprocessing."""
    module, kwargs = create(model_name, num_classes=n_classes, img_size=img_size)
    init_info = None
    if init is not None:
        sd, init_info = _init_state_dict(Path(init))
        sd = adapt_state_dict(sd, module, drop_head=True)
        missing = [k for k in module.state_dict() if k not in sd]
        if set(missing) - set(head_keys(module)):
            load_weights(module, sd, source=str(init))  # raises, naming what does not fit
        load_weights(module, sd, source=str(init), strict=False)
    module.to(device)

    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=module)
    size = (img_size, img_size) if img_size else tuple(cfg["input_size"][-2:])
    pre = Preprocess(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                     interpolation=cfg.get("interpolation", "bicubic"))
    return module, kwargs, init_info, pre


def _freeze_trunk(module: nn.Module, k: int) -> None:
    """Train only the ViT blocks from ``k`` on, the final norm and the head (``k`` in 1 .. blocks - 1)."""
    if not is_vit(module):
        raise ValueError("--freeze-blocks needs a ViT with `blocks` (timm VisionTransformer family)")
    if not 0 < k < len(module.blocks):
        raise ValueError(f"--freeze-blocks must be in 1..{len(module.blocks) - 1}, got {k}")
    for name, p in module.named_parameters():
        trainable = name.startswith(("norm.", "head", "fc_norm")) or any(
            name.startswith(f"blocks.{i}.") for i in range(k, len(module.blocks)))
        p.requires_grad_(trainable)


def _optimizer(module: nn.Module, lr: float, head_lr: float, weight_decay: float,
               steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (``head_lr`` for the head) with 5 % linear warm-up, then cosine decay."""
    head = set(head_keys(module))
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for n, p in params if n not in head], "lr": lr},
        {"params": [p for n, p in params if n in head], "lr": head_lr},
    ], weight_decay=weight_decay)
    warm = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    return opt, sched


def _train_epoch(module: nn.Module, train_set: LabelledSet, pre: Preprocess, cache: torch.Tensor | None, k: int,
                 opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, rng: np.random.Generator, *,
                 batch_size: int, device: str, desc: str, progress: bool) -> tuple[float, int, int]:
    """One pass over shuffled ``train_set`` (cached trunk tokens, else flipped images): loss sum, images, correct."""
    module.train()
    if k:  # frozen blocks stay in eval mode (no dropout / drop-path there)
        for blk in module.blocks[:k]:
            blk.eval()
    labels_t = torch.from_numpy(train_set.labels)
    total, n_seen, correct = 0.0, 0, 0
    for idx in _progress(_batches(len(train_set.paths), batch_size, rng),
                         math.ceil(len(train_set.paths) / batch_size), desc, progress):
        y = labels_t[idx].to(device)
        if cache is not None:
            logits = _top(module, cache[idx].float().to(device), k)
        else:
            x = _load_batch(train_set, idx, pre).to(device)
            flip = torch.from_numpy(rng.uniform(size=len(idx)) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = module(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
        n_seen += len(idx)
        correct += int((logits.argmax(1) == y).sum())
    return total, n_seen, correct


def _cached_accuracy(module: nn.Module, val_set: LabelledSet, val_cache: torch.Tensor, k: int, *, batch_size: int,
                     device: str) -> float:
    """Top-1 accuracy of ``module`` on ``val_set`` from its cached frozen-trunk tokens."""
    module.eval()
    with torch.no_grad():
        pred = torch.cat([_top(module, val_cache[i].float().to(device), k).argmax(1).cpu()
                          for i in _batches(len(val_set.paths), batch_size)]).numpy()
    return float((pred == val_set.labels).mean())


def _fit(module: nn.Module, train_set: LabelledSet, val_set: LabelledSet, pre: Preprocess, k: int,
         cache: torch.Tensor | None, val_cache: torch.Tensor | None, opt: torch.optim.Optimizer,
         sched: torch.optim.lr_scheduler.LambdaLR, rng: np.random.Generator, *, epochs: int, batch_size: int,
         device: str, progress: bool, t0: float, log) -> list[dict[str, Any]]:
    """The epoch loop: train, validate and log each epoch; returns the per-epoch history."""
    history = []
    for epoch in range(epochs):
        total, n_seen, correct = _train_epoch(module, train_set, pre, cache, k, opt, sched, rng,
                                              batch_size=batch_size, device=device,
                                              desc=f"epoch {epoch + 1}/{epochs}", progress=progress)
        if val_cache is not None:
            va = _cached_accuracy(module, val_set, val_cache, k, batch_size=batch_size, device=device)
        else:
            va = accuracy(module, val_set, pre, batch_size=batch_size, device=device, progress=progress)
        history.append({"epoch": epoch + 1, "train_loss": total / n_seen, "train_accuracy": correct / n_seen,
                        "val_accuracy": va, "elapsed_s": round(time.time() - t0, 1)})
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / n_seen:.4f}, train acc {correct / n_seen:.4f}, "
            f"val acc {va:.4f} ({time.time() - t0:.0f} s)")
    return history


def _save_weights(module: nn.Module, out: Path, model_name: str, kwargs: dict[str, Any],
                  storage_dtype: str) -> Path:
    """Write ``out/model.safetensors`` in ``storage_dtype`` and load the cast weights back into ``module``."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, storage_dtype)
    sd = {name: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
          for name, v in module.state_dict().items()}
    weights = out / "model.safetensors"
    with atomic_write(weights, "wb") as f:
        f.write(save(sd, metadata={"timm_name": model_name, "timm_kwargs": json.dumps(kwargs)}))
    load_weights(module, sd, source=str(weights))
    return weights


def finetune(data: str | Path, model_name: str, out: str | Path, *, init: str | Path | None = None,
             freeze_blocks: int = 0, epochs: int = 2, img_size: int | None = None, batch_size: int = 32,
             lr: float = 5e-5, head_lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
             val: str | Path | None = None, val_fraction: float = 0.1, limit: int | None = None,
             storage_dtype: str = "float16", device: str = "cpu", progress: bool = True,
             command: str | None = None, log=print) -> dict[str, Any]:
    """Fine-tune ``model_name`` on ``data`` and write ``out/model.safetensors`` and ``out/card.json``.

    Parameters
    ----------
    data : a ``synth`` folder or an ImageFolder layout.
    init : a local checkpoint (safetensors, torch file or model card) to start from; its head is dropped (a new
        head is made for the new classes) and a ViT position embedding is resampled to the new grid.
    freeze_blocks : train only the blocks from this index on (plus final norm and head); ViTs cache the frozen
        trunk's tokens once. 0 trains everything.
    val : a separate labelled folder for validation; else ``val_fraction`` of ``data`` is held out (seeded).
    limit : use at most this many training images (for quick runs).
    storage_dtype : dtype of the stored weights (``float16`` halves the file; accuracy is measured after the cast).

    Returns
    -------
    The model card (dict), also written to ``out/card.json``.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = Path(out)
    train_set, val_set = _split_data(data, val, val_fraction, limit, rng)
    classes = train_set.classes
    module, kwargs, init_info, pre = _build_model(model_name, len(classes), img_size, init, device)
    k = int(freeze_blocks)
    if k:
        _freeze_trunk(module, k)
    opt, sched = _optimizer(module, lr, head_lr, weight_decay, epochs * math.ceil(len(train_set.paths) / batch_size))

    cache = val_cache = None
    if k:
        cache = _cache_trunk(module, train_set, pre, k, batch_size=batch_size, device=device, progress=progress)
        val_cache = _cache_trunk(module, val_set, pre, k, batch_size=batch_size, device=device, progress=progress)
        log(f"cached frozen-trunk tokens of {len(train_set.paths)} + {len(val_set.paths)} images "
            f"in {time.time() - t0:.0f} s")

    history = _fit(module, train_set, val_set, pre, k, cache, val_cache, opt, sched, rng, epochs=epochs,
                   batch_size=batch_size, device=device, progress=progress, t0=t0, log=log)

    weights = _save_weights(module, out, model_name, kwargs, storage_dtype)
    final_acc = accuracy(module, val_set, pre, batch_size=batch_size, device=device, progress=progress)
    log(f"validation accuracy with the stored {storage_dtype} weights: {final_acc:.4f}")
    card = {
        "timm_name": model_name,
        "timm_kwargs": kwargs,
        "classes": classes,
        "preprocess": pre.to_dict(),
        "weights": weights.name,
        "weights_sha256": sha256(weights),
        "storage_dtype": storage_dtype,
        "init": init_info,
        "val_accuracy": final_acc,
        "n_train": len(train_set.paths),
        "n_val": len(val_set.paths),
        "val_source": str(val) if val is not None else f"{val_fraction:.0%} of {data} held out",
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "head_lr": head_lr,
                     "weight_decay": weight_decay, "freeze_blocks": k, "cached_trunk": cache is not None,
                     "history": history, "time_s": round(time.time() - t0, 1),
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seed": seed,
        "command": command or " ".join(shlex.quote(a) for a in ["segfromxai", *sys.argv[1:]]),
    }
    write_card(out / CARD_NAME, card)
    return card
