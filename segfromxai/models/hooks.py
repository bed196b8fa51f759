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
    internals: list[dict[str, torch.Tensor]] = field(default_factory=list)


# Where each of a timm pre-norm Block's internals is read (``Captured.internals``): (sub-module, "in" or "out").
INTERNALS = {"x": ("", "in"), "out": ("", "out"), "n1": ("norm1", "out"), "qkv": ("attn.qkv", "out"),
             "a": ("attn.attn_drop", "out"), "o": ("attn.proj", "in"), "p": ("attn.proj", "out"),
             "x1": ("norm2", "in"), "n2": ("norm2", "out"), "h": ("mlp.fc1", "out"), "m": ("mlp.fc2", "out")}


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


def _internal_hooks(model: nn.Module, got: Captured) -> list:
    """Forward hooks that fill ``got.internals[i]`` with block i's tensors of :data:`INTERNALS` (first forward only);
    a sub-module a block lacks is skipped (the LRP engine then finds the record incomplete and says why)."""
    handles = []
    got.internals = [{} for _ in model.blocks]
    for blk, rec in zip(model.blocks, got.internals):
        for key, (path, side) in INTERNALS.items():
            mod = blk
            for part in filter(None, path.split(".")):
                mod = getattr(mod, part, None)
            if isinstance(mod, nn.Module):
                handles.append(mod.register_forward_hook(_recorder(rec, key, side)))
    return handles


def _recorder(rec: dict[str, torch.Tensor], key: str, side: str):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if key not in rec:
            rec[key] = args[0] if side == "in" else out

    return hook


@contextmanager
def capture(model: nn.Module, *, layers: tuple[str, ...] = (), attention: bool = False,
            blocks: bool = False, internals: bool = False) -> Iterator[Captured]:
    """Record module outputs, softmax attention maps and block (input, output) pairs during forward passes.

    Parameters
    ----------
    model : the classifier; put in eval mode for the duration and restored afterwards.
    layers : dotted module names whose outputs are recorded in ``Captured.outputs``; the first forward inside the
        context only (perturbation explainers run more forwards, on altered inputs, after the shared one).
    attention : record each block's attention probabilities (B, heads, N, N); the fused kernel is switched off
        per attention module inside the context (it hides the probabilities) and restored on exit.
    blocks : record each transformer block's (input tokens, output tokens).
    internals : record each block's internals (:data:`INTERNALS`: input, norms, qkv, attention probabilities,
        projection input and output, MLP pre-activation and output, block output) of the first forward, for the LRP
        engine to reuse instead of recomputing them; switches the fused attention off like ``attention``.
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
                    handles.append(attn.attn_drop.register_forward_hook(lambda m, i, o: got.attention.append(o)))
            if attention or internals:  # (a block without a timm Attention fails in the LRP engine, which names it)
                for attn in (getattr(blk, "attn", None) for blk in getattr(model, "blocks", ())):
                    if hasattr(attn, "fused_attn"):
                        fused.append((attn, attn.fused_attn))
                        attn.fused_attn = False
            if internals:
                handles.extend(_internal_hooks(model, got))
            if blocks:
                for blk in model.blocks:
                    handles.append(blk.register_forward_hook(lambda m, i, o: got.block_io.append((i[0], o))))
            yield got
        finally:
            for h in handles:
                h.remove()
            for attn, flag in fused:
                attn.fused_attn = flag


@contextmanager
def grad_from(module: nn.Module | None) -> Iterator[None]:
    """Autograd records the forward only from ``module`` on (``None``: from the start), so that a backward to a late
    layer does not keep the whole network's activations alive.

    The forward runs under ``torch.no_grad`` and a pre-hook on ``module`` switches gradient recording on when the
    forward reaches it; the grad mode in force before the context and the hook are restored on exit (also on error).
    """
    if module is None:
        with torch.enable_grad():
            yield
        return

    def hook(m: nn.Module, args: tuple) -> None:
        torch.set_grad_enabled(True)

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            yield
    finally:
        handle.remove()


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
