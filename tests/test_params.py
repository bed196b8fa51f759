"""params: one declaration format (typed keyword-only signatures) read into defaults, choices and ranges."""

import functools
from typing import Annotated, Literal

import pytest

from segfromxai.params import Fraction, Range, check, declared, defaults


def toy(x, *, a: int = 1, b: Fraction = 0.5, c: Literal["u", "v"] = "u", d: str | None = None,
        e: Annotated[float, Range(0.0, 10.0, lo_open=True)] = 2.0, w: dict[str, Fraction] = {},
        ctx: int = 0) -> None:
    """A toy declaration."""


def test_ranges_known_answers():
    r = Range(0.0, 1.0, lo_open=True)
    assert 0.5 in r and 1.0 in r and 0.0 not in r and float("nan") not in r and 2 not in r
    assert str(r) == "(0, 1]" and str(Range(1)) == "[1, inf)" and -5 in Range(hi=0)


def test_declared_reads_defaults_types_choices_ranges_and_leaves_out_context():
    d = declared(toy, context=("ctx",))
    assert list(d) == ["a", "b", "c", "d", "e", "w"]
    assert defaults(toy, context=("ctx",)) == {"a": 1, "b": 0.5, "c": "u", "d": None, "e": 2.0, "w": {}}
    assert d["c"].choices == ("u", "v") and d["b"].range == Range(0.0, 1.0) and d["d"].optional
    assert d["w"].value.range == Range(0.0, 1.0)
    assert declared(functools.partial(toy, a=7))["a"].default == 7  # a partial declares new defaults


@pytest.mark.parametrize("given, match", [
    ({"a": 1.5}, "a = 1.5 should be a int"), ({"a": True}, "a = True should be a int"),
    ({"b": 2}, r"b = 2 must lie in \[0, 1\]"), ({"b": float("nan")}, "b = nan should be a finite number"),
    ({"c": "x"}, "c = 'x' is not one of 'u', 'v'"), ({"d": 3}, "d = 3 should be a str"),
    ({"e": 0}, r"e = 0 must lie in \(0, 10\]"), ({"w": {"k": -1}}, r"w\[...\] = -1 must lie in \[0, 1\]"),
    ({"w": 3}, "w = 3 should be a table"), ({"zz": 1}, "unknown key 'zz'; valid: a, b, c, d, e, w"),
])
def test_check_refuses_with_the_key_and_the_rule(given, match):
    with pytest.raises(ValueError, match=match):
        check(given, declared(toy, context=("ctx",)))


def test_check_fills_defaults_and_converts_ints_for_floats():
    got = check({"b": 1, "d": "s", "w": {"k": 0}}, declared(toy, context=("ctx",)))
    assert got == {"a": 1, "b": 1.0, "c": "u", "d": "s", "e": 2.0, "w": {"k": 0.0}}
    assert isinstance(got["b"], float)
    assert check({}, declared(toy, context=("ctx",)))["w"] is not toy.__kwdefaults__["w"]  # defaults copied


def test_undeclared_parameters_are_refused():
    def bad(*, a=1) -> None: ...
    with pytest.raises(TypeError, match="needs a default and a type annotation"):
        declared(bad)
