"""Explainers of a classifier's decision. ``EXPLAINERS`` maps each method's name to its ``Explainer``.

The registry is the single source of truth for CLI choices, recipe validation, ``segfromxai list`` and tests.
``explain(model, x, methods, target=None)`` runs any set of them with shared forward and backward passes.

``PERTURBATION_EXPLAINERS`` (R-Cut, MoXI, feature-coalition perturbation) read the shared pass too but then run
their own forward passes on perturbed inputs; their docstrings count them.

One file per family over ``core`` (the shared pass, the :class:`Explainer` entry): ``gradient``, ``attention``,
``lrp`` (its rules in ``lrp_rules``), ``rcut``, ``moxi``, ``coalition``. May import the base modules,
:mod:`segfromxai.ops`, :mod:`segfromxai.io` and :mod:`segfromxai.models`; the stages and everything above import it.
"""

from __future__ import annotations

from .attention import ATTENTION_EXPLAINERS
from .coalition import COALITION_EXPLAINERS
from typing import Any, Mapping, Sequence

import torch

from . import core
from .core import Explained, Explainer, Needs, Pass, resolve_methods
from .gradient import GRADIENT_EXPLAINERS
from .lrp import LRP_EXPLAINERS, LRPConfig, lrp_pass
from .moxi import MOXI_EXPLAINERS
from .rcut import RCUT_EXPLAINERS

PERTURBATION_EXPLAINERS: dict[str, Explainer] = {**RCUT_EXPLAINERS, **MOXI_EXPLAINERS, **COALITION_EXPLAINERS}
EXPLAINERS: dict[str, Explainer] = {**GRADIENT_EXPLAINERS, **ATTENTION_EXPLAINERS, **LRP_EXPLAINERS,
                                    **PERTURBATION_EXPLAINERS}

__all__ = ["EXPLAINERS", "PERTURBATION_EXPLAINERS", "Explained", "Explainer", "LRPConfig", "Needs", "Pass", "explain",
           "explain_pass", "explain_with_logits", "lrp_pass", "resolve_methods"]

Methods = str | Sequence[str] | Mapping[str, Mapping[str, Any] | None]


def explain_pass(model: Any, x: torch.Tensor, methods: Methods, target: Any = None, *, record: Sequence[str] = (),
                 registry: Mapping[str, Explainer] = EXPLAINERS) -> Explained:
    """:func:`segfromxai.explainers.core.explain_pass` with the registered methods (``EXPLAINERS``) by default."""
    return core.explain_pass(model, x, methods, target, registry=registry, record=record)


def explain(model: Any, x: torch.Tensor, methods: Methods, target: Any = None, *,
            registry: Mapping[str, Explainer] = EXPLAINERS) -> dict[str, torch.Tensor]:
    """Explanation maps of a batch for each requested method, sharing the forward and backward passes.

    Same as :func:`explain_with_logits` without the logits.
    """
    return explain_pass(model, x, methods, target, registry=registry).maps


def explain_with_logits(model: Any, x: torch.Tensor, methods: Methods, target: Any = None, *,
                        registry: Mapping[str, Explainer] = EXPLAINERS
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Explanation maps of a batch for each requested method, and the logits of the same forward pass.

    Same as :func:`explain_pass`, returning ``(maps, logits)``.
    """
    got = explain_pass(model, x, methods, target, registry=registry)
    return got.maps, got.logits
