"""Hooks that live only inside a context manager: captured activations, attention maps and block inputs.

Everything a hook registers or a flag it changes (timm's ``fused_attn``, the module's training mode) is undone in
``__exit__`` even when the body raised; ``__exit__`` never swallows the exception.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


@dataclass
class Captured:
    """What one forward pass left behind, in forward order."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: list[torch.Tensor] = field(default_factory=list)
    block_io: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name`` (dotted, as in ``model.named_modules()``), with the close names on a miss."""
    modules = dict(model.named_modules())
    if name not in modules:
        import difflib

        close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise ValueError(f"the model has no module named {name!r}{hint}")
    return modules[name]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The timm ``Attention`` module of every block, checked to expose the softmax map (``attn_drop``)."""
    mods = []
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn"):
            raise NotImplementedError(
                f"block {i} ({type(blk).__name__}) has no timm Attention with an explicit softmax "
                "(attn.attn_drop and attn.fused_attn); attention-based explainers cannot read its maps")
        mods.append(attn)
    return mods


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the duration; its training flag restored on exit (also on error)."""
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(was_training)


@contextmanager
def capture(model: nn.Module, *, layers: tuple[str, ...] = (), attention: bool = False,
            blocks: bool = False) -> Iterator[Captured]:
    """Record module outputs, softmax attention maps and block (input, output) pairs during forward passes.

    Parameters
    ----------
    model : the classifier; put in eval mode for the duration and restored afterwards.
    layers : dotted module names whose outputs are recorded in ``Captured.outputs``; the first forward inside the
        context only (perturbation explainers run more forwards, on altered inputs, after the shared one).
    attention : record each block's attention probabilities (B, heads, N, N); the fused kernel is switched off
        per attention module inside the context (it hides the probabilities) and restored on exit.
    blocks : record each transformer block's (input tokens, output tokens).
    """
    got = Captured()
    handles = []
    fused: list[tuple[nn.Module, bool]] = []
    with eval_mode(model):
        try:
            for name in layers:
                handles.append(resolve_module(model, name).register_forward_hook(
                    lambda m, i, o, name=name: None if name in got.outputs else got.outputs.__setitem__(name, o)))
            if attention:
                for attn in attention_modules(model):
                    fused.append((attn, attn.fused_attn))
                    attn.fused_attn = False
                    handles.append(attn.attn_drop.register_forward_hook(lambda m, i, o: got.attention.append(o)))
            if blocks:
                for blk in model.blocks:
                    handles.append(blk.register_forward_hook(lambda m, i, o: got.block_io.append((i[0], o))))
            yield got
        finally:
            for h in handles:
                h.remove()
            for attn, flag in fused:
                attn.fused_attn = flag


@dataclass
class ForwardCount:
    """Images pushed through a model's forward, counted by :func:`count_forwards`."""

    images: int = 0
    calls: int = 0


@contextmanager
def count_forwards(model: nn.Module) -> Iterator[ForwardCount]:
    """Count the forward passes of ``model`` and the images they carry (the first input's batch size) while the
    context is open; the hook is always removed.

    On a ViT the count is taken at its first block, so passes that enter after the embedding (token dropping)
    count too; on other models at the model itself.
    """
    n = ForwardCount()

    def hook(module: nn.Module, args: tuple) -> None:
        n.calls += 1
        n.images += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 1

    blocks = getattr(model, "blocks", None)
    where = blocks[0] if isinstance(blocks, nn.Sequential) and len(blocks) else model
    handle = where.register_forward_pre_hook(hook)
    try:
        yield n
    finally:
        handle.remove()
