"""Agreement as a quality flag: the per-image IoU of pseudo-label and student ("pseudo vs student") in
per_image.csv and the report (worst first), and its Spearman correlation with the true IoU, on known answers."""

import csv
import math

import numpy as np
import pytest

from segfromxai.io.coco import write_coco
from segfromxai.ops.masks import encode
from segfromxai.quality.agreement import AGREEMENT, FLAG, agreement, agreement_spearman, flag, per_image_rows
from segfromxai.quality.evaluate import (comparisons,
                                         write_evaluation, write_evaluation_report)
from segfromxai.quality.metrics import ranks, spearman

CATS = [{"id": 1, "name": "object"}]


def _box(r0: int, r1: int, c0: int = 0, c1: int = 10) -> np.ndarray:
    m = np.zeros((10, 10), bool)
    m[r0:r1, c0:c1] = True
    return m


def _coco(path, masks: dict[str, np.ndarray], scores: dict[str, float] | None = None):
    recs = [{"image": {"id": i + 1, "file_name": f, "height": 10, "width": 10},
             "annotations": [{"category_id": 1, "segmentation": encode(m), "score": (scores or {}).get(f, 0.5)}]}
            for i, (f, m) in enumerate(masks.items())]
    write_coco(path, lambda: recs, categories=CATS, info={})
    return path


# Pseudo-label rows 0..4 on every image; the student's rows 0..k give IoU k/5 (k <= 5) or 5/k (k > 5) with it.
STUDENT_ROWS = {"a.png": 5, "b.png": 4, "c.png": 2, "d.png": 10, "e.png": 1}
AGREE = {"a.png": 1.0, "b.png": 0.8, "c.png": 0.4, "d.png": 0.5, "e.png": 0.2}
SCORES = {"a.png": 0.9, "b.png": 0.3, "c.png": 0.9, "d.png": 0.9, "e.png": 0.9}  # the pseudo-labels' own scores
FLAGS = {"a.png": 0.9, "b.png": 0.3, "c.png": 0.4, "d.png": 0.5, "e.png": 0.2}  # the smaller of score and agreement


@pytest.fixture()
def table(tmp_path):
    names = list(STUDENT_ROWS)
    pseudo = _coco(tmp_path / "pseudo.json", {n: _box(0, 5) for n in names}, SCORES)
    student = _coco(tmp_path / "student.json", {n: _box(0, k) for n, k in STUDENT_ROWS.items()})
    # ground truth: rows 0..g, so the pseudo-label's true IoU is 5/g or g/5
    truth = {"a.png": 5, "b.png": 4, "c.png": 3, "d.png": 2, "e.png": 1}  # IoU 1, .8, .6, .4, .2
    gt = _coco(tmp_path / "gt.json", {n: _box(0, g) for n, g in truth.items()})
    return comparisons(pseudo, gt=gt, student=student)


def test_agreement_is_the_known_iou_of_pseudo_label_and_student(table):
    assert agreement(table) == pytest.approx(AGREE)
    rows = per_image_rows(table)
    assert len(rows) == 15 and all(AGREEMENT in r for r in rows)
    for r in rows:  # every comparison's row carries its pseudo-labelled image's agreement
        assert r[AGREEMENT] == pytest.approx(AGREE[r["file_name"]])


def test_agreement_spearman_known_answer(table):
    # agreement 1, .8, .4, .5, .2 against true IoU 1, .8, .6, .4, .2: ranks 5 4 2 3 1 vs 5 4 3 2 1, d = 0 0 1 1 0
    assert agreement_spearman(table) == pytest.approx(1 - 6 * 2 / (5 * 24))
    assert math.isnan(agreement_spearman({k: v for k, v in table.items() if k != "pseudo vs GT"}))


def test_flag_is_the_smaller_of_score_and_agreement_with_its_known_spearman(table):
    assert flag(table) == pytest.approx(FLAGS)
    assert all(r[FLAG] == pytest.approx(FLAGS[r["file_name"]]) for r in per_image_rows(table))
    # flag .9 .3 .4 .5 .2 against true IoU 1 .8 .6 .4 .2: ranks 5 2 3 4 1 vs 5 4 3 2 1, d = 0 2 0 2 0
    assert agreement_spearman(table, FLAG) == pytest.approx(1 - 6 * 8 / (5 * 24))


def test_per_image_csv_has_the_column_and_the_report_lists_the_lowest_flag_first(table, tmp_path):
    out = tmp_path / "eval"
    write_evaluation(out, table)
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(r["comparison"], r["file_name"]): float(r[AGREEMENT]) for r in rows}
    assert got[("pseudo vs GT", "c.png")] == pytest.approx(0.4) and got[("student vs GT", "e.png")] == 0.2
    page = write_evaluation_report(out, table, settings={}).read_text()
    per_image = page[page.index(AGREEMENT):]
    order = [per_image.index(f"<td>{n}</td>") for n in ("e.png", "b.png", "c.png", "d.png", "a.png")]
    assert order == sorted(order)


def test_without_a_student_there_is_no_agreement_column(tmp_path, table):
    only_gt = {"pseudo vs GT": table["pseudo vs GT"]}
    assert agreement(only_gt) == {} and all(AGREEMENT not in r for r in per_image_rows(only_gt))


def test_spearman_known_answers_and_ties():
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks of b are 1, 2, 3.5, 5, 3.5 (deviations -2 -1 .5 2 .5) against 1..5 (-2 -1 0 1 2): 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(10 * 9.5))
    assert spearman([1, 2, float("nan"), 4], [1, 2, 0, 3]) == pytest.approx(1.0)  # the NaN pair left out
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="paired"):
        spearman([1, 2], [1, 2, 3])


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 40).astype(float), rng.random(40)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)


def test_without_a_student_the_report_lists_the_lowest_quality_score_first(tmp_path):
    """Each image's pseudo-label carries its quality score (the annotation's ``score``): the per-image rows show it
    and the report's per-image table starts from the lowest."""
    scores = {"a.png": 0.9, "b.png": 0.1, "c.png": 0.5}
    recs = [{"image": {"id": i + 1, "file_name": f, "height": 10, "width": 10},
             "annotations": [{"category_id": 1, "segmentation": encode(_box(0, 5)), "score": s}]}
            for i, (f, s) in enumerate(scores.items())]
    write_coco(tmp_path / "pseudo.json", lambda: recs, categories=CATS, info={})
    gt = _coco(tmp_path / "gt.json", {n: _box(0, 4) for n in scores})
    table = comparisons(tmp_path / "pseudo.json", gt=gt)
    assert {r["file_name"]: r["score"] for r in table["pseudo vs GT"]["per_image"]} == pytest.approx(scores)
    page = write_evaluation_report(tmp_path / "eval", table, settings={}).read_text()
    per_image = page[page.index("<td>pseudo vs GT</td>"):]
    order = [per_image.index(f"<td>{n}</td>") for n in ("b.png", "c.png", "a.png")]
    assert order == sorted(order)


def test_flag_takes_either_value_where_the_other_is_nan():
    rows = [{"file_name": "a.png", "score": math.nan, "iou": 0.3},
            {"file_name": "b.png", "score": 0.2, "iou": math.nan},
            {"file_name": "c.png", "score": math.nan, "iou": math.nan}, {"file_name": "d.png", "iou": 0.7}]
    got = flag({"pseudo vs student": {"per_image": rows}})
    assert got["a.png"] == 0.3 and got["b.png"] == 0.2 and math.isnan(got["c.png"]) and got["d.png"] == 0.7
