"""Does a recipe fit the model it will run on? Checked as soon as the model is known, before any image is read or
the output folder is touched, with a message that names the recipe, its section and the key.

:mod:`segfromxai.recipe.recipe` validates what a recipe says on its own (names, keys, value ranges); what depends
on the model is checked here. Three kinds of model run recipes: a ViT with a classifier head, a CNN with a head,
and a *headless* backbone (``num_classes=0``, e.g. a self-supervised ViT-S/14). A headless model has no class to
explain: it runs the class-agnostic recipes (explainers that do not require ``"class"``: ``rollout``, ``uniform``;
TokenCut, MaskCut). ViT-only explainers (attention maps, LRP) refuse a CNN. A ``layer`` the model does not have, a
``start_layer`` or a ``[features] block`` outside the model's blocks are refused too. ``run``
(:func:`segfromxai.run.local.plan_run`) and ``compare`` call :func:`check_recipes_for_model`.
"""

from __future__ import annotations

import difflib
from typing import Sequence

from torch import nn

from ..explainers import EXPLAINERS
from ..models.features import backbone_for, feature_layer, uses_classifier
from ..models.model import LoadedModel, is_vit
from ..stages.refine import REFINERS
from .recipe import Recipe


def is_headless(module: nn.Module) -> bool:
    """True for a model with no classifier head (timm ``num_classes == 0``: the forward returns pooled features)."""
    return getattr(module, "num_classes", None) == 0


def model_kind(module: nn.Module) -> str:
    """``"vit"``, ``"cnn"`` or ``"headless vit"`` / ``"headless cnn"``."""
    arch = "vit" if is_vit(module) else "cnn"
    return f"headless {arch}" if is_headless(module) else arch


def recipe_misfit(recipe: Recipe, module: nn.Module) -> str | None:
    """Why ``recipe`` cannot run on ``module`` (one sentence naming the cause), or ``None`` when it can."""
    vit_only = [n for n in recipe.explainers if EXPLAINERS[n].vit_only]
    if vit_only and not is_vit(module):
        fits = ", ".join(sorted(n for n, e in EXPLAINERS.items() if not e.vit_only))
        return (f"recipe {recipe.name!r}: {', '.join(vit_only)} need a Vision Transformer and the model "
                f"({type(module).__name__}) is not one; explainers for it: {fits} (e.g. the recipe default-cnn)")
    classy = [n for n in recipe.explainers if EXPLAINERS[n].needs_class]
    if classy and is_headless(module):
        agnostic = sorted(n for n, e in EXPLAINERS.items() if not e.needs_class)
        return (f"recipe {recipe.name!r}: {', '.join(classy)} explain a class, and the model has no classifier "
                f"head (num_classes=0); use a class-agnostic recipe (tokencut, maskcut; explainers "
                f"{', '.join(agnostic)}) or a model with a head")
    if recipe.domain is not None and is_headless(module):
        return (f"recipe {recipe.name!r}: [domain] picks images by the explained class's probability, and the model "
                f"has no classifier head (num_classes=0) to give one; remove [domain] or use a model with a head")
    return None


def needed_layers(model: LoadedModel, recipe: Recipe) -> tuple[str, ...]:
    """The layers whose outputs the recipe's refiners (its own and its ``[domain]``'s) read from the shared pass
    (their declared needs; none when the features come from a separate backbone)."""
    out = []
    for r in recipe.stages():
        if "features" in REFINERS[r.refine.method].requires and uses_classifier(model, r.features):
            out.append(feature_layer(model.module, feature=r.features["feature"], block=r.features["block"]))
    return tuple(dict.fromkeys(out))


def _check_layer(modules: dict[str, nn.Module], where: str, layer: object) -> None:
    if isinstance(layer, str) and layer in modules:
        return
    close = difflib.get_close_matches(str(layer), [m for m in modules if m], n=5, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}" if close else "; see model.named_modules() for the names"
    raise ValueError(f"{where}: the model has no layer {layer!r}{hint}")


def check_recipe_for_model(model: LoadedModel, recipe: Recipe) -> None:
    """Raise ValueError (naming the recipe, its section and the key) when ``recipe`` cannot run on ``model``.

    Checked: :func:`recipe_misfit` (ViT-only explainers need a Vision Transformer, explainers that need a class
    need a head); every layer an explainer or the refiner's features read exists in
    ``model.module.named_modules()``; ``start_layer`` lies in ``[-depth, depth)`` (as the attention explainers take
    it); ``[features] block`` lies in ``[-depth, depth)``; the feature backbones load (:func:`check_backbones`).
    """
    module = model.module
    vit = is_vit(module)
    modules = dict(module.named_modules())
    where = f"recipe {recipe.name!r}"
    misfit = recipe_misfit(recipe, module)  # a ViT-only explainer on a CNN, a class on a headless model
    if misfit:
        raise ValueError(misfit)
    for name, params in recipe.explainers.items():
        section = f"{where}, [explainers.{name}]"
        try:
            resolved = EXPLAINERS[name].resolve(name, params)
            needs = EXPLAINERS[name].needs(module, resolved)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise ValueError(f"{section}: {e}") from e
        for layer in needs.layers:
            _check_layer(modules, f"{section} layer", layer)
        start, depth = resolved.get("start_layer"), len(getattr(module, "blocks", ()))
        if start is not None and vit and not (isinstance(start, int) and -depth <= start < depth):
            raise ValueError(f"{section}: start_layer must lie in [-{depth}, {depth}) for this model "
                             f"({depth} blocks; negative counts from the end), got {start!r}")
    for stages in recipe.stages():  # its own [features], then its [domain.features]
        section = f"{where}, [features]" if stages is recipe else f"{where}, [domain.features]"
        try:
            layers = needed_layers(model, stages)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{section}: {e}") from e
        for layer in layers:
            _check_layer(modules, section, layer)
    check_backbones(model, recipe)


def check_backbones(model: LoadedModel, recipe: Recipe) -> None:
    """Load the feature backbones the recipe's refiners read (its own ``[features]`` and its ``[domain.features]``;
    kept for the run, see :func:`~segfromxai.models.features.backbone_for`), so that a missing or unreadable
    ``checkpoint``, a timm name without weights or an ``img_size`` below the patch is a ValueError naming the recipe
    and section before any image is read."""
    for stages in recipe.stages():
        if "features" not in REFINERS[stages.refine.method].requires or uses_classifier(model, stages.features):
            continue
        section = f"recipe {recipe.name!r}, [{'features' if stages is recipe else 'domain.features'}]"
        try:
            backbone_for(model, stages.features)
        except (ValueError, TypeError, RuntimeError, OSError) as e:
            raise ValueError(f"{section}: {e}") from e


def check_recipes_for_model(model: LoadedModel, recipes: Sequence[Recipe]) -> None:
    """:func:`check_recipe_for_model` for each recipe."""
    for recipe in recipes:
        check_recipe_for_model(model, recipe)
