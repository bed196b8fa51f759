"""Explainers of a classifier's decision. ``EXPLAINERS`` maps each method's name to its ``Explainer``.

The registry is the single source of truth for CLI choices, recipe validation, ``segfromxai list`` and tests.
``explain(model, x, methods, target=None)`` runs any set of them with shared forward and backward passes.
"""

from __future__ import annotations

from .attention import ATTENTION_EXPLAINERS
from .core import Explainer, Needs, Pass, explain, explain_with_logits, resolve_methods
from .gradient import GRADIENT_EXPLAINERS
from .lrp import LRP_EXPLAINERS, LRPConfig, lrp_pass

EXPLAINERS: dict[str, Explainer] = {**GRADIENT_EXPLAINERS, **ATTENTION_EXPLAINERS, **LRP_EXPLAINERS}

__all__ = ["EXPLAINERS", "Explainer", "LRPConfig", "Needs", "Pass", "explain", "explain_with_logits", "lrp_pass", "resolve_methods"]
