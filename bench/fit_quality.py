"""Fit the mask-quality score's weights (segfromxai/stages/quality.py) on a run's masks and report how well it ranks.

    segfromxai run default --images work/dev_bench/images --out out/dev-default --overwrite
    .venv/bin/python bench/fit_quality.py out/dev-default work/dev_bench/annotations.json [more RUN GT pairs]

Every annotation of the runs is one sample: its quality terms (the ``attributes.quality`` the run wrote) against its
true IoU with the union of the image's ground-truth masks (pixels under an annotation's ``ignore_segmentation`` left
out), the rule `segfromxai evaluate` uses. Prints the least-squares weights and bias, the Spearman correlation of the
fitted score with the true IoU (in sample, and 5-fold cross-validated by image, folds by a seeded permutation), the
same for the score the run wrote, and per subset. By hand only, never in CI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path, PurePosixPath

import numpy as np
from scipy.stats import spearmanr

from segfromxai.ops.masks import decode
from segfromxai.quality.evaluate import load_source, union
from segfromxai.quality.metrics import METRICS, confusion
from segfromxai.quality.paired import subset_of
from segfromxai.stages.quality import TERMS, quality_score


def samples(run: Path, gt_path: Path) -> list[dict]:
    """One dict per annotation of the run: its terms, its written score, its true IoU (0 when undefined), its image's
    subset. The IoU is `segfromxai evaluate`'s: against the union of the image's ground truth, unknown and crowd
    pixels left out."""
    ref = load_source(gt_path)
    pred = json.loads((run / "pseudo_labels.json").read_text())
    names = {im["id"]: PurePosixPath(im["file_name"]).name for im in pred["images"]}
    out = []
    for ann in pred["annotations"]:
        name = names[ann["image_id"]]
        gt, ignore, size = ref.masks(name)
        iou = METRICS["iou"].from_counts(*confusion(decode(ann["segmentation"]), union(gt, size), ignore))
        out.append({"terms": ann["attributes"]["quality"], "score": ann["score"], "file": name,
                    "iou": iou if np.isfinite(iou) else 0.0, "subset": subset_of(name, ref.image_entry(name))})
    return out


def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares weights (last: the bias) of ``y ~ x``."""
    a = np.hstack([x, np.ones((len(x), 1))])
    return np.linalg.lstsq(a, y, rcond=None)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="RUN_DIR GT_JSON [RUN_DIR GT_JSON ...]")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for run, gt in zip(args.pairs[::2], args.pairs[1::2]):
        rows += samples(Path(run), Path(gt))
    x = np.array([[r["terms"][t] for t in TERMS] for r in rows])
    y = np.array([r["iou"] for r in rows])
    w = fit(x, y)
    files = sorted({r["file"] for r in rows})
    fold_of = dict(zip(files, np.random.default_rng(0).permutation(len(files)) % args.folds))
    folds = np.array([fold_of[r["file"]] for r in rows])
    cv = np.zeros(len(y))
    for k in range(args.folds):
        wk = fit(x[folds != k], y[folds != k])
        cv[folds == k] = x[folds == k] @ wk[:-1] + wk[-1]
    weights = dict(zip(TERMS, np.round(w[:-1], 4).tolist()))
    fitted = np.array([quality_score(r["terms"], weights, round(float(w[-1]), 4)) for r in rows])
    print(f"{len(rows)} masks on {len(files)} images; mean true IoU {y.mean():.3f}")
    print(f"weights {weights}, bias {w[-1]:.4f}")
    print(f"Spearman with true IoU: fitted {spearmanr(fitted, y)[0]:.3f} (in sample), "
          f"{spearmanr(cv, y)[0]:.3f} ({args.folds}-fold cross-validated by image); "
          f"the run's written score {spearmanr([r['score'] for r in rows], y)[0]:.3f}")
    for t, col in zip(TERMS, x.T):
        print(f"  term {t:<11} Spearman {spearmanr(col, y)[0]:+.3f}")
    for s in sorted({r["subset"] for r in rows}):
        k = np.array([r["subset"] == s for r in rows])
        if k.sum() > 2:
            print(f"  subset {s:<11} n {k.sum():>3}  fitted {spearmanr(fitted[k], y[k])[0]:+.3f}  "
                  f"written {spearmanr(np.array([r['score'] for r in rows])[k], y[k])[0]:+.3f}")


if __name__ == "__main__":
    main()
