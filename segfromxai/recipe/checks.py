"""Checks of a recipe against the model it runs on, made as soon as the model is known and before any image is read.

:mod:`segfromxai.recipe.recipe` validates what a recipe says on its own (names, keys, value ranges); what depends on the
model is checked here: a ViT-only explainer on a CNN, a ``layer`` the model does not have, a ``start_layer`` or a
``[features] block`` outside the model's blocks. ``run`` (:func:`segfromxai.run.local.plan_run`) and ``compare`` call
:func:`check_recipe_for_model` before they touch the output folder or the images.
"""

from __future__ import annotations

import difflib
from typing import Sequence

from torch import nn

from ..explainers import EXPLAINERS
from .fit import recipe_misfit
from ..models.model import LoadedModel, is_vit
from ..run import pipeline  # the module, not a name from it: pipeline's __getattr__ would import engine, which imports us
from .recipe import Recipe


def _check_layer(modules: dict[str, nn.Module], where: str, layer: object) -> None:
    if isinstance(layer, str) and layer in modules:
        return
    close = difflib.get_close_matches(str(layer), [m for m in modules if m], n=5, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}" if close else "; see model.named_modules() for the names"
    raise ValueError(f"{where}: the model has no layer {layer!r}{hint}")


def check_recipe_for_model(model: LoadedModel, recipe: Recipe) -> None:
    """Raise ValueError (naming the recipe, its section and the key) when ``recipe`` cannot run on ``model``.

    Checked: :func:`segfromxai.recipe.fit.recipe_misfit` (ViT-only explainers need a Vision Transformer, explainers that
    need a class need a head); every layer an explainer or the refiner's features
    read exists in ``model.module.named_modules()``; ``start_layer`` lies in ``[-depth, depth)`` (as the attention explainers take it); ``[features] block``
    lies in ``[-depth, depth)``.
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
            layers = pipeline.needed_layers(model, stages)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{section}: {e}") from e
        for layer in layers:
            _check_layer(modules, section, layer)


def check_recipes_for_model(model: LoadedModel, recipes: Sequence[Recipe]) -> None:
    """:func:`check_recipe_for_model` for each recipe."""
    for recipe in recipes:
        check_recipe_for_model(model, recipe)
