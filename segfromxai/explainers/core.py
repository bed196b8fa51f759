"""One call for every explainer: a shared forward pass, one shared backward pass, then each method's read-out.

``explain(model, x, methods)`` gathers what the requested methods need (the input gradient, a layer's
activations and gradients, attention maps and their gradients, block inputs for the LRP pass), runs the model
once with hooks inside a context manager, backpropagates the target logits once for every gradient that is
needed, and hands the results to each method. LRP passes of identical settings are shared as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from ..models.model import is_vit, token_grid
from ..registry import Entry
from ..params import Param, check, declared
from ..models.hooks import Captured, capture, grad_from


@dataclass(frozen=True)
class Needs:
    """What a method needs from the shared passes."""

    input_grad: bool = False
    layers: tuple[str, ...] = ()
    attention: bool = False
    attention_grad: bool = False
    blocks: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.input_grad or other.input_grad,
                     tuple(dict.fromkeys(self.layers + other.layers)),
                     self.attention or other.attention,
                     self.attention_grad or other.attention_grad,
                     self.blocks or other.blocks)

    @property
    def backward(self) -> bool:
        return self.input_grad or bool(self.layers) or self.attention_grad


@dataclass(frozen=True, kw_only=True)
class Explainer(Entry):
    """A registered method (the registry's :class:`~segfromxai.registry.Entry` shape): its read-out
    ``fn(pass, params)``, its summary and what it requires (``"vit"``: a Vision Transformer; ``"class"``: a class to
    explain, so not a headless model), plus what it needs from the shared pass (``needs(module, params)``) and its
    parameters' declaration.

    ``params`` is a callable whose typed keyword-only signature declares the method's parameters (defaults,
    ``Literal`` choices, ``Annotated`` ranges; see :mod:`segfromxai.params`): the single source that recipe
    validation, ``segfromxai list`` and the tests read. Build one with :func:`explainer`.
    """

    needs: Callable[[nn.Module, dict[str, Any]], Needs]
    params: Callable[..., Any]

    @property
    def vit_only(self) -> bool:
        """True for methods that read a Vision Transformer's attention or blocks."""
        return "vit" in self.requires

    @property
    def needs_class(self) -> bool:
        """False for class-agnostic methods (they never read the target class, so they run on a headless model)."""
        return "class" in self.requires

    @property
    def declared(self) -> dict[str, Param]:
        return declared(self.params)

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.declared.items()}

    @property
    def choices(self) -> dict[str, tuple]:
        return {k: p.choices for k, p in self.declared.items() if p.choices is not None}

    def resolve(self, name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overridden by ``params``, each value checked; ValueError names the method and the valid ones."""
        try:
            return check(dict(params or {}), self.declared)
        except ValueError as e:
            raise ValueError(f"explainer {name!r}: {e}") from None



def explainer(fn: Callable[[Pass, dict[str, Any]], torch.Tensor], needs: Callable[[nn.Module, dict[str, Any]], Needs],
              params: Callable[..., Any], *, vit_only: bool, summary: str, needs_class: bool = True) -> Explainer:
    """An :class:`Explainer` whose ``requires`` says ``vit`` when ``vit_only`` and ``class`` when ``needs_class``."""
    requires = frozenset(k for k, on in (("vit", vit_only), ("class", needs_class)) if on)
    return Explainer(fn=fn, summary=summary, requires=requires, needs=needs, params=params)

@dataclass
class Pass:
    """The shared results of one forward (and backward) pass over a batch."""

    model: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor
    captured: Captured
    input_grad: torch.Tensor | None = None
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_grads: list[torch.Tensor] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def grid(self) -> tuple[int, int]:
        return token_grid(self.model, tuple(self.x.shape[-2:]))

    def to_grid(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(B, patches) -> (B, gh, gw) in row-major patch order."""
        return per_patch.reshape(per_patch.shape[0], *self.grid)

    def readout(self, rel: torch.Tensor) -> torch.Tensor:
        """The class-token row of a (B, N, N) token relation restricted to patch columns, as a (B, gh, gw) map.

        Models that pool by the class token (``global_pool == "token"``) read its row; the others (average
        pooling, no class token) read the mean over the patch-token rows.
        """
        p = self.num_prefix_tokens
        if getattr(self.model, "global_pool", None) == "token":
            row = rel[:, 0, p:]
        else:
            row = rel[:, p:, p:].mean(1)
        return self.to_grid(row)


SIGNS = ("positive", "absolute")
Sign = Literal["positive", "absolute"]


def signed(s: torch.Tensor, sign: str) -> torch.Tensor:
    """The positive part of a signed map (evidence for the class) or its absolute value."""
    return torch.relu(s) if sign == "positive" else s.abs()


def _unwrap(model: Any) -> nn.Module:
    return getattr(model, "module", model) if not isinstance(model, nn.Module) else model


def resolve_methods(methods: str | Sequence[str] | Mapping[str, Mapping[str, Any] | None],
                    registry: Mapping[str, Explainer]) -> dict[str, dict[str, Any]]:
    """Normalise ``methods`` to ``{name: resolved params}``; unknown names raise ValueError naming the valid ones."""
    if isinstance(methods, str):
        methods = [methods]
    items = methods.items() if isinstance(methods, Mapping) else [(m, None) for m in methods]
    out: dict[str, dict[str, Any]] = {}
    for name, params in items:
        if name not in registry:
            raise ValueError(f"unknown explainer {name!r}; valid: {', '.join(sorted(registry))}")
        out[name] = registry[name].resolve(name, params)
    if not out:
        raise ValueError(f"no explainer requested; valid: {', '.join(sorted(registry))}")
    return out


def _targets(target: Any, logits: torch.Tensor) -> torch.Tensor:
    b, k = logits.shape
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1 and b > 1:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"target must be one class or one per image ({b}), got shape {tuple(t.shape)}")
    if ((t < 0) | (t >= k)).any():
        raise ValueError(f"target classes must lie in [0, {k}); got {t.tolist()}")
    return t


@dataclass
class Explained:
    """What one shared pass gives: the maps, the logits, the class explained per image and the recorded outputs.

    ``maps``: ``{name: float32 (B, h, w)}``; ``logits``: (B, C) detached; ``target``: (B,) long, the class each map
    explains (given, or the top-1); ``outputs``: ``{layer: detached output}`` of the ``record`` layers, from the
    shared forward pass only.
    """

    maps: dict[str, torch.Tensor]
    logits: torch.Tensor
    target: torch.Tensor
    outputs: dict[str, torch.Tensor]


def _needs(model: nn.Module, resolved: dict[str, dict[str, Any]], registry: Mapping[str, Explainer]) -> Needs:
    vit_only = [n for n in resolved if registry[n].vit_only]
    if vit_only and not is_vit(model):
        raise TypeError(f"{', '.join(vit_only)} need a Vision Transformer (timm blocks with token attention); "
                        f"{type(model).__name__} is not one")
    needs = Needs()
    for name, params in resolved.items():
        needs = needs | registry[name].needs(model, params)
    return needs


def _first_graph_block(model: nn.Module, needs: Needs) -> nn.Module | None:
    """The first ViT block a backward must reach (the input gradient, or a layer outside the blocks: None, all)."""
    blocks = getattr(model, "blocks", None)
    if needs.input_grad or not isinstance(blocks, nn.Sequential):
        return None
    first = [0] if needs.attention_grad else []
    for name in needs.layers:
        parts = name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit() or int(parts[1]) >= len(blocks):
            return None  # (a block the model lacks: the capture names the layer)
        first.append(int(parts[1]))
    return blocks[min(first)] if first else None


def _shared_pass(model: nn.Module, x: torch.Tensor, target: Any, needs: Needs, record: tuple[str, ...]) -> Pass:
    """The one forward (and, if needed, backward) pass with hooks; the hooks are gone when it returns. Autograd
    records only from the first block the backward reaches (:func:`_first_graph_block`)."""
    layers = tuple(dict.fromkeys(needs.layers + tuple(record)))
    with grad_from(_first_graph_block(model, needs)) if needs.backward else torch.no_grad():
        with capture(model, layers=layers, attention=needs.attention, blocks=needs.blocks,
                     internals=needs.blocks) as got:
            x_in = x.requires_grad_(True) if needs.input_grad else x
            logits = model(x_in)
            t = _targets(target, logits)
            ps = Pass(model=model, x=x, target=t, logits=logits.detach(), captured=got)
            if needs.backward:
                wrt = ([x_in] if needs.input_grad else []) + [got.outputs[n] for n in needs.layers]
                wrt += got.attention if needs.attention_grad else []
                score = logits.gather(1, t[:, None]).sum()
                grads = list(torch.autograd.grad(score, wrt))
                if needs.input_grad:
                    ps.input_grad = grads.pop(0)
                ps.output_grads = {n: grads.pop(0) for n in needs.layers}
                ps.attention_grads = grads
        got.outputs = {k: v.detach() for k, v in got.outputs.items()}
        got.attention = [a.detach() for a in got.attention]
        got.block_io = [(i.detach(), o.detach()) for i, o in got.block_io]
        got.internals = [{k: v.detach() for k, v in rec.items()} for rec in got.internals]
    return ps


def explain_pass(model: Any, x: torch.Tensor, methods: str | Sequence[str] | Mapping[str, Mapping[str, Any] | None],
                 target: Any = None, *, registry: Mapping[str, Explainer], record: Sequence[str] = ()) -> Explained:
    """Explanation maps of a batch for each requested method from one shared forward and backward pass.

    Parameters
    ----------
    model : a timm classifier (``nn.Module``) or a ``LoadedModel``; used in eval mode, left as it was found.
    x : (B, 3, H, W) preprocessed batch.
    methods : a name, a list of names, or ``{name: {param: value}}`` (see ``segfromxai list`` / the README).
    target : class per image (int, sequence or tensor of B); default: the model's top-1 class.
    record : further module names whose outputs of the shared forward are returned (e.g. a refiner's tokens).

    Returns
    -------
    :class:`Explained`; each map float32 (B, gh, gw) on the token grid or (B, H, W) for pixel-level methods,
    finite and non-negative (not normalised).
    """
    model = _unwrap(model)
    resolved = resolve_methods(methods, registry)
    ps = _shared_pass(model, x.detach(), target, _needs(model, resolved, registry), tuple(record))
    maps = {}
    with torch.no_grad():
        for name, params in resolved.items():
            m = registry[name].fn(ps, params).float().contiguous()
            if not torch.isfinite(m).all():
                raise FloatingPointError(f"explainer {name!r} produced non-finite values")
            maps[name] = m
    return Explained(maps, ps.logits, ps.target, {n: ps.captured.outputs[n] for n in record})
