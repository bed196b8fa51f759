"""`compare`: shared explain calls, the same masks as `run`, the table and its files."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from segfromxai.cli import main
from segfromxai.quality.compare import COLUMNS, compare
from segfromxai.quality.paired import paired_bootstrap, paired_rows, subset_of, subset_rows
from segfromxai.run.pipeline import explain_calls
from segfromxai.quality.evaluate import evaluate
from segfromxai.explainers import explain_with_logits
from segfromxai.quality.gae import gae
from segfromxai.io.images import find_images, load_image
from segfromxai.models.model import load_model
from segfromxai.run.local import run
from segfromxai.run.pipeline import fuse_recipe
from segfromxai.recipe.recipe import load_recipe, load_recipes, parse_recipe


def test_explainers_are_grouped_into_as_few_calls_as_their_parameters_allow():
    a = parse_recipe({"explainers": {"gradcam": {}, "lrp": {}}}, name="a")
    b = parse_recipe({"explainers": {"lrp": {}, "rollout": {}}}, name="b")
    c = parse_recipe({"explainers": {"rollout": {"head_fusion": "max"}}}, name="c")
    calls = explain_calls([a, b, c])
    assert [sorted(call) for call in calls] == [["gradcam", "lrp", "rollout"], ["rollout"]]
    assert calls[1]["rollout"]["head_fusion"] == "max" and calls[0]["rollout"]["head_fusion"] == "mean"


def test_recipe_folders_expand_and_names_must_be_unique():
    grid = load_recipes(["vitmix"])
    assert len(grid) == 14 and len({r.name for r in grid}) == 14
    with pytest.raises(ValueError, match="two recipes are named"):
        load_recipes(["default", "default"])


def test_compare_scores_each_recipe_as_run_and_evaluate_do(tmp_path, synth_images, tiny_card):
    model = load_model(checkpoint=tiny_card)
    recipes = [load_recipe("default"), load_recipe("vitmix/lrp"), load_recipe("vitmix/lrp+rollout")]
    res = compare(recipes, synth_images / "images", synth_images / "annotations.json", model=model, batch_size=5,
                  deletion_steps=4, gae_images=0)
    assert res["n_images"] == 12 and res["settings"]["explain_calls"] == 1
    rows = {r["recipe"]: r for r in res["rows"]}
    assert [r["k"] for r in res["rows"]] == sorted(r["k"] for r in res["rows"])
    for r in res["rows"]:
        assert set(r) == set(COLUMNS) and r["images"] == 12 and r["s_per_image"] > 0
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["pa"] <= 1
        assert r["forwards_per_image"] == 1.0  # gradient and LRP methods: the one shared pass, counted
    for recipe in recipes:  # the same masks as a labelling run of that recipe alone
        out = tmp_path / recipe.name
        run(recipe, synth_images / "images", out, model=model, batch_size=5)
        ev = evaluate(out / "pseudo_labels.json", synth_images / "annotations.json")
        assert rows[recipe.name]["iou"] == pytest.approx(ev["iou"]["per_image_mean"], nan_ok=True)
        assert rows[recipe.name]["pa"] == pytest.approx(ev["pixel_accuracy"]["per_image_mean"])


def test_gae_column_is_gae_of_the_fused_map_and_perturbation_forwards_are_counted(synth_images, tiny_card):
    model = load_model(checkpoint=tiny_card)
    recipes = [load_recipe("default"),
               parse_recipe({"explainers": {"rcut": {"weights": "topk", "k": 2}}}, name="rcut-top2")]
    res = compare(recipes, synth_images / "images", synth_images / "annotations.json", model=model, batch_size=5,
                  deletion_steps=2, gae_images=7, gae_steps=3, limit=10)
    rows = {r["recipe"]: r for r in res["rows"]}
    # R-Out top-k: the shared pass, k masked copies per image and one baseline image per batch of 5
    assert rows["rcut-top2"]["forwards_per_image"] == pytest.approx(1 + 2 + 1 / 5)
    assert rows["default"]["forwards_per_image"] == 1.0
    paths = find_images(synth_images / "images")[:10]
    x = model.preprocess.batch([load_image(p) for p in paths])
    for recipe in recipes:  # GAE on images 0-4 (first batch) and 5-6 (second batch), each batch its own negatives
        def fused(images, t, recipe=recipe):
            return torch.from_numpy(fuse_recipe(model, recipe, explain_with_logits(model, images,
                                                                                  dict(recipe.explainers), t)[0]))
        scores = []
        for part in (x[:5], x[5:7]):
            cls = model.module(part).argmax(1)
            scores += list(gae(model.module, fused, part, cls, steps=3, batch_size=len(part))["gae"])
        scores = np.array(scores)
        assert rows[recipe.name]["gae_images"] == np.isfinite(scores).sum() > 0
        assert rows[recipe.name]["gae"] == pytest.approx(np.nanmean(scores), abs=1e-6)


def test_compare_command_prints_and_writes_the_table(tmp_path, synth_images, tiny_card):
    gt = json.loads((synth_images / "annotations.json").read_text())
    for im in gt["images"]:  # two subsets by the ground truth's image entries
        im["subset"] = "odd" if im["id"] % 2 else "even"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compare", "vitmix/saliency", "vitmix/rollout", "--images",
                                  str(synth_images / "images"), "--gt", str(tmp_path / "gt.json"),
                                  "--checkpoint", str(tiny_card), "--limit", "4", "--deletion-steps", "2",
                                  "--gae-steps", "2", "--resamples", "300",
                                  "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "vitmix-saliency" in r.output and "del.AUC" in r.output and "GAE" in r.output
    assert "against vitmix-saliency" in r.output and "300 resamples, seed 0" in r.output
    doc = json.loads((out / "compare.json").read_text())
    assert len(doc["rows"]) == 2 and doc["n_images"] == 4 and doc["settings"]["resamples"] == 300
    assert (out / "compare.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    iou = {(row["recipe"], row["file_name"]): row["iou"] for row in doc["per_image"]}
    files = sorted({f for _, f in iou})
    a = [np.nan if iou["vitmix-saliency", f] is None else iou["vitmix-saliency", f] for f in files]
    b = [np.nan if iou["vitmix-rollout", f] is None else iou["vitmix-rollout", f] for f in files]
    (row,) = doc["paired"]  # the second recipe against the first one given
    expect = paired_bootstrap(a, b, resamples=300, seed=0)
    assert row["recipe"] == "vitmix-rollout" and row["baseline"] == "vitmix-saliency"
    assert [row[k] for k in ("mean_diff", "lo", "hi")] == pytest.approx(list(expect[:3]))
    assert (row["better"], row["worse"]) == expect[3:]
    subsets = {s["subset"]: s for s in doc["subsets"]}
    assert set(subsets) == {"odd", "even", "all"} and subsets["all"]["images"] == 4
    assert subsets["odd"]["images"] + subsets["even"]["images"] == 4
    assert {row["subset"] for row in doc["per_image"]} == {"odd", "even"}
    assert (out / "paired.csv").exists() and (out / "subsets.csv").read_text().startswith("subset,images,")
    assert "mean IoU per subset" in r.output and "even" in r.output
    bad = CliRunner().invoke(main, ["compare", "nope", "--images", str(synth_images / "images"), "--gt",
                                    str(synth_images / "annotations.json")])
    assert bad.exit_code != 0 and "shipped recipes" in bad.output


def test_compare_and_run_give_the_same_masks_for_labels_targets(tmp_path, synth_images, tiny_card):
    """compare labels through pipeline.label_batch as run does: same explained class from --labels, same masks,
    same min_confidence skips (per image, not just in the mean)."""
    from pycocotools import mask as mask_utils

    from segfromxai.quality.evaluate import load_source, union
    from segfromxai.quality.metrics import METRICS, confusion
    from segfromxai.run.targets import Targets

    model = load_model(checkpoint=tiny_card)
    labels = tmp_path / "labels.csv"  # every image explained for "ring", which is rarely the tiny model's top-1
    rels = [p.name for p in find_images(synth_images / "images")]
    labels.write_text("file_name,label\n" + "".join(f"{r},ring\n" for r in rels[:-2]))
    targets = Targets("labels", {r: "ring" for r in rels[:-2]})
    recipe = parse_recipe({**load_recipe("default").to_dict(), "output": {"min_confidence": 0.13}}, name="d")
    res = compare([recipe], synth_images / "images", synth_images / "annotations.json", model=model, batch_size=5,
                  deletion_steps=2, gae_images=0, targets=targets)
    assert {f["file_name"] for f in res["failures"]} == set(rels[-2:])  # no label: skipped and listed
    out = tmp_path / "run"
    summary = run(recipe, synth_images / "images", out, model=model, batch_size=5, targets=targets)
    coco = json.loads((out / "pseudo_labels.json").read_text())
    assert {a["category_id"] for a in coco["annotations"]} <= {1 + model.classes.index("ring")}
    ref = load_source(synth_images / "annotations.json")
    ids = {im["file_name"]: im["id"] for im in coco["images"]}
    got = {row["file_name"]: row["iou"] for row in res["per_image"]}
    assert set(got) == set(rels[:-2]) and summary["counts"]["skipped"] >= 2
    for rel in rels[:-2]:
        gm, ignore, size = ref.masks(rel)
        pred = np.zeros(size, bool)
        for a in coco["annotations"]:
            if a["image_id"] == ids.get(rel):
                pred |= mask_utils.decode(a["segmentation"]).astype(bool)
        expected = METRICS["iou"].from_counts(*confusion(pred, union(gm, size), ignore))
        assert got[rel] == pytest.approx(expected, nan_ok=True), rel


def test_subset_is_the_subset_field_else_the_file_name_prefix():
    assert subset_of("dev/grabcut_153093.jpg", {"subset": "grabcut", "source": "GrabCut (via RITM)"}) == "grabcut"
    assert subset_of("grabcut_153093.jpg", {"source": "GrabCut (via RITM)"}) == "grabcut"  # a source is provenance
    assert subset_of("images/davis345_044_car-turn.jpg", {"subset": ""}) == "davis345"
    assert subset_of("quokka.jpg") == "" and subset_of("000042.png", {}) == ""  # no subset: counted in "all" only


def test_paired_rows_compare_every_recipe_with_the_first_and_leave_out_undefined_images():
    rows = [{"file_name": f, "recipe": r, "subset": f[0], "iou": v} for r, f, v in [
        ("base", "a1", 0.5), ("base", "a2", 0.6), ("base", "b1", float("nan")), ("base", "b2", 0.2),
        ("new", "a1", 0.9), ("new", "a2", 0.6), ("new", "b1", 0.7), ("new", "b2", 0.0),
        ("old", "a1", 0.4)]]
    new, old = paired_rows(rows, ["base", "new", "old"], resamples=200)
    assert new["n"] == 3 and new["mean_diff"] == pytest.approx((0.4 + 0 - 0.2) / 3)  # b1: base undefined
    assert (new["better"], new["worse"]) == (1, 1) and new["baseline"] == "base"
    assert old["n"] == 1 and old["lo"] == old["hi"] == pytest.approx(-0.1)  # old scored a1 only
    by = {s["subset"]: s for s in subset_rows(rows, ["base", "new"])}
    assert by["a"]["images"] == 2 and by["a"]["new"] == pytest.approx(0.75)
    assert by["b"]["base"] == pytest.approx(0.2) and by["all"]["images"] == 4  # NaN left out of the mean
