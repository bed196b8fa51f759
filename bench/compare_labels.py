"""Paired comparison of label files on one ground truth: what ``segfromxai compare`` prints for recipes, for masks
already written (a student's ``student_labels.json``, a run's ``pseudo_labels.json``), so that a student is judged
against its teacher, or one student setting against another, under the README's rule.

    PYTHONPATH=$PWD .venv/bin/python bench/compare_labels.py BASE.json OTHER.json [...] --gt GT.json
        [--resamples 10000]

Every file is scored by :func:`segfromxai.quality.evaluate.evaluate` (the per-image IoU of the union of an image's
masks with the union of its ground truth, unknown and crowd pixels left out; an image without a mask scores 0
against a non-empty truth; where both are empty there is no IoU and the image is left out, as ``compare`` does).
Printed: each file's mean IoU and precision / recall per image, then for every file after the first its paired
bootstrap difference against the first (:func:`segfromxai.quality.paired.paired_rows`: 95% percentile interval,
seed 0; images better and worse by more than 0.02) and its mean per subset
(:func:`segfromxai.quality.paired.subset_rows`; the subset is the ground-truth image's ``subset``, else ``source``,
else the file-name prefix before ``_``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("labels", nargs="+", help="COCO label files; the first is the baseline")
    p.add_argument("--gt", required=True)
    p.add_argument("--resamples", type=int, default=10_000)
    args = p.parse_args()
    from segfromxai.quality.evaluate import evaluate, load_source
    from segfromxai.quality.paired import paired_rows, subset_of, subset_rows

    ref = load_source(args.gt)
    names = [str(Path(f)) for f in args.labels]
    if len(set(names)) != len(names):
        p.error("a label file is named twice")
    per_image = []
    for name in names:
        result = evaluate(name, ref)
        for row in result["per_image"]:
            per_image.append({"recipe": name, "file_name": row["file_name"], "iou": row["iou"],
                              "precision": row["precision"], "recall": row["recall"],
                              "subset": subset_of(row["file_name"], ref.image_entry(row["file_name"]))})
        rows = [r for r in per_image if r["recipe"] == name]
        mean = {k: sum(r[k] for r in rows if not math.isnan(r[k])) / max(1, sum(not math.isnan(r[k]) for r in rows))
                for k in ("iou", "precision", "recall")}
        print(f"{name}: IoU {mean['iou']:.3f}, precision / recall {mean['precision']:.3f} / {mean['recall']:.3f} "
              f"({len(rows)} images)")
    for r in paired_rows(per_image, names, resamples=args.resamples):
        print(f"{r['recipe']} - {r['baseline']}: {r['mean_diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}], "
              f"{r['better']} better, {r['worse']} worse ({r['n']} images)")
    print("subset".ljust(12) + "".join(f"{i:>9}" for i in range(len(names))) + "   (columns: the files in order)")
    for r in subset_rows(per_image, names):
        print(f"{r['subset']:<12}" + "".join(f"{r[n]:>9.3f}" for n in names) + f"   n={r['images']}")


if __name__ == "__main__":
    main()
