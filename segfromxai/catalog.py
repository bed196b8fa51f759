"""Every registry of the package in one view, for ``segfromxai list``, the docs tests and test parametrisation.

It sits at the top of the package (beside the CLI) because it imports every family; the entries' shape lives at
the bottom, in :mod:`segfromxai.registry`.
"""

from __future__ import annotations

from typing import Mapping

from .explainers import EXPLAINERS
from .io.exporters import EXPORTERS
from .quality.faithfulness import MAP_METRICS
from .quality.metrics import METRICS
from .stages.boundary import BOUNDARIES
from .stages.fusion import FUSIONS
from .stages.refine import REFINERS
from .stages.threshold import THRESHOLDS
from .student.heads import HEADS
from .student.masks import SOFT_MAPS


def registries() -> dict[str, Mapping]:
    """Each registry by its title, in the order of the chain (explain, fuse, threshold, refine, boundary, write,
    score, student)."""
    return {
        "explainers": EXPLAINERS,
        "fusions": FUSIONS,
        "thresholds": THRESHOLDS,
        "refiners": REFINERS,
        "boundaries": BOUNDARIES,
        "formats": EXPORTERS,
        "metrics": METRICS,
        "map metrics": MAP_METRICS,
        "student heads": HEADS,
        "student soft maps": SOFT_MAPS,
    }


def names() -> dict[str, list[str]]:
    """Each registry's title and its sorted names."""
    return {title: sorted(reg) for title, reg in registries().items()}
