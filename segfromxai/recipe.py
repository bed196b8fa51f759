"""Recipes: a TOML file that names every choice of a labelling run, read into a frozen, fully resolved ``Recipe``.

A recipe has the sections ``model``, ``explainers``, ``fusion``, ``threshold``, ``refine``, ``boundary``, ``masks`` and
``output`` (all but ``explainers`` optional), plus ``name`` and ``description``. Every unknown section, key, name
or parameter, and every value of the wrong type or outside its allowed set, raises :class:`RecipeError` naming
the valid choices, before any model is loaded. The resolved recipe (every default filled in) is what runs and
what is saved with the outputs. Example (``recipes/default.toml``)::

    name = "default"
    [explainers.gradcam]
    [explainers.lrp]
    [fusion]
    method = "geometric"
    [threshold]
    method = "otsu"
    [refine]
    method = "ncut"
    feature = "v"
    tau = 0.3
"""

from __future__ import annotations

import hashlib
import inspect
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .boundary import BOUNDARIES
from .explainers import EXPLAINERS
from .fusion import FUSIONS, GRIDS
from .features import FEATURES
from .refine import CHOICES as REFINE_CHOICES, REFINERS
from .threshold import THRESHOLDS


class RecipeError(ValueError):
    """A recipe that cannot run: unknown key, name or parameter, or a value of the wrong type."""


SECTIONS = ("name", "description", "model", "explainers", "fusion", "threshold", "features", "refine", "boundary",
            "masks", "output")

MODEL_DEFAULTS: dict[str, Any] = {"name": "", "checkpoint": ""}
"""``name``: timm model name ("" = the embedded default); ``checkpoint``: local weights ("" = none)."""

FUSION_DEFAULTS: dict[str, Any] = {"method": "geometric", "grid": "tokens", "clip": None, "eps": 1e-6,
                                   "weights": {}, "renormalise": True}
FUSION_CHOICES = {"method": tuple(FUSIONS), "grid": GRIDS}

FEATURE_DEFAULTS: dict[str, Any] = {"feature": "k", "block": -1}
"""Where a refiner that needs token features (``ncut``) reads them: ``feature`` (k, q, v of the block's attention,
or the block's output ``tokens``) and ``block`` (index, negative from the end)."""
FEATURE_CHOICES = {"feature": FEATURES}

MASK_DEFAULTS: dict[str, Any] = {"min_area": 0.001, "fill_holes": True, "max_hole": None, "keep": "all",
                                 "split_components": False}
"""``min_area``/``max_hole`` are fractions of the image area; ``keep``: every component or the largest;
``split_components``: one annotation per connected component instead of one per instance."""
MASK_CHOICES = {"keep": ("all", "largest")}

OUTPUT_DEFAULTS: dict[str, Any] = {"min_confidence": 0.0, "maps": False, "overlays": False}
"""``min_confidence``: skip (and list) images whose explained class has a lower softmax probability;
``maps``: save every map and the fused map per image (``maps/*.npz``); ``overlays``: save overlay PNGs."""

# Parameters a stage function receives from the pipeline, not from the recipe.
_CONTEXT_PARAMS = {"maps", "fused", "mask", "size", "features"}


@dataclass(frozen=True)
class Stage:
    """A registered function chosen by name, with its resolved keyword parameters."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe: every stage chosen, every parameter set (defaults filled in)."""

    name: str
    description: str
    model: dict[str, Any]
    explainers: dict[str, dict[str, Any]]
    fusion: dict[str, Any]
    threshold: Stage
    features: dict[str, Any]
    refine: Stage
    masks: dict[str, Any]
    output: dict[str, Any]
    boundary: Stage = Stage("none")

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain JSON-ready data (``None`` for unset optional values)."""
        return json.loads(json.dumps({
            "name": self.name, "description": self.description, "model": self.model,
            "explainers": self.explainers, "fusion": self.fusion, "threshold": self.threshold.to_dict(),
            "features": self.features, "refine": self.refine.to_dict(), "boundary": self.boundary.to_dict(),
            "masks": self.masks, "output": self.output}))

    def digest(self) -> str:
        """SHA-256 of everything that changes the annotations (not the name, description or saved artefacts)."""
        d = self.to_dict()
        d.pop("name"), d.pop("description"), d["output"].pop("maps"), d["output"].pop("overlays")
        if d["boundary"] == {"method": "none"}:  # recipes from before the boundary stage keep their digest
            d.pop("boundary")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _fail(where: str, msg: str) -> RecipeError:
    return RecipeError(f"recipe [{where}]: {msg}")


def _check_value(where: str, key: str, value: Any, default: Any, choices: tuple | None = None) -> Any:
    """``value`` checked against the type of ``default`` (ints pass for floats) and against ``choices``."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and (default is None or isinstance(default, bool))
    elif isinstance(default, float) or default is None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) or (default is None and value is None)
    elif isinstance(default, (int, str, dict, tuple, list)):
        ok = isinstance(value, type(default)) or (isinstance(default, tuple) and isinstance(value, list))
    else:
        ok = True
    if not ok:
        raise _fail(where, f"{key} = {value!r} should be a {type(default).__name__}")
    if choices is not None and value not in choices:
        raise _fail(where, f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _section(where: str, given: Mapping[str, Any], defaults: Mapping[str, Any],
             choices: Mapping[str, tuple] | None = None) -> dict[str, Any]:
    if not isinstance(given, Mapping):
        raise _fail(where, f"expected a table, got {given!r}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise _fail(where, f"unknown key {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(defaults))}")
    choices = choices or {}
    out = dict(defaults)
    for key, value in given.items():
        out[key] = _check_value(where, key, value, defaults[key], choices.get(key))
    return out


def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The keyword parameters of a stage function with their defaults (the pipeline's context ones left out)."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and p.name not in _CONTEXT_PARAMS:
            out[p.name] = None if p.default is p.empty else p.default
    return out


def _stage(where: str, given: Mapping[str, Any], registry: Mapping[str, Callable[..., Any]], default: str,
           choices: Mapping[str, Mapping[str, tuple]] | None = None) -> Stage:
    given = dict(given)
    method = given.pop("method", default)
    if method not in registry:
        raise _fail(where, f"unknown method {method!r}; valid: {', '.join(sorted(registry))}")
    params = _section(f"{where}] [{method}", given, keyword_defaults(getattr(registry[method], "fn", registry[method])),
                      (choices or {}).get(method))
    return Stage(method, params)


def _explainers(given: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(given, Mapping) or not given:
        raise _fail("explainers", f"needs at least one explainer table, e.g. [explainers.gradcam]; valid: "
                    f"{', '.join(sorted(EXPLAINERS))}")
    out = {}
    for name, params in given.items():
        if name not in EXPLAINERS:
            raise _fail("explainers", f"unknown explainer {name!r}; valid: {', '.join(sorted(EXPLAINERS))}")
        try:
            out[name] = EXPLAINERS[name].resolve(name, params)
        except ValueError as e:
            raise _fail("explainers", str(e)) from None
    return out


def parse_recipe(data: Mapping[str, Any], *, name: str = "recipe") -> Recipe:
    """Validate and resolve recipe data (as read from TOML) into a :class:`Recipe`."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise _fail("top level", f"unknown key {', '.join(map(repr, unknown))}; valid: {', '.join(SECTIONS)}")
    explainers = _explainers(data.get("explainers"))
    fusion = _section("fusion", data.get("fusion", {}), FUSION_DEFAULTS, FUSION_CHOICES)
    weights = fusion["weights"]
    if set(weights) - set(explainers) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                             for v in weights.values()):
        raise _fail("fusion", f"weights must be non-negative numbers for the recipe's explainers "
                    f"({', '.join(explainers)}), got {weights}")
    if fusion["clip"] is not None and not 0 < fusion["clip"] <= 100:
        raise _fail("fusion", f"clip must be a percentile in (0, 100], got {fusion['clip']}")
    masks = _section("masks", data.get("masks", {}), MASK_DEFAULTS, MASK_CHOICES)
    output = _section("output", data.get("output", {}), OUTPUT_DEFAULTS)
    if not 0 <= output["min_confidence"] <= 1:
        raise _fail("output", f"min_confidence must lie in [0, 1], got {output['min_confidence']}")
    return Recipe(
        name=_check_value("top level", "name", data.get("name", name), ""),
        description=_check_value("top level", "description", data.get("description", ""), ""),
        model=_section("model", data.get("model", {}), MODEL_DEFAULTS),
        explainers=explainers,
        fusion=fusion,
        threshold=_stage("threshold", data.get("threshold", {}), THRESHOLDS, "otsu"),
        features=_section("features", data.get("features", {}), FEATURE_DEFAULTS, FEATURE_CHOICES),
        refine=_stage("refine", data.get("refine", {}), REFINERS, "none", REFINE_CHOICES),
        boundary=_stage("boundary", data.get("boundary", {}), BOUNDARIES, "none"),
        masks=masks,
        output=output,
    )


def with_output(recipe: Recipe, **changes: Any) -> Recipe:
    """``recipe`` with some ``output`` options replaced (``None`` values leave an option as it is), re-validated."""
    output = {**recipe.output, **{k: v for k, v in changes.items() if v is not None}}
    data = recipe.to_dict()
    data["output"] = output
    return parse_recipe(data, name=recipe.name)


def recipes_dir() -> Path:
    """The ``recipes/`` folder shipped beside the package (in a source checkout or an editable install)."""
    return Path(__file__).resolve().parents[1] / "recipes"


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe path as given, or ``recipes/<name>.toml`` for a bare name; FileNotFoundError lists the shipped ones."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = recipes_dir() / f"{p.as_posix()}.toml"
    if p.suffix == "" and not p.is_absolute() and shipped.is_file():
        return shipped
    names = sorted(q.relative_to(recipes_dir()).with_suffix("").as_posix()
                   for q in recipes_dir().rglob("*.toml")) if recipes_dir().is_dir() else []
    raise FileNotFoundError(f"no recipe {str(name_or_path)!r}; shipped recipes: {', '.join(names) or 'none'}")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read, validate and resolve a TOML recipe (a path, or the name of one in ``recipes/``)."""
    path = find_recipe(name_or_path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    try:
        return parse_recipe(data, name=path.stem)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def load_recipes(names_or_paths: list[str | Path]) -> list[Recipe]:
    """Several recipes; a folder (a path, or a folder under ``recipes/`` such as ``vitmix``) gives every recipe in
    it, sorted. Names must be unique."""
    out: list[Recipe] = []
    for item in names_or_paths:
        folder = Path(item) if Path(item).is_dir() else recipes_dir() / str(item)
        if folder.is_dir() and not Path(item).is_file():
            out += [load_recipe(p) for p in sorted(folder.glob("*.toml"))]
        else:
            out.append(load_recipe(item))
    seen: set[str] = set()
    for r in out:
        if r.name in seen:
            raise RecipeError(f"two recipes are named {r.name!r}; give each a unique name")
        seen.add(r.name)
    return out
