import itertools
import json

import pytest

from segfromxai.explainers import EXPLAINERS
from segfromxai.recipe.recipe import RecipeError, load_recipe, parse_recipe, recipes_dir, with_output
from segfromxai.stages.refine import REFINERS
from segfromxai.stages.threshold import THRESHOLDS

SHIPPED = sorted(recipes_dir().rglob("*.toml"))


def base(**over):
    data = {"explainers": {"gradcam": {}}}
    data.update(over)
    return data


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(recipes_dir()).as_posix())
def test_every_shipped_recipe_loads_and_round_trips(path):
    r = load_recipe(path)
    again = parse_recipe(json.loads(json.dumps(r.to_dict())), name=r.name)
    assert again == r and again.digest() == r.digest()


def test_shipped_recipes_include_default_tokencut_and_the_vitmix_grid():
    names = {p.relative_to(recipes_dir()).with_suffix("").as_posix() for p in SHIPPED}
    assert {"default", "tokencut"} <= names
    methods = ("gradcam", "lrp", "saliency", "rollout")
    combos = {frozenset(c) for k in (1, 2, 3) for c in itertools.combinations(methods, k)}
    grid = {frozenset(load_recipe(p).explainers) for p in SHIPPED if p.parent.name == "vitmix"}
    assert grid == combos and len(combos) == 14
    for p in SHIPPED:
        if p.parent.name == "vitmix":
            r = load_recipe(p)
            assert (r.fusion["method"], r.threshold.method, r.refine.method) == ("geometric", "otsu", "none")


def test_a_bare_name_finds_a_shipped_recipe_and_a_miss_lists_them():
    assert load_recipe("default").name == "default"
    assert load_recipe("vitmix/gradcam+lrp").explainers.keys() == {"gradcam", "lrp"}
    with pytest.raises(FileNotFoundError, match="shipped recipes: .*default"):
        load_recipe("defualt")


def test_defaults_are_filled_in():
    r = parse_recipe(base())
    assert r.explainers["gradcam"] == EXPLAINERS["gradcam"].defaults
    assert r.fusion["method"] == "geometric" and r.threshold.method == "otsu" and r.refine.method == "none"
    assert parse_recipe(base(threshold={"method": "percentile"})).threshold.params == {"q": 20.0}


@pytest.mark.parametrize("data, match", [
    (base(fusoin={}), r"unknown key 'fusoin'; valid: name, description, model, explainers"),
    ({}, r"at least one explainer.*valid: .*gradcam"),
    (base(explainers={"gradcm": {}}), r"unknown explainer 'gradcm'; valid: .*gradcam"),
    (base(explainers={"gradcam": {"layr": "x"}}), r"explainer 'gradcam': unknown key 'layr'; valid: layer"),
    (base(explainers={"rollout": {"head_fusion": "median"}}), r"head_fusion = 'median' is not one of 'mean', 'max', 'min'"),
    (base(fusion={"method": "median"}), r"method = 'median' is not one of 'geometric', 'product', 'mean'"),
    (base(fusion={"grid": "pixels"}), r"grid = 'pixels' is not one of 'tokens', 'input'"),
    (base(fusion={"eps": "small"}), r"eps = 'small' should be a float"),
    (base(fusion={"weights": {"lrp": 2.0}}), r"weights must be .* for the recipe's explainers"),
    (base(fusion={"clip": 120}), r"clip = 120 must lie in \(0, 100\]"),
    (base(threshold={"method": "otsuu"}), r"unknown method 'otsuu'; valid: " + ", ".join(sorted(THRESHOLDS))),
    (base(threshold={"method": "percentile", "p": 3}), r"unknown key 'p'; valid: q"),
    (base(threshold={"method": "otsu", "q": 3}), r"unknown key 'q'; valid: $"),
    (base(refine={"method": "cut"}), r"unknown method 'cut'; valid: " + ", ".join(sorted(REFINERS))),
    (base(features={"feature": "x"}), r"feature = 'x' is not one of 'k'"),
    (base(refine={"method": "ncut", "tau": "high"}), r"tau = 'high' should be a float"),
    (base(masks={"fill_holes": 1}), r"fill_holes = 1 should be a bool"),
    (base(masks={"keep": "biggest"}), r"keep = 'biggest' is not one of 'all', 'largest'"),
    (base(output={"min_confidence": 2}), r"\[output\]: min_confidence = 2 must lie in \[0, 1\]"),
    (base(model={"weights": "x"}), r"unknown key 'weights'; valid: checkpoint, name"),
])
def test_bad_recipes_name_the_valid_choices(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data)


def test_toml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[explainers.gradcam\n")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(p)
    p.write_text("[explainers.gradcam]\n[refine]\nmethod = 'ncutt'\n")
    with pytest.raises(RecipeError, match=r"bad.toml: recipe \[refine\]: unknown method 'ncutt'"):
        load_recipe(p)


def test_digest_ignores_name_and_artefacts_but_not_masks():
    r = parse_recipe(base())
    assert parse_recipe(base(name="other", description="x")).digest() == r.digest()
    assert with_output(r, maps=True, overlays=True).digest() == r.digest()
    assert with_output(r, min_confidence=0.5).digest() != r.digest()
    assert parse_recipe(base(threshold={"method": "mean"})).digest() != r.digest()
    assert with_output(r, min_confidence=None) == r


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("data, match", [  # the values issue 20 found checked only at run time, or never
    (base(threshold={"method": "percentile", "q": 150}), r"\[threshold\] \[percentile\]: q = 150 must lie in \(0, 100\]"),
    (base(threshold={"method": "percentile", "q": NAN}), r"q = nan should be a finite number"),
    (base(threshold={"method": "fixed", "t": -1}), r"t = -1 must lie in \[0, 1\]"),
    (base(threshold={"method": "fixed", "t": NAN}), r"t = nan should be a finite number"),
    (base(masks={"min_area": -0.1}), r"\[masks\]: min_area = -0.1 must lie in \[0, 1\]"),
    (base(masks={"min_area": 1e308}), r"min_area = 1e\+308 must lie in \[0, 1\]"),
    (base(masks={"min_area": NAN}), r"min_area = nan should be a finite number"),
    (base(masks={"max_hole": -1}), r"max_hole = -1 must lie in \[0, 1\]"),
    (base(refine={"method": "ncut", "eps": -1e-5}), r"eps = -1e-05 must lie in \(0, 1\)"),
    (base(refine={"method": "ncut", "eps": NAN}), r"eps = nan should be a finite number"),
    (base(refine={"method": "ncut", "tau": -1}), r"tau = -1 must lie in \(-1, inf\)"),
    (base(refine={"method": "ncut", "tau": NAN}), r"tau = nan should be a finite number"),
    (base(refine={"method": "ncut", "instances": 0}), r"instances = 0 must lie in \[1, inf\)"),
    (base(refine={"method": "ncut", "instances": 1.5}), r"instances = 1.5 should be a int"),
    (base(fusion={"weights": {"gradcam": NAN}}), r"weights\[...\] = nan should be a finite number"),
    (base(fusion={"weights": {"gradcam": -1}}), r"weights\[...\] = -1 must lie in \[0, inf\)"),
    (base(fusion={"eps": INF}), r"eps = inf should be a finite number"),
    (base(explainers={"gradcam": {"layer": 5}}), r"explainer 'gradcam': layer = 5 should be a str"),
    (base(explainers={"rollout": {"discard_ratio": 1.0}}), r"discard_ratio = 1.0 must lie in \[0, 1\)"),
    (base(features={"block": "last"}), r"\[features\]: block = 'last' should be a int"),
    (base(output={"min_confidence": NAN}), r"min_confidence = nan should be a finite number"),
])
def test_recipe_values_are_validated_when_the_recipe_is_read(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data)


def test_every_section_is_declared_by_one_signature():
    """Defaults come from the declaring functions; an explainer's defaults and choices from its declaration."""
    import inspect

    from segfromxai.ops.masks import clean
    from segfromxai.params import declared
    from segfromxai.recipe.recipe import DECLARED

    r = parse_recipe(base())
    for section, (fn, context) in DECLARED.items():
        if section == "domain":  # a table of whole sections; absent, no image is labelled another way
            assert r.domain is None and "domain" not in r.to_dict()
            continue
        assert getattr(r, section) == {k: p.default for k, p in declared(fn, context=context).items()}, section
    assert r.masks["min_area"] == inspect.signature(clean).parameters["min_area"].default
    assert EXPLAINERS["rollout"].choices == {"head_fusion": ("mean", "max", "min")}
    assert EXPLAINERS["abslrp"].defaults["layernorm"] == "detach" and EXPLAINERS["lrp_epsilon"].defaults[
        "attention"] == "constant"


def test_domain_section_gives_whole_sections_for_confident_images():
    """``[domain]``: a confidence and whole sections (features, refine, boundary, masks) for the images the
    classifier is sure of; the rest of the recipe is shared; it round-trips and enters the digest."""
    data = {**base(), "refine": {"method": "ncut", "tau": 0.4},
            "domain": {"confidence": 0.9, "refine": {"method": "none"}, "boundary": {"method": "guided"}}}
    r = parse_recipe(data, name="d")
    s = r.domain.stages
    assert r.domain.confidence == 0.9 and s.refine.method == "none" and s.boundary.method == "guided"
    assert s.features == r.features and s.masks == r.masks and s.explainers == r.explainers and s.domain is None
    assert r.stages_for(0.95) is s and r.stages_for(0.5) is r and r.stages() == [r, s]
    assert parse_recipe(r.to_dict(), name="d") == r
    assert r.digest() != parse_recipe({k: v for k, v in data.items() if k != "domain"}, name="d").digest()
    with pytest.raises(RecipeError, match=r"\[domain\]: needs confidence"):
        parse_recipe({**base(), "domain": {"refine": {"method": "none"}}})
    with pytest.raises(RecipeError, match=r"\[domain\]: unknown key 'fusion'; valid: confidence, features"):
        parse_recipe({**base(), "domain": {"confidence": 0.5, "fusion": {}}})
    with pytest.raises(RecipeError, match=r"\[domain\].*refine"):
        parse_recipe({**base(), "domain": {"confidence": 0.5, "refine": {"method": "nope"}}})
    with pytest.raises(RecipeError, match="confidence"):
        parse_recipe({**base(), "domain": {"confidence": 1.5}})


def test_domain_sections_not_given_follow_the_recipes_own_and_old_digests_hold():
    """A ``[domain]`` that gives no ``[domain.features]`` uses the recipe's features, also after ``with_features``
    changes them; one that gives its own keeps them. A recipe without ``retry_missed`` keeps the digest it had
    before ncut had that parameter (so a run started then resumes): ``default-synth`` is the former ``default``."""
    from segfromxai.recipe.recipe import with_features, with_output

    follows = parse_recipe({**base(), "refine": {"method": "ncut"}, "domain": {"confidence": 0.5,
                                                                              "refine": {"method": "none"}}})
    changed = with_features(follows, model="classifier", img_size=392)
    assert changed.domain.stages.features == changed.features and changed.features["img_size"] == 392
    assert "features" not in changed.to_dict()["domain"] and changed.domain.stages.refine.method == "none"
    default = load_recipe("default")
    moved = with_features(default, img_size=448)
    assert moved.features["img_size"] == 448 and moved.domain.stages.features == default.domain.stages.features
    kept = with_output(default, min_confidence=0.2)
    assert kept.domain.to_dict() == default.domain.to_dict() and kept.domain.stages.output["min_confidence"] == 0.2
    assert load_recipe("default-synth").digest() == "ba2abc4ad0c7445fd60fa91cdbeae7e028c9d75ae59272087fd097d729253588"
    # tokencut changed on purpose (drop_key_bias = true, issue 31); its old digest was a72964e9...
    assert load_recipe("tokencut").digest() == "59a033c126f4b965d25235db5faabb200d656822e1a7d1c164442872d5812e25"
