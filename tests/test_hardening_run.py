"""Regression tests of issue 33 (hardening, round 3) for ``run``: cases 3, 5, 6, 7, 9b, 9c, 11 and 12. Each test is
named after the case it pins down."""

import errno
import json

import pytest

from segfromxai.recipe.recipe import RecipeError, parse_recipe
from conftest import error_line, invoke


def _recipe(**sections):
    return {"explainers": {"gradcam": {}}, **sections}


# ------------------------------------------------------------------------------------------------ case 6
@pytest.mark.parametrize("method, key, value", [
    ("grabcut", "iterations", -5), ("grabcut", "far", 0.7), ("grabcut", "work_side", -1), ("grabcut", "pad", -0.1),
    ("grabcut", "init_stride", 0), ("guided", "radius", 0), ("guided", "eps", -1.0), ("crf", "bias", 0.5),
    ("crf", "floor", 0.0), ("crf", "iterations", 0), ("crf", "spatial", 0), ("checked", "min_iou", 1.5),
    ("checked", "far", -0.1)])
def test_boundary_ranges_are_checked_when_the_recipe_loads_naming_section_and_key(method, key, value):
    with pytest.raises(RecipeError, match=rf"\[boundary\] \[{method}\].*{key} = "):
        parse_recipe(_recipe(boundary={"method": method, key: value}))
    with pytest.raises(RecipeError, match=rf"\[domain\].*\[boundary\] \[{method}\].*{key} = "):
        parse_recipe(_recipe(domain={"confidence": 0.9, "boundary": {"method": method, key: value}}))


# ------------------------------------------------------------------------------------------------ case 3
@pytest.mark.parametrize("inside", [".", "out", "sub/out"])
def test_out_inside_images_is_refused_by_run_before_anything_is_written(tmp_path, images, tiny_card, inside):
    before = sorted(p.relative_to(images) for p in images.rglob("*"))
    out = images / inside
    line = error_line(invoke("run", "default-fast", "--images", images, "--out", out, "--checkpoint", tiny_card))
    assert "--out" in line and "--images" in line and "inside" in line
    assert sorted(p.relative_to(images) for p in images.rglob("*")) == before


def test_out_inside_images_is_refused_by_student_and_student_predict(tmp_path, images):
    out = images / "student"
    line = error_line(invoke("student", "--train", tmp_path, "--images", images, "--out", out))
    assert "--out" in line and "--images" in line
    line = error_line(invoke("student", "predict", "--student", tmp_path, "--images", images, "--out", out))
    assert "--out" in line and "--images" in line
    assert not out.exists()


def test_out_beside_images_with_a_shared_prefix_is_accepted(tmp_path, images):
    from segfromxai.run.outdir import check_out_outside

    check_out_outside(tmp_path / "images_out", images)
    one = next(images.iterdir())
    check_out_outside(one.parent / "out", one)  # one image: its folder is not read


# ------------------------------------------------------------------------------------------------ case 7
def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "somewhere/file.npz")


@pytest.mark.parametrize("where", ["save_artifacts", "atomic_write"])
def test_full_disk_during_run_is_one_error_line_and_resume_finishes(tmp_path, images, tiny_card, monkeypatch,
                                                                    where):
    import segfromxai.run.local as local

    monkeypatch.setattr(local, where, _full_disk)
    out = tmp_path / "out"
    args = ("run", "default-fast", "--images", images, "--out", out, "--checkpoint", tiny_card, "--overlays")
    line = error_line(invoke(*args))
    assert "no space left" in line and str(out) in line and "--resume" in line
    monkeypatch.undo()
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "pseudo_labels.json").read_text())["images"]) == 12
    assert not [p for p in out.rglob("*.tmp")]


# ------------------------------------------------------------------------------------------------ case 5
def _features_run(tmp_path, images, tiny_card, *flags):
    out = tmp_path / "out"
    result = invoke("run", "default-fast", "--images", images, "--out", out, "--checkpoint", tiny_card, *flags)
    return result, out


@pytest.mark.parametrize("flags, words", [
    (("--features-model", "classifier", "--features-img-size", "1"), ["img_size = 1", "patch (8 px)", "[features]"]),
    (("--features-model", "classifier", "--features-img-size", "7"), ["img_size = 7", "patch (8 px)"]),
    (("--features-img-size", "100000"), ["--features-img-size", "1024"]),
    (("--features-checkpoint", "/nonexistent"), ["--features-checkpoint", "/nonexistent"]),
    (("--features-model", "vit_tiny_patch16_224"), ["vit_tiny_patch16_224", "no weights", "--features-checkpoint"]),
])
def test_feature_backbone_flags_fail_before_any_image_naming_the_key(tmp_path, images, tiny_card, flags, words):
    result, out = _features_run(tmp_path, images, tiny_card, *flags)
    line = error_line(result)
    assert all(w in line for w in words), line
    assert not out.exists()


def test_feature_backbone_img_size_in_the_recipe_is_checked_at_load_and_against_the_patch(tmp_path, images,
                                                                                        tiny_card):
    with pytest.raises(RecipeError, match=r"\[features\].*img_size = 100000"):
        parse_recipe(_recipe(features={"img_size": 100000}))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[explainers.gradcam]\n[refine]\nmethod = "ncut"\n[domain]\nconfidence = 0.5\n'
                      '[domain.features]\nmodel = "classifier"\nimg_size = 1\n')
    out = tmp_path / "out"
    line = error_line(invoke("run", recipe, "--images", images, "--out", out, "--checkpoint", tiny_card))
    assert "[domain.features]" in line and "img_size = 1" in line and not out.exists()
    recipe.write_text('[explainers.gradcam]\n[refine]\nmethod = "ncut"\n[features]\nmodel = "embedded"\n'
                      'checkpoint = "/nonexistent/card.json"\n')
    line = error_line(invoke("run", recipe, "--images", images, "--out", out, "--checkpoint", tiny_card))
    assert "[features]" in line and "/nonexistent" in line and not out.exists()


def test_feature_backbone_with_its_own_weights_still_runs(tmp_path, images, tiny_card):
    result, _ = _features_run(tmp_path, images, tiny_card, "--features-model", "classifier",
                              "--features-img-size", "8", "--limit", "1")
    assert result.exit_code == 0, result.output


def test_features_img_size_flag_and_recipe_share_one_limit():
    from segfromxai.models.features import MAX_IMG_SIZE
    from segfromxai.options import features_options

    opt = next(p for p in features_options(lambda **kw: None).__click_params__ if p.name == "features_img_size")
    assert opt.type.max == MAX_IMG_SIZE


# ------------------------------------------------------------------------------------------------ case 9b, 9c
def test_images_changed_since_the_run_say_so_when_scored(tmp_path, synth_images):
    gt = json.loads((synth_images / "annotations.json").read_text())
    pred = {**gt, "annotations": [], "images": [{**im, "width": 100, "height": 100} for im in gt["images"]]}
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    line = error_line(invoke("evaluate", "--pred", tmp_path / "pred.json", "--gt", synth_images / "annotations.json"))
    assert "images changed" in line and "pred.json" in line and "annotations.json" in line
    assert "100x100" in line and "48x48" in line


def test_crowd_ground_truth_is_ignored_in_pixel_metrics_as_in_ap(tmp_path, synth_images):
    from segfromxai.quality.evaluate import evaluate

    gt = json.loads((synth_images / "annotations.json").read_text())
    crowd = gt["annotations"][0] = {**gt["annotations"][0], "iscrowd": 1}  # an image's only object: a crowd
    pred = {**gt, "annotations": [{**a, "score": 1.0} for a in gt["annotations"][1:]]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    result = evaluate(tmp_path / "pred.json", tmp_path / "gt.json")
    assert result["ap"] == pytest.approx(1.0)
    crowd_row = next(r for r in result["per_image"] if r["file_name"] == next(
        im["file_name"] for im in gt["images"] if im["id"] == crowd["image_id"]))
    assert crowd_row["fn"] == 0 and crowd_row["fp"] == 0
    assert result["iou"]["pooled"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ case 12
def _three_parts(h=20, w=30):
    import numpy as np

    m = np.zeros((h, w), bool)
    m[1:5, 1:6] = m[10:15, 2:8] = m[3:9, 20:28] = True
    return m


def test_yolo_export_writes_one_line_per_annotation_joining_the_parts(tmp_path):
    import numpy as np

    from segfromxai.io import yolo
    from segfromxai.ops import masks

    one, two = _three_parts(), np.zeros((20, 30), bool)
    two[12:18, 12:18] = True
    recs = [{"image": {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
             "annotations": [{"category_id": 1, "segmentation": masks.encode(m), "score": 0.5} for m in (one, two)]}]
    yolo.export_yolo(tmp_path, recs, categories=[{"id": 1, "name": "cat"}])
    lines = next(tmp_path.glob("labels/*/a.txt")).read_text().splitlines()
    assert len(lines) == 2  # the annotation count, not the 4 parts
    xy = np.array(lines[0].split()[1:], float).reshape(-1, 2) * (30, 20)
    for part in masks.to_polygons(one):  # every vertex of every part is on the joined outline
        p = np.asarray(part).reshape(-1, 2)
        assert all(np.isclose(xy, v).all(1).any() for v in p)


def test_joined_polygon_rasterises_back_to_the_parts():
    import cv2
    import numpy as np

    from segfromxai.ops import masks

    m = _three_parts()
    joined = masks.join_polygons(masks.to_polygons(m))
    drawn = np.zeros(m.shape, np.uint8)
    cv2.fillPoly(drawn, [np.round(joined).astype(np.int32)], 1)
    parts = np.zeros(m.shape, np.uint8)
    for p in masks.to_polygons(m):
        cv2.fillPoly(parts, [np.asarray(p).reshape(-1, 2).astype(np.int32)], 1)
    links = drawn.astype(bool) & ~parts.astype(bool)  # the zero-width links, drawn one pixel wide
    assert (drawn.astype(bool) >= parts.astype(bool)).all() and links.sum() < 40


def test_yolo_lines_of_a_run_equal_its_annotations(tmp_path, images, tiny_card):
    out = tmp_path / "out"
    result = invoke("run", "default-fast", "--images", images, "--out", out, "--checkpoint", tiny_card,
                    "--format", "yolo")
    assert result.exit_code == 0, result.output
    n_ann = len(json.loads((out / "pseudo_labels.json").read_text())["annotations"])
    n_lines = sum(len(p.read_text().splitlines()) for p in (out / "yolo" / "labels").rglob("*.txt"))
    assert n_lines == n_ann > 0


# ------------------------------------------------------------------------------------------------ case 11
@pytest.mark.parametrize("ci, outcome", [("true", "1 failed"), ("", "1 skipped")])
def test_browser_tests_fail_instead_of_skipping_under_ci_without_a_browser(tmp_path, ci, outcome):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "CI": ci, "PATH": str(tmp_path), "PYTHONPATH": str(root)}  # no browser on the PATH
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "compare_plot",
                           str(root / "tests" / "test_browser.py")], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert outcome in proc.stdout, proc.stdout[-2000:]


def test_ci_script_installs_chromium_when_absent():
    from pathlib import Path

    script = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "apt-get install -y -qq chromium" in script and "command -v chromium" in script
    assert 'export CI=' in script and script.rstrip().endswith("make test")
