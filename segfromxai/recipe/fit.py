"""Does a recipe fit a model? Checked before any image is read, with a message that names the cause.

Three kinds of model run recipes: a ViT with a classifier head, a CNN with a head, and a *headless* backbone
(``num_classes=0``, e.g. a self-supervised ViT-S/14). A headless model has no class to explain: it runs the
class-agnostic recipes (explainers with ``needs_class=False``: ``rollout``, ``uniform``; TokenCut, MaskCut) and its
masks get one category, ``object``, or the classes named by a labels file. ViT-only explainers (attention maps,
LRP) refuse a CNN.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..explainers import EXPLAINERS
from ..io.coco import AGNOSTIC_CLASS
from ..models.model import LoadedModel, is_vit
from .recipe import Recipe
from ..run.targets import Targets

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


def check_fit(recipes: Sequence[Recipe], model: LoadedModel) -> None:
    """Raise ValueError naming every recipe that cannot run on ``model`` (see :func:`recipe_misfit`)."""
    problems = [p for p in (recipe_misfit(r, model.module) for r in recipes) if p]
    if problems:
        raise ValueError("; ".join(problems))


def fit_classes(model: LoadedModel, targets: Targets, rel_paths: Sequence[str]) -> None:
    """Give a headless model its categories (it has none): the labels given for ``rel_paths`` (sorted), or
    ``object``. Models with a head are left as they are."""
    if not is_headless(model.module):
        return
    names = sorted({n for n in map(targets.name, rel_paths) if n is not None})
    model.classes = names or [AGNOSTIC_CLASS]
