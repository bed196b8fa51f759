"""Training a head on cached tokens, its checkpoints, and its finished rounds.

The loss is cross-entropy on the logits upsampled bilinearly to the input size, pixels marked 255 ignored.
Everything is seeded (head initialisation, batch order per epoch from ``(seed, round, epoch)``), so the same inputs
give the same masks. Each epoch ends with a checkpoint (safetensors: head, optimiser state, epoch) written
atomically; an interrupted run started again with the same settings continues from it and ends with the same
masks. Each finished round keeps its head (``round_<r>/head.safetensors``) and a model card (``card.json``), from
which :func:`load_student` reloads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..fileio import atomic_write
from ..io.progress import progress_bar
from ..models.model import LoadedModel, write_card
from .config import StudentConfig
from .heads import HEADS, SEGMENTERS, Standardize, head_logits, load_head_weights
from .targets import IGNORE
from .tokens import Pixels, Tokens, used_blocks


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
        load_head_weights(head, config.head_weights)
    return head


def train_head(tokens: Tokens, targets: np.ndarray, keep: np.ndarray, k: int, config: StudentConfig, *,
               round_: int = 1, checkpoint: Path | None = None, key: str = "", progress: bool = False,
               on_epoch: Callable[[int, int], None] | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Train a head on cached tokens: targets uint8 (N, h, w) (255 ignored) for the images where ``keep``, every
    view (view 1's target mirrored). Resumes from ``checkpoint`` when it holds this ``key``; writes it after each
    epoch, then calls ``on_epoch(round, epoch)``. Trains on ``device`` (the tokens stay on the CPU, each batch is
    moved) and returns the head on the CPU. With ``progress``, a bar on a terminal and ``progress: round r: e/E
    epochs`` lines elsewhere (:func:`segfromxai.io.progress.progress_bar`)."""
    head = new_head(config, tokens.grid.shape[-1], k, round_).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = load_checkpoint(checkpoint, head, opt, key) if checkpoint is not None else 0
    idx = np.flatnonzero(keep)
    for m in head.modules():  # a Standardize layer takes the training tokens' statistics (view 0) before any step
        if isinstance(m, Standardize):
            m.fit(tokens.grid[idx[s:s + 16], 0] for s in range(0, len(idx), 16))
    pairs = np.array([(i, v) for i in idx for v in range(tokens.grid.shape[1])], dtype=np.int64).reshape(-1, 2)
    size = targets.shape[-2:]
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    bar = progress_bar(config.epochs, start, desc=f"round {round_}", unit="epochs",
                       every=max(1, config.epochs // 10)) if progress else None
    for epoch in range(start + 1, config.epochs + 1):
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
        if bar is not None:
            bar.update(1)
        if on_epoch is not None:
            on_epoch(round_, epoch)
    if bar is not None:
        bar.close()
    return head.cpu().eval()


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
    a segmenter of :data:`SEGMENTERS`, and the card's ``blocks``: its last blocks' tokens concatenated)
    (:func:`segfromxai.student.tokens.student_trunk`, :func:`segfromxai.student.tokens.cache_tokens`)."""
    from safetensors.torch import load_file

    from ..models.model import load_model, read_card

    path = Path(card)
    path = path / "card.json" if path.is_dir() else path
    c = read_card(path)
    trunk = c["trunk"] if Path(c["trunk"]).exists() else None
    model = load_model(checkpoint=trunk, device=device)
    name = c["config"]["head"]
    dim = int(model.module.num_features) * used_blocks(model.module, int(c["config"].get("blocks", 1)))
    head = HEADS[name](Pixels.num_features if name in SEGMENTERS else dim, len(c["classes"]))
    head.load_state_dict(load_file(str(path.parent / c["weights"])))
    return model, head.eval(), c
