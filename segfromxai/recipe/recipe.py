"""Recipes: a TOML file that names every choice of a labelling run, read into a frozen, fully resolved ``Recipe``.

A recipe has the sections ``model``, ``explainers``, ``fusion``, ``threshold``, ``features``, ``refine``,
``boundary``, ``masks`` and ``output`` (all but ``explainers`` optional), plus ``name`` and ``description``. Each section's keys
are the typed keyword-only parameters of one function (:data:`DECLARED`, the registered stage functions, the
explainers' declarations; see :mod:`segfromxai.params`): their defaults, ``Literal`` choices and ranges are the
only source. Every unknown section, key, name or parameter, and every value of the wrong type, outside its
choices or range, or not finite, raises :class:`RecipeError` naming the key and the valid choices, before any
model is loaded. The resolved recipe (every default filled in) is what runs and what is saved with the outputs.
Example (an abridged ``recipes/default.toml``)::

    name = "default"
    [explainers.gradcam]
    [explainers.lrp]
    [fusion]
    method = "geometric"
    [threshold]
    method = "otsu"
    [features]
    model = "dinov2"
    img_size = 392
    [refine]
    method = "ncut"
    tau_quantile = 0.6
    [boundary]
    method = "guided"
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..stages.boundary import BOUNDARIES
from ..explainers import EXPLAINERS
from ..models.features import FEATURE_MODELS, feature_options
from ..stages.fusion import fuse_on_grid
from ..ops.masks import clean
from ..params import Fraction, Param, check, declared
from ..stages.refine import REFINERS
from ..stages.threshold import THRESHOLDS


class RecipeError(ValueError):
    """A recipe that cannot run: unknown key, name or parameter, or a value of the wrong type or range."""


SECTIONS = ("name", "description", "model", "explainers", "fusion", "threshold", "features", "refine", "boundary",
            "masks", "output", "domain")
DOMAIN_SECTIONS = ("features", "refine", "boundary", "masks")
"""The sections a recipe's ``[domain]`` may give again for the images the classifier is sure of."""


def model_options(*, name: str = "", checkpoint: str = "") -> None:
    """A recipe's ``[model]``: ``name``, a timm model name ("" = the embedded default); ``checkpoint``, local
    weights or a model card ("" = none)."""



def output_options(*, min_confidence: Fraction = 0.0, min_score: Fraction = 0.0, maps: bool = False,
                   overlays: bool = False) -> None:
    """A recipe's ``[output]``: ``min_confidence``, skip (and list) images whose explained class has a lower softmax
    probability; ``min_score``, leave out masks whose quality score (:mod:`segfromxai.stages.quality`, each
    annotation's ``score``) is lower; ``maps``, save every map and the fused map per image (``maps/*.npz``); ``overlays``, overlay PNGs."""


def domain_options(*, confidence: Fraction = 1.0) -> None:
    """A recipe's ``[domain]``: images whose explained class has a softmax probability of at least ``confidence``
    (required; the classifier's own domain) are labelled from the same fused map by the sub-sections
    ``[domain.features]``, ``[domain.refine]``, ``[domain.boundary]`` and ``[domain.masks]``, each a whole section as
    at the top level (one not given is the recipe's own); every other image by the recipe's own sections. With the
    top-1 class explained, that probability is the maximum softmax probability, Hendrycks & Gimpel's in-domain
    baseline (2017, "A baseline for detecting misclassified and out-of-distribution examples in neural networks",
    ICLR); with ``--labels`` it is the given class's. A batch runs only the feature forwards of the stages some of
    its images go to. A model with no classifier head has no such probability: a recipe with ``[domain]`` is refused
    there."""


# Where each section is declared (a typed keyword-only signature, see segfromxai.params) and the parameters the
# pipeline gives that function itself (not from the recipe).
DECLARED: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "model": (model_options, ()),
    "fusion": (fuse_on_grid, ("token_grid", "input_size")),
    "features": (feature_options, ()),
    "masks": (clean, ()),
    "output": (output_options, ()),
    "domain": (domain_options, ()),
}
STAGE_CONTEXT = {"threshold": (), "refine": ("size", "features"), "boundary": ()}


@dataclass(frozen=True)
class Stage:
    """A registered function chosen by name, with its resolved keyword parameters."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}


@dataclass(frozen=True)
class Domain:
    """A resolved ``[domain]``: images with the explained class's probability >= ``confidence`` are labelled by
    ``stages``, the recipe with the ``[domain]`` sub-sections in place of its own (see :func:`domain_options`)."""

    confidence: float
    stages: "Recipe"
    given: tuple[str, ...] = DOMAIN_SECTIONS
    """The sub-sections the recipe gave; the others follow the recipe's own (also when those are changed, e.g. by
    :func:`with_features`)."""

    def to_dict(self) -> dict[str, Any]:
        d = self.stages.to_dict()
        return {"confidence": self.confidence, **{k: d[k] for k in self.given}}


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
    domain: Domain | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain JSON-ready data (``None`` for unset optional values; ``domain`` only when
        the recipe has one)."""
        d = {"name": self.name, "description": self.description, "model": self.model,
             "explainers": self.explainers, "fusion": self.fusion, "threshold": self.threshold.to_dict(),
             "features": self.features, "refine": self.refine.to_dict(), "boundary": self.boundary.to_dict(),
             "masks": self.masks, "output": self.output}
        if self.domain is not None:
            d["domain"] = self.domain.to_dict()
        return json.loads(json.dumps(d))

    def stages(self) -> list["Recipe"]:
        """The recipes whose later stages (features to masks) may label an image: this one, then its ``[domain]``'s."""
        return [self] if self.domain is None else [self, self.domain.stages]

    def stages_for(self, confidence: float) -> "Recipe":
        """The recipe whose later stages label an image whose explained class has this softmax probability."""
        if self.domain is not None and confidence >= self.domain.confidence:
            return self.domain.stages
        return self

    def digest(self) -> str:
        """SHA-256 of everything that changes the annotations (not the name, description or saved artefacts)."""
        d = self.to_dict()
        d.pop("name"), d.pop("description"), d["output"].pop("maps"), d["output"].pop("overlays")
        if d["output"].get("min_score") == 0:  # recipes from before the quality score keep their digest
            d["output"].pop("min_score")
        if d["boundary"] == {"method": "none"}:  # recipes from before the boundary stage keep their digest
            d.pop("boundary")
        for refine in (d["refine"], d.get("domain", {}).get("refine", {})):
            if refine.get("retry_missed") == 0:  # nor those from before ncut's retry_missed
                refine.pop("retry_missed")
        for features in (d["features"], d.get("domain", {}).get("features", {})):
            if features.get("drop_key_bias") is False:  # nor those from before [features] drop_key_bias
                features.pop("drop_key_bias")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _fail(where: str, msg: str) -> RecipeError:
    return RecipeError(f"recipe [{where}]: {msg}")


def _section(where: str, given: Any, params: Mapping[str, Param]) -> dict[str, Any]:
    try:
        return check(given, params)
    except ValueError as e:
        raise _fail(where, str(e)) from None


def _declared_section(where: str, given: Any) -> dict[str, Any]:
    fn, context = DECLARED[where]
    return _section(where, given, declared(fn, context=context))


def _stage(where: str, given: Any, registry: Mapping[str, Any], default: str) -> Stage:
    if not isinstance(given, Mapping):
        raise _fail(where, f"expected a table, got {given!r}")
    given = dict(given)
    method = given.pop("method", default)
    if method not in registry:
        raise _fail(where, f"unknown method {method!r}; valid: {', '.join(sorted(registry))}")
    fn = registry[method].fn
    return Stage(method, _section(f"{where}] [{method}", given, declared(fn, context=STAGE_CONTEXT[where])))


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


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail("top level", f"{key} = {value!r} should be a str")
    return value


def _features(given: Any) -> dict[str, Any]:
    out = _declared_section("features", given)
    if not out["model"]:
        raise _fail("features", f"model must be one of {', '.join(FEATURE_MODELS)} or a timm model name")
    if out["drop_key_bias"] and out["feature"] != "k":
        raise _fail("features", f"drop_key_bias applies to keys (feature = \"k\"), not {out['feature']!r}")
    return out


def _domain(data: Mapping[str, Any], name: str) -> Domain | None:
    given = data.get("domain")
    if given is None:
        return None
    if not isinstance(given, Mapping):
        raise _fail("domain", f"should be a table, got {given!r}")
    unknown = sorted(set(given) - {"confidence", *DOMAIN_SECTIONS})
    if unknown:
        raise _fail("domain", f"unknown key {', '.join(map(repr, unknown))}; valid: confidence, "
                    f"{', '.join(DOMAIN_SECTIONS)}")
    if "confidence" not in given:
        raise _fail("domain", "needs confidence: the softmax probability from which an image counts as the "
                    "classifier's own domain")
    confidence = _declared_section("domain", {"confidence": given["confidence"]})["confidence"]
    sub = {**{k: v for k, v in data.items() if k != "domain"}, **{k: given[k] for k in DOMAIN_SECTIONS if k in given}}
    try:
        stages = parse_recipe(sub, name=name)
    except RecipeError as e:
        raise _fail("domain", str(e).removeprefix("recipe ")) from None
    return Domain(confidence=confidence, stages=stages, given=tuple(k for k in DOMAIN_SECTIONS if k in given))


def parse_recipe(data: Mapping[str, Any], *, name: str = "recipe") -> Recipe:
    """Validate and resolve recipe data (as read from TOML) into a :class:`Recipe`.

    Every value is checked against its declaration (type, choices, range, finite), before any model is loaded.
    """
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise _fail("top level", f"unknown key {', '.join(map(repr, unknown))}; valid: {', '.join(SECTIONS)}")
    explainers = _explainers(data.get("explainers"))
    fusion = _declared_section("fusion", data.get("fusion", {}))
    if set(fusion["weights"]) - set(explainers):
        raise _fail("fusion", f"weights must be non-negative numbers for the recipe's explainers "
                    f"({', '.join(explainers)}), got {fusion['weights']}")
    return Recipe(
        name=_text("name", data.get("name", name)),
        description=_text("description", data.get("description", "")),
        model=_declared_section("model", data.get("model", {})),
        explainers=explainers,
        fusion=fusion,
        threshold=_stage("threshold", data.get("threshold", {}), THRESHOLDS, "otsu"),
        features=_features(data.get("features", {})),
        refine=_stage("refine", data.get("refine", {}), REFINERS, "none"),
        boundary=_stage("boundary", data.get("boundary", {}), BOUNDARIES, "none"),
        masks=_declared_section("masks", data.get("masks", {})),
        output=_declared_section("output", data.get("output", {})),
        domain=_domain(data, name),
    )


def with_output(recipe: Recipe, **changes: Any) -> Recipe:
    """``recipe`` with some ``output`` options replaced (``None`` values leave an option as it is), re-validated."""
    output = {**recipe.output, **{k: v for k, v in changes.items() if v is not None}}
    data = recipe.to_dict()
    data["output"] = output
    return parse_recipe(data, name=recipe.name)


def with_features(recipe: Recipe, **changes: Any) -> Recipe:
    """``recipe`` with some ``[features]`` keys replaced (``None`` values leave a key as it is), re-validated."""
    data = recipe.to_dict()
    data["features"] = {**recipe.features, **{k: v for k, v in changes.items() if v is not None}}
    return parse_recipe(data, name=recipe.name)


def recipes_dir() -> Path:
    """The ``recipes/`` folder shipped beside the package (in a source checkout or an editable install)."""
    return Path(__file__).resolve().parents[2] / "recipes"


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
