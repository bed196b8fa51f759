"""Stage parameters, declared one way: the typed keyword-only parameters of a function's signature.

Every recipe value (explainers, fusion, threshold, features, refine, masks, output, model) is declared by a
keyword-only parameter with a default and a type annotation, and nothing else:

- the default is the parameter's default;
- ``bool``, ``int``, ``float``, ``str`` (with ``| None`` for optional values) give the type; an ``int`` passes for
  a ``float``; a float must be finite (NaN and infinities are refused);
- ``Literal[...]`` gives a closed set of choices;
- ``Annotated[float, Range(lo, hi)]`` gives an interval (closed unless ``lo_open``/``hi_open``);
- ``dict[str, T]`` is a table whose values are checked as ``T``.

:func:`declared` reads a signature into :class:`Param` objects; :func:`check` validates given values against them
and fills in the defaults. The recipe reader, ``segfromxai list`` and the tests read the same declarations.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Annotated, Callable, Literal, Mapping, Union


@dataclass(frozen=True)
class Range:
    """A closed (or half-open) interval of allowed numbers; ``None`` leaves a side unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if v != v:  # NaN lies in no interval
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


Fraction = Annotated[float, Range(0.0, 1.0)]
"""A number in [0, 1] (areas as fractions of the image, probabilities, overlaps)."""
NonNegative = Annotated[float, Range(0.0)]
Positive = Annotated[float, Range(0.0, lo_open=True)]
Percentile = Annotated[float, Range(0.0, 100.0, lo_open=True)]
PositiveInt = Annotated[int, Range(1)]


@dataclass(frozen=True)
class Param:
    """One declared parameter: default, base type, optional (None allowed), choices, range, table value type."""

    name: str
    default: Any
    kind: Any
    optional: bool = False
    choices: tuple | None = None
    range: Range | None = None
    value: Param | None = None

    def describe(self) -> str:
        """The allowed values in words, e.g. ``a float in [0, 1]`` or ``one of 'k', 'v'``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        what = f"a {getattr(self.kind, '__name__', str(self.kind))}" + (f" in {self.range}" if self.range else "")
        return what + (" or none" if self.optional else "")


def _param(name: str, annotation: Any, default: Any) -> Param:
    optional, rng, value = False, None, None
    if typing.get_origin(annotation) is Annotated:
        annotation, *meta = typing.get_args(annotation)
        rng = next((m for m in meta if isinstance(m, Range)), None)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"parameter {name!r}: unions other than 'T | None' are not declarations")
        inner = _param(name, args[0], default)
        return Param(name, default, inner.kind, optional, inner.choices, inner.range or rng, inner.value)
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return Param(name, default, type(choices[0]), optional, choices, rng)
    if typing.get_origin(annotation) in (dict, Mapping):
        value = _param(f"{name}[...]", typing.get_args(annotation)[1], None)
        annotation = dict
    if annotation not in (bool, int, float, str, dict):
        raise TypeError(f"parameter {name!r}: annotation {annotation!r} is not a declaration type")
    return Param(name, default, annotation, optional, None, rng, value)


@functools.lru_cache(maxsize=None)
def declared(fn: Callable[..., Any], *, context: tuple[str, ...] = ()) -> dict[str, Param]:
    """The keyword-only parameters of ``fn`` (``context`` names, given by the pipeline, left out) as Params
    (cached: treat the result as read-only)."""
    hints = typing.get_type_hints(getattr(fn, "func", fn), include_extras=True)  # a functools.partial: its function
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and p.name not in context:
            if p.default is p.empty or p.name not in hints:
                raise TypeError(f"{fn.__qualname__}: parameter {p.name!r} needs a default and a type annotation")
            out[p.name] = _param(p.name, hints[p.name], p.default)
    return out


def defaults(fn: Callable[..., Any], *, context: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{name: default}`` of :func:`declared`."""
    return {name: p.default for name, p in declared(fn, context=context).items()}


def check_value(p: Param, value: Any) -> Any:
    """``value`` if it is allowed for ``p``; else ValueError saying ``<name> = <value> should be ...``."""
    if value is None and (p.optional or p.default is None):
        return None
    if p.kind is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{p.name} = {value!r} should be a table")
        return {str(k): check_value(p.value, v) for k, v in value.items()} if p.value else dict(value)
    given = value
    ok = isinstance(value, p.kind) and not (isinstance(value, bool) and p.kind is not bool)
    if p.kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ValueError(f"{p.name} = {value!r} should be a {p.kind.__name__}")
    if p.choices is not None and value not in p.choices:
        raise ValueError(f"{p.name} = {given!r} is not one of {', '.join(map(repr, p.choices))}")
    if p.kind is float and not math.isfinite(value):
        raise ValueError(f"{p.name} = {given!r} should be a finite number")
    if p.range is not None and value not in p.range:
        raise ValueError(f"{p.name} = {given!r} must lie in {p.range}")
    return value


def check(given: Mapping[str, Any], params: Mapping[str, Param]) -> dict[str, Any]:
    """Defaults overridden by ``given``, each value checked; unknown keys raise ValueError naming the valid ones."""
    if not isinstance(given, Mapping):
        raise ValueError(f"expected a table, got {given!r}")
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(params))}")
    out = {name: dict(p.default) if isinstance(p.default, dict) else p.default for name, p in params.items()}
    for key, value in given.items():
        out[key] = check_value(params[key], value)
    return out
