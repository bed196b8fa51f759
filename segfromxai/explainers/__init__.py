"""Explainers of a classifier's decision. ``EXPLAINERS`` maps each method's name to its implementation.

The methods (Grad-CAM, saliency, rollout, the LRP family) arrive with the explainers issue; the registry is the
single source of truth for CLI choices, recipe validation and tests.
"""

from __future__ import annotations

from typing import Callable

EXPLAINERS: dict[str, Callable] = {}
