"""The perturbation explainers (R-Cut, MoXI, feature coalitions) run from recipes, on the embedded model and on a
tiny random ViT, and are fused like any other map. Their maths is tested in test_rcut/test_moxi/test_coalition."""

import json
import shutil

import numpy as np
import pytest

from segfromxai.explainers import PERTURBATION_EXPLAINERS
from segfromxai.models.model import data_dir, load_model
from segfromxai.run.local import run
from segfromxai.recipe.recipe import load_recipes, parse_recipe

# small settings so that a CI run stays short; the shipped recipes (recipes/perturbation) use the papers' values
CHEAP = {
    "rcut": {"weights": "topk", "k": 4},
    "moxi_insertion": {"mode": "tokens", "max_steps": 3},
    "moxi_deletion": {"mode": "pixels", "patch": 49, "max_steps": 2},
    "coalition": {"steps": 3, "cluster_steps": 5},
}
CHEAP_TINY = {**CHEAP, "moxi_deletion": {"mode": "tokens", "max_steps": 2}}


def test_every_perturbation_explainer_is_covered_and_the_shipped_recipes_parse():
    assert set(CHEAP) == set(PERTURBATION_EXPLAINERS)
    shipped = load_recipes(["perturbation"])
    assert {n for r in shipped for n in r.explainers} == set(PERTURBATION_EXPLAINERS) | {"gradcam"}


def _recipe(name, params, **output):
    return parse_recipe({"explainers": {"gradcam": {}, name: params}, "fusion": {"grid": "input"},
                         "refine": {"method": "none"}, "output": output}, name=f"gradcam+{name}")


@pytest.fixture(scope="module")
def two_samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    for p in sorted((data_dir() / "samples" / "images").iterdir())[:2]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def embedded():
    return load_model()


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_runs_from_a_recipe_on_the_embedded_model(tmp_path, two_samples, embedded, name):
    summary = run(_recipe(name, CHEAP[name]), two_samples, tmp_path, model=embedded, batch_size=2)
    counts = summary["counts"]
    assert counts["found"] == 2 and counts["labelled"] + counts["no_mask"] == 2 and counts["labelled"] >= 1
    saved = json.loads((tmp_path / "run.json").read_text())["recipe"]["explainers"]
    assert saved[name] == PERTURBATION_EXPLAINERS[name].resolve(name, CHEAP[name])
    coco = json.loads((tmp_path / "pseudo_labels.json").read_text())
    assert len(coco["images"]) == counts["labelled"] and len(coco["annotations"]) == counts["annotations"]
    for a in coco["annotations"]:
        assert a["area"] > 0 and 0 <= a["score"] <= 1


@pytest.mark.parametrize("name", sorted(CHEAP_TINY))
def test_runs_from_a_recipe_on_a_tiny_random_vit_with_maps(tmp_path, synth_images, tiny_card, name):
    model = load_model(checkpoint=tiny_card)
    run(_recipe(name, CHEAP_TINY[name], maps=True), synth_images / "images", tmp_path, model=model, batch_size=4,
        limit=4)
    files = sorted((tmp_path / "maps").glob("*.npz"))
    assert len(files) == 4
    with np.load(files[0]) as z:
        m = z[f"map_{name}"]
        assert "fused" in z.files and np.isfinite(m).all() and (m >= 0).all() and m.max() > 0
        assert 0 <= z["fused"].min() and z["fused"].max() <= 1


def test_ncut_reads_the_shared_pass_tokens_not_a_perturbed_forward(tmp_path, synth_images, tiny_card):
    """MoXI's token-dropping forwards come after the shared pass; ncut must get the full token grid of the latter."""
    model = load_model(checkpoint=tiny_card)
    recipe = parse_recipe({"explainers": {"gradcam": {}, "moxi_insertion": {"max_steps": 2}},
                           "refine": {"method": "ncut"}}, name="moxi-ncut")
    summary = run(recipe, synth_images / "images", tmp_path, model=model, batch_size=4, limit=4)
    assert summary["counts"]["found"] == 4 and summary["counts"]["failed"] == 0
