"""The registries in one view, for `segfromxai list`, docs tests and recipe validation."""

from __future__ import annotations


def registries() -> dict[str, list[str]]:
    """Map each registry's title to its sorted registered names."""
    from .boundary import BOUNDARIES
    from .explainers import EXPLAINERS
    from .faithfulness import MAP_METRICS
    from .metrics import METRICS
    from .refine import REFINERS
    from .student import HEADS
    from .student_masks import SOFT_MAPS
    from .threshold import THRESHOLDS

    return {
        "explainers": sorted(EXPLAINERS),
        "thresholds": sorted(THRESHOLDS),
        "refiners": sorted(REFINERS),
        "boundaries": sorted(BOUNDARIES),
        "metrics": sorted(METRICS),
        "map metrics": sorted(MAP_METRICS),
        "student heads": sorted(HEADS),
        "student soft maps": sorted(SOFT_MAPS),
    }
