"""The one shape of every registry entry, and the lookup that names the valid choices.

Every stage family is a plain dict ``name -> Entry`` in the module that defines the family's functions
(``EXPLAINERS`` in :mod:`segfromxai.explainers`, ``FUSIONS``, ``THRESHOLDS``, ``REFINERS``, ``BOUNDARIES`` in
:mod:`segfromxai.stages`, ``EXPORTERS`` in :mod:`segfromxai.io`, ``METRICS`` and ``MAP_METRICS`` in
:mod:`segfromxai.quality`, ``HEADS`` and ``SOFT_MAPS`` in :mod:`segfromxai.student`). The dict is the single source:
CLI choices, recipe validation, ``segfromxai list`` (through :mod:`segfromxai.catalog`, which lists every registry)
and the tests read it. A family that needs more than a function, a summary and its needs subclasses :class:`Entry`
(``Explainer`` adds its parameter declaration, ``Metric`` its direction).

This module sits at the bottom of the package: it imports nothing from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar


@dataclass(frozen=True)
class Entry:
    """A registered function.

    fn : the function; calling the entry calls it.
    summary : one line for ``segfromxai list`` and the docs.
    requires : what the function needs from the run beyond its declared call shape, by name (e.g. ``"features"``:
        per-token features of the recipe's ``[features]`` layer; ``"model"``: the classifier itself; ``"vit"``: a
        Vision Transformer; ``"class"``: a class to explain).
    """

    fn: Callable[..., Any]
    summary: str
    requires: frozenset[str] = frozenset()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


E = TypeVar("E")


def lookup(registry: Mapping[str, E], name: str, what: str) -> E:
    """``registry[name]``, or ValueError ``unknown <what> 'name'; valid: a, b, c``."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(sorted(registry))}") from None
