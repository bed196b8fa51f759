"""Agreement of pseudo-labels with a student's masks: a label-free flag of a bad pseudo-label (the ViTmiX "pseudo vs
student" column), per image, and how well it ranks the pseudo-labels by their true IoU; and the agreement offered
to the recipe's mask-quality score (:data:`FLAG`, the smaller of the two)."""

from __future__ import annotations

import math
from typing import Any

from .metrics import spearman

AGREEMENT = "pseudo vs student IoU"
"""The per-image column of a table with the student's masks: the IoU of the image's pseudo-label with the student's
mask (ViTmiX's "pseudo vs student"), a label-free flag of a bad pseudo-label."""


FLAG = "min(score, agreement)"
"""The per-image column that joins the two label-free flags: the smaller of the pseudo-label's own ``score`` (the
recipe's mask-quality score, :mod:`segfromxai.stages.quality`) and its :data:`AGREEMENT` with the student, so an
image is low when either flags it (issue 32 measured on the 108 dev photos how each ranks the pseudo-labels by true
IoU: docs/student.md)."""


def agreement(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per pseudo-labelled image (file name), the IoU of its pseudo-label with the student's mask (the rows of the
    "pseudo vs student" comparison); empty without that comparison."""
    return {row["file_name"]: row["iou"] for row in results.get("pseudo vs student", {}).get("per_image", [])}


def flag(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per pseudo-labelled image (file name), :data:`FLAG`: the smaller of its pseudo-label's score and its
    agreement with the student, from the "pseudo vs student" rows (either alone where the other is NaN, NaN where
    both are); empty without that comparison."""
    out = {}
    for row in results.get("pseudo vs student", {}).get("per_image", []):
        both = [v for v in (row.get("score", math.nan), row["iou"]) if not math.isnan(v)]
        out[row["file_name"]] = min(both) if both else math.nan
    return out


def per_image_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every comparison's per-image rows, each led by its comparison's name and, when the student's masks are
    compared, ending with the image's :data:`AGREEMENT` and :data:`FLAG` (NaN where the image has none)."""
    agree, flags = agreement(results), flag(results)
    to_pseudo = {row["reference"]: row["file_name"] for row in results.get("pseudo vs student", {}).get("per_image",
                                                                                                     [])}
    rows = []
    for name, r in results.items():
        for row in r["per_image"]:
            key = to_pseudo.get(row["file_name"]) if name == "student vs GT" else row["file_name"]
            extra = {AGREEMENT: agree.get(key, math.nan), FLAG: flags.get(key, math.nan)} if agree else {}
            rows.append({"comparison": name, **row, **extra})
    return rows


def agreement_spearman(results: dict[str, dict[str, Any]], of: str = AGREEMENT) -> float:
    """Spearman's rank correlation (:func:`segfromxai.quality.metrics.spearman`) over images of the pseudo-labels'
    agreement with the student (:func:`agreement`; with ``of`` :data:`FLAG`, :func:`flag`) and their true IoU (the
    "pseudo vs GT" comparison's): how well it ranks the pseudo-labels by quality. NaN without both comparisons or
    with fewer than two images (images whose value is NaN are left out)."""
    agree = {AGREEMENT: agreement, FLAG: flag}[of](results)
    rows = results.get("pseudo vs GT", {}).get("per_image", [])
    pairs = [(agree[r["file_name"]], r["iou"]) for r in rows if r["file_name"] in agree]
    return spearman([a for a, _ in pairs], [t for _, t in pairs])
