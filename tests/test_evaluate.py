"""Evaluation against ground truth and student masks: known answers, PNG sources, matching, AP, the CLI."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segfromxai.cli import main
from segfromxai.io.coco import write_coco
from segfromxai.quality.evaluate import MaskSource, comparisons, evaluate, load_source, match
from segfromxai.ops.masks import encode

CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
# image a (4x4): pred TP=2 FP=1 FN=3 TN=10; image b (4x4): pred = gt = one pixel of class 2
A_PRED = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
A_GT = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
B = np.zeros((4, 4), bool)
B[3, 3] = True


def coco(path, images, categories=CATS):
    """images: [(file_name, [(category_id, mask, score)])]."""
    recs = [{"image": {"id": i + 1, "file_name": f, "height": 4, "width": 4},
             "annotations": [{"category_id": c, "segmentation": encode(m), "score": s} for c, m, s in anns]}
            for i, (f, anns) in enumerate(images)]
    write_coco(path, lambda: recs, categories=categories, info={})
    return path


@pytest.fixture()
def pair(tmp_path):
    pred = coco(tmp_path / "pred.json", [("images/a.jpg", [(1, A_PRED, 0.9)]), ("images/b.jpg", [(2, B, 0.8)])])
    gt = coco(tmp_path / "gt.json", [("a.jpg", [(1, A_GT, 1.0)]), ("b.jpg", [(2, B, 1.0)]), ("c.jpg", [])])
    return pred, gt


def test_known_answers_per_image_and_pooled(pair):
    r = evaluate(*pair)
    assert r["n_images"] == 2 and r["missing_in_pred"] == ["c.jpg"]
    assert r["iou"]["per_image_mean"] == pytest.approx((2 / 6 + 1) / 2)
    assert r["iou"]["pooled"] == pytest.approx(3 / 7)  # TP 2+1, FP 1, FN 3
    assert r["precision"]["pooled"] == pytest.approx(3 / 4) and r["recall"]["pooled"] == pytest.approx(3 / 6)
    assert r["pixel_accuracy"]["pooled"] == pytest.approx((3 + 10 + 15) / 32)  # (TP+TN)/N, not recall
    bg_a, bg_b = 10 / 14, 1.0
    assert r["miou"]["per_image_mean"] == pytest.approx(((2 / 6 + bg_a) / 2 + (1 + bg_b) / 2) / 2)
    assert r["per_category"]["circle"]["iou"]["pooled"] == pytest.approx(2 / 6)
    assert r["per_category"]["square"]["iou"]["n"] == 1
    a = next(row for row in r["per_image"] if row["file_name"] == "images/a.jpg")
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (2, 1, 3, 10) and a["reference"] == "a.jpg"


def test_empty_masks_are_nan_and_not_counted(tmp_path):
    pred = coco(tmp_path / "p.json", [("a.png", []), ("b.png", [(1, B, 1.0)])])
    gt = coco(tmp_path / "g.json", [("a.png", []), ("b.png", [(1, B, 1.0)])])
    r = evaluate(pred, gt)
    assert r["iou"]["n"] == 1 and r["iou"]["per_image_mean"] == 1.0  # a: both empty, IoU undefined, skipped
    assert math.isnan(next(x for x in r["per_image"] if x["file_name"] == "a.png")["iou"])
    assert r["precision"]["n"] == 1 and r["pixel_accuracy"]["n"] == 2


def test_png_label_folders_match_coco_and_ignore_255(tmp_path, pair):
    pred, gt = pair
    folder = tmp_path / "png"
    folder.mkdir()
    a = A_GT.astype(np.uint8)
    a[3, 0] = 255  # an ignored pixel, outside both masks: only TN changes
    Image.fromarray(a).save(folder / "a.png")
    Image.fromarray(B.astype(np.uint8) * 2).save(folder / "b.png")
    r_png, r_coco = evaluate(pred, folder), evaluate(pred, gt)
    assert r_png["iou"] == r_coco["iou"] and r_png["per_category"].keys() == r_coco["per_category"].keys()
    assert r_png["pixel_accuracy"]["pooled"] == pytest.approx((3 + 9 + 15) / 31)
    assert math.isnan(r_png["ap"])  # AP needs COCO instances on both sides


def test_ignore_segmentation_pixels_count_for_neither_object_nor_background(tmp_path, pair):
    pred, gt = pair
    doc = json.loads(gt.read_text())
    ignore = np.zeros((4, 4), bool)
    ignore[0, 2] = ignore[1, 0] = ignore[3, 3] = True  # an FP pixel, an FN pixel and a TN pixel of image a
    doc["annotations"][0]["ignore_segmentation"] = encode(ignore)  # compressed RLE, counts as str
    gt.write_text(json.dumps(doc))
    r = evaluate(pred, gt)
    a = next(row for row in r["per_image"] if row["file_name"] == "images/a.jpg")
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (2, 0, 2, 9)  # was (2, 1, 3, 10): 13 pixels counted, not 16
    assert a["iou"] == pytest.approx(2 / 4) and a["pixel_accuracy"] == pytest.approx(11 / 13)
    assert r["per_category"]["circle"]["iou"]["pooled"] == pytest.approx(2 / 4)
    b = next(row for row in r["per_image"] if row["file_name"] == "images/b.jpg")
    assert (b["tp"], b["fp"], b["fn"], b["tn"]) == (1, 0, 0, 15)  # another image's ignore mask does not leak


def test_unmatched_predictions_are_an_error_that_names_them(tmp_path, pair):
    _, gt = pair
    pred = coco(tmp_path / "p.json", [("a.jpg", []), ("zzz/nope.jpg", [])])
    with pytest.raises(ValueError, match="1 predicted images have no match.*zzz/nope.jpg"):
        evaluate(pred, gt)
    pairs, missing = match(MaskSource(tmp_path, "png", {"a.png": None}), load_source(gt))
    assert pairs == [("a.png", "a.jpg")] and missing == ["b.jpg", "c.jpg"]  # suffixes may differ


def test_average_precision_with_and_without_categories(tmp_path, pair):
    _, gt = pair
    same = coco(tmp_path / "same.json", [("a.jpg", [(1, A_GT, 0.9)]), ("b.jpg", [(2, B, 0.8)])])
    r = evaluate(same, gt)
    assert r["ap"] == pytest.approx(1.0) and r["ap_agnostic"] == pytest.approx(1.0)
    swapped = coco(tmp_path / "swap.json", [("a.jpg", [(2, A_GT, 0.9)]), ("b.jpg", [(1, B, 0.8)])])
    r = evaluate(swapped, gt)
    assert r["ap"] == pytest.approx(0.0) and r["ap_agnostic"] == pytest.approx(1.0)
    assert r["iou"]["pooled"] == 1.0 and r["per_category"]["circle"]["iou"]["pooled"] == 0.0


def test_student_table_has_the_three_comparisons(tmp_path, pair):
    pred, gt = pair
    student = coco(tmp_path / "student.json", [("a.jpg", [(1, A_GT, 1.0)]), ("b.jpg", [(2, B, 1.0)])])
    res = comparisons(pred, gt=gt, student=student)
    assert list(res) == ["pseudo vs GT", "student vs GT", "pseudo vs student"]
    assert res["student vs GT"]["iou"]["per_image_mean"] == 1.0
    assert res["pseudo vs student"]["iou"]["pooled"] == pytest.approx(3 / 7)
    assert list(comparisons(pred, student=student)) == ["pseudo vs student"]
    with pytest.raises(ValueError, match="ground truth"):
        comparisons(pred)


def test_evaluate_command_prints_the_table_and_writes_files(tmp_path, pair):
    pred, gt = pair
    student = coco(tmp_path / "student.json", [("a.jpg", [(1, A_GT, 1.0)]), ("b.jpg", [(2, B, 1.0)])])
    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--student", str(student),
                                  "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "pseudo vs GT" in r.output and "pseudo vs student" in r.output and "iou (pooled)" in r.output
    m = json.loads((out / "metrics.json").read_text())
    for key in ("iou", "dice", "precision", "recall", "pixel_accuracy", "miou"):
        assert set(m[key]) >= {"per_image_mean", "pooled"}
    assert {"ap", "ap_agnostic", "worst", "comparisons"} <= set(m)
    assert len((out / "per_image.csv").read_text().splitlines()) == 1 + 3 * 2  # every comparison, every image
    html = (out / "report.html").read_text()
    assert "images/a.jpg" in html and "images/b.jpg" in html
    bad = CliRunner().invoke(main, ["evaluate", "--pred", str(pred)])
    assert bad.exit_code != 0 and "ground truth" in bad.output


def test_evaluate_out_writes_every_comparison_and_the_student_column(tmp_path, pair):
    import csv

    pred, gt = pair
    student = coco(tmp_path / "student.json", [("a.jpg", [(1, A_GT, 1.0)]), ("b.jpg", [(2, B, 1.0)])])
    images = tmp_path / "pics"
    for name in ("images/a.jpg", "images/b.jpg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(images / name)
    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--student", str(student),
                                  "--out", str(out), "--images", str(images)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    by = {(row["comparison"], row["file_name"]): float(row["iou"]) for row in rows}
    assert by[("pseudo vs GT", "images/a.jpg")] == pytest.approx(2 / 6)
    assert by[("student vs GT", "a.jpg")] == 1.0 and by[("pseudo vs student", "images/a.jpg")] == pytest.approx(2 / 6)
    assert len(by) == 6
    page = (out / "report.html").read_text()
    for name in ("pseudo vs GT", "student vs GT", "pseudo vs student"):
        assert page.count(f"<td>{name}</td>") >= 2 + 2  # per-category rows (circle, square) and per-image rows
        assert f"{name} IoU" in page  # every sheet caption gives every comparison's IoU
    sheets = sorted((out / "sheets").glob("*.png"))
    assert sheets and all(Image.open(p).width == 5 * 160 + 4 * 4 for p in sheets)  # a fifth tile: the student
    for figcaption in page.split("<figcaption>")[1:]:
        text = figcaption.split("</figcaption>")[0]
        assert text.count("images/") <= 1  # the file name is shown once, not repeated in the caption
    assert (out / "figures" / "iou_histogram.svg").exists() and 'src="figures/iou_histogram.svg"' in page


def test_class_agnostic_mode_and_the_binary_png_warning(tmp_path, pair):
    pred, gt = pair
    folder = tmp_path / "student_png"
    folder.mkdir()
    Image.fromarray(A_GT.astype(np.uint8)).save(folder / "a.png")  # 0/1 masks: no class
    Image.fromarray(B.astype(np.uint8)).save(folder / "b.png")
    with pytest.warns(UserWarning, match="only 0/1.*--class-agnostic"):
        r = evaluate(folder, gt)
    assert r["warnings"] and r["per_category"]["square"]["iou"]["pooled"] == 0.0  # b blamed on circle
    plain = evaluate(folder, gt, class_agnostic=True)
    assert plain["warnings"] == [] and list(plain["per_category"]) == ["object"]
    assert plain["per_category"]["object"]["iou"]["pooled"] == 1.0 == plain["iou"]["pooled"]
    assert plain["iou"] == r["iou"]  # the class-agnostic metrics do not change
    both = evaluate(pred, gt, class_agnostic=True)
    assert both["ap"] == both["ap_agnostic"] and list(both["per_category"]) == ["object"]
    cli = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--student", str(folder), "--gt", str(gt)])
    assert cli.exit_code == 0 and "warning:" in cli.output and "--class-agnostic" in cli.output
    cli = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--student", str(folder), "--gt", str(gt),
                                    "--class-agnostic"])
    assert cli.exit_code == 0 and "warning:" not in cli.output
