"""Explainers of a classifier's decision. ``EXPLAINERS`` maps each method's name to its ``Explainer``.

The registry is the single source of truth for CLI choices, recipe validation, ``segfromxai list`` and tests.
``explain(model, x, methods, target=None)`` runs any set of them with shared forward and backward passes.

``PERTURBATION_EXPLAINERS`` (R-Cut, MoXI, feature-coalition perturbation) read the shared pass too but then run
their own forward passes on perturbed inputs; their docstrings count them.
"""

from __future__ import annotations

from .attention import ATTENTION_EXPLAINERS
from .coalition import COALITION_EXPLAINERS
from .core import Explained, Explainer, Needs, Pass, explain, explain_pass, explain_with_logits, resolve_methods
from .gradient import GRADIENT_EXPLAINERS
from .lrp import LRP_EXPLAINERS, LRPConfig, lrp_pass
from .moxi import MOXI_EXPLAINERS
from .rcut import RCUT_EXPLAINERS

PERTURBATION_EXPLAINERS: dict[str, Explainer] = {**RCUT_EXPLAINERS, **MOXI_EXPLAINERS, **COALITION_EXPLAINERS}
EXPLAINERS: dict[str, Explainer] = {**GRADIENT_EXPLAINERS, **ATTENTION_EXPLAINERS, **LRP_EXPLAINERS,
                                    **PERTURBATION_EXPLAINERS}

__all__ = ["EXPLAINERS", "PERTURBATION_EXPLAINERS", "Explained", "Explainer", "LRPConfig", "Needs", "Pass", "explain",
           "explain_pass", "explain_with_logits", "lrp_pass", "resolve_methods"]
