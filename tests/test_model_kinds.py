"""Recipes on every model kind (ViT with a head, CNN, headless ViT): each runs to a COCO file or fails before any
image is read, naming the cause (issue 18 item 2)."""

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from pycocotools.coco import COCO
from safetensors.torch import save_file

from segfromxai.cli import main
from segfromxai.run.local import run
from segfromxai.explainers import EXPLAINERS
from segfromxai.recipe.checks import check_recipes_for_model, is_headless, model_kind, recipe_misfit
from segfromxai.models.model import load_model
from segfromxai.recipe.recipe import load_recipe, parse_recipe, recipes_dir, with_features
from segfromxai.run.targets import Targets


@pytest.fixture(scope="module")
def headless_ckpt(tmp_path_factory):
    """A tiny random ViT with no head (num_classes=0), saved as the port script saves the ViT-S/14."""
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 0}
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    path = tmp_path_factory.mktemp("headless") / "vit.safetensors"
    save_file(m.state_dict(), str(path), metadata={"timm_name": "vit_tiny_patch16_224", "timm_kwargs": json.dumps(kw)})
    return path


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = timm.create_model("test_efficientnet", pretrained=False, num_classes=8).eval()
    path = tmp_path_factory.mktemp("cnn") / "cnn.safetensors"
    save_file(m.state_dict(), str(path), metadata={"timm_name": "test_efficientnet",
                                                    "timm_kwargs": json.dumps({"num_classes": 8})})
    return path


def _models(tiny_card, headless_ckpt, cnn_ckpt):
    return {"vit": load_model(checkpoint=tiny_card), "cnn": load_model(checkpoint=cnn_ckpt),
            "headless vit": load_model(checkpoint=headless_ckpt)}


def test_kinds_and_the_fit_of_every_explainer(tiny_card, headless_ckpt, cnn_ckpt):
    models = _models(tiny_card, headless_ckpt, cnn_ckpt)
    assert {k: model_kind(m.module) for k, m in models.items()} == {k: k for k in models}
    assert is_headless(models["headless vit"].module) and models["headless vit"].classes == []
    for name, e in EXPLAINERS.items():
        r = parse_recipe({"explainers": {name: {}}}, name=name)
        assert (recipe_misfit(r, models["cnn"].module) is None) == (not e.vit_only)
        assert (recipe_misfit(r, models["headless vit"].module) is None) == (not e.needs_class)
        assert recipe_misfit(r, models["vit"].module) is None
    msg = recipe_misfit(load_recipe("default"), models["headless vit"].module)
    assert "no classifier head" in msg and "gradcam, lrp" in msg
    assert recipe_misfit(load_recipe("default-cnn"), models["cnn"].module) is None
    assert "lrp need a Vision Transformer" in recipe_misfit(load_recipe("default"), models["cnn"].module)
    assert "default-cnn" in recipe_misfit(load_recipe("default"), models["cnn"].module)
    # a [domain] needs the explained class's probability, which a headless model does not give
    cut = {"explainers": {"rollout": {}}, "refine": {"method": "ncut", "foreground": "eigvec"}}
    domain = parse_recipe({**cut, "domain": {"confidence": 0.5, "refine": {"method": "none"}}}, name="d")
    assert "[domain]" in recipe_misfit(domain, models["headless vit"].module)
    assert recipe_misfit(parse_recipe(cut, name="c"), models["headless vit"].module) is None
    assert recipe_misfit(domain, models["vit"].module) is None


TOP = [p.stem for p in sorted(recipes_dir().glob("*.toml"))]


@pytest.mark.parametrize("kind", ["vit", "cnn", "headless vit"])
@pytest.mark.parametrize("name", TOP)
def test_every_top_level_recipe_runs_or_fails_before_reading_images(tmp_path, synth_images, tiny_card,
                                                                    headless_ckpt, cnn_ckpt, kind, name,
                                                                    monkeypatch):
    model = _models(tiny_card, headless_ckpt, cnn_ckpt)[kind]
    recipe = with_features(load_recipe(name), checkpoint=str(tiny_card)) if kind == "cnn" else load_recipe(name)
    misfit = recipe_misfit(recipe, model.module)
    out = tmp_path / "out"
    if misfit is not None:
        import segfromxai.run.local as engine

        monkeypatch.setattr(engine, "load_image", lambda p: pytest.fail("an image was read"))
        with pytest.raises(ValueError, match="recipe"):
            run(recipe, synth_images / "images", out, model=model, limit=2)
        assert not out.exists()
        return
    summary = run(recipe, synth_images / "images", out, model=model, limit=2, batch_size=2)
    assert summary["counts"]["found"] == 2
    coco = COCO(str(out / "pseudo_labels.json"))
    if kind == "headless vit":
        assert [c["name"] for c in coco.dataset["categories"]] == ["object"]
    assert {a["category_id"] for a in coco.dataset["annotations"]} <= set(coco.getCatIds())


def test_headless_masks_take_the_class_named_by_the_labels(tmp_path, synth_images, headless_ckpt):
    model = load_model(checkpoint=headless_ckpt)
    labels = {"000000.png": "star", "000001.png": "ring"}
    run(load_recipe("tokencut"), synth_images / "images", tmp_path, model=model, limit=2,
        targets=Targets("labels", labels))
    coco = json.loads((tmp_path / "pseudo_labels.json").read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(cats.values()) == ["ring", "star"]
    by_image = {i["id"]: i["file_name"] for i in coco["images"]}
    for a in coco["annotations"]:
        assert cats[a["category_id"]] == labels[by_image[a["image_id"]]]
        assert a["attributes"]["confidence"] == 1.0


def test_cli_on_a_headless_model(tmp_path, synth_images, headless_ckpt):
    common = ["--images", str(synth_images / "images"), "--checkpoint", str(headless_ckpt), "--limit", "2"]
    r = CliRunner().invoke(main, ["run", "default", "--out", str(tmp_path / "d"), *common])
    assert r.exit_code != 0 and "no classifier head" in r.output and not (tmp_path / "d").exists()
    r = CliRunner().invoke(main, ["classify", *common[:4]])
    assert r.exit_code != 0 and "no classifier head" in r.output
    r = CliRunner().invoke(main, ["run", "tokencut", "--out", str(tmp_path / "t"), *common])
    assert r.exit_code == 0, r.output
    assert check_recipes_for_model(load_model(checkpoint=headless_ckpt), [load_recipe("tokencut")]) is None
