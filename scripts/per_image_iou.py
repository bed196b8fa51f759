"""Per-image IoU of several recipes on one model against a ground truth: a table with one row per image.

Run by hand (``compare`` gives means only; a small benchmark needs the per-image numbers)::

    python scripts/per_image_iou.py default tokencut vitmix/gradcam --images work/real_bench/images \\
        --gt work/real_bench/annotations.json [--checkpoint work/real_bench/efficientnet_lite0/card.json] \\
        [--csv out.csv] [--markdown out.md]

Images are labelled as ``segfromxai run`` labels them (:func:`segfromxai.run.pipeline.label_batch`, the model's top-1
class, each recipe's ``min_confidence``); IoU is class-agnostic: the union of an image's predicted masks against
the union of its ground-truth masks (an image with no predicted mask scores its IoU with an empty mask). All recipes
share one explain pass; when that fails, each recipe runs alone and a recipe that fails is reported with its error.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np


def iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Intersection over union of two bool masks; NaN when both are empty."""
    from segfromxai.quality.metrics import confusion

    tp, fp, fn, _ = confusion(pred, gt, ignore)
    return tp / (tp + fp + fn) if tp + fp + fn else float("nan")


def union_of(masks: list[np.ndarray] | None, size: tuple[int, int]) -> np.ndarray:
    """The union of an image's masks, bool (H, W); empty for ``None`` (no label) or no mask."""
    out = np.zeros(size, bool)
    for m in masks or []:
        out |= m
    return out


def _label(model: Any, recipes: list, x: Any, sizes: list) -> dict[str, Any]:
    """{recipe name: Labelled, or the error message when the recipe fails on this model}."""
    from segfromxai.run.pipeline import label_batch

    try:
        return {r.name: lab for r, lab in zip(recipes, label_batch(model, recipes, x, sizes))}
    except Exception:  # noqa: BLE001 - one recipe may fail on this model: find which, alone
        out: dict[str, Any] = {}
        for r in recipes:
            try:
                out[r.name] = label_batch(model, [r], x, sizes)[0]
            except Exception as e:  # noqa: BLE001 - reported in the table
                out[r.name] = f"{type(e).__name__}: {e}"
        return out


def per_image(model: Any, recipes: list, images: Path, gt: Path, *, batch_size: int = 8) -> dict[str, Any]:
    """``{"rows": [{file_name, class, confidence, <recipe>: IoU}], "errors": {recipe: message}}``."""
    from segfromxai.quality.evaluate import load_source, match_names, union
    from segfromxai.io.images import find_images, load_image

    paths = find_images(images)
    rels = [p.relative_to(images).as_posix() for p in paths]
    ref = load_source(gt)
    pairs = dict(match_names(rels, ref)[0])
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for k in range(0, len(paths), batch_size):
        ims = [load_image(p) for p in paths[k:k + batch_size]]
        x = model.preprocess.batch(ims)
        got = _label(model, recipes, x, [im.shape[:2] for im in ims])
        for j, rel in enumerate(rels[k:k + batch_size]):
            gm, ignore, size = ref.masks(pairs[rel])
            truth = union(gm, size)
            row: dict[str, Any] = {"file_name": rel}
            for r in recipes:
                lab = got[r.name]
                if isinstance(lab, str):
                    errors[r.name] = lab
                    row[r.name] = float("nan")
                    continue
                row["class"] = model.classes[int(lab.target[j])] if model.classes else ""
                row["confidence"] = float(lab.confidence[j])
                row[r.name] = iou(union_of(lab.masks[j], size), truth, ignore)
            rows.append(row)
    return {"rows": rows, "errors": errors}


def markdown(result: dict[str, Any], names: list[str]) -> str:
    """The rows as a markdown table with a last row of per-image means (NaN left out)."""
    head = "| image | top-1 class (p) | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for row in result["rows"]:
        cls = f"{row.get('class', '')} ({row['confidence']:.2f})" if "confidence" in row else ""
        lines.append(f"| {row['file_name']} | {cls} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    means = [np.nanmean([row[n] for row in result["rows"]]) if result["rows"] else float("nan") for n in names]
    lines.append("| **mean** | | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
    lines += [f"\n{name}: fails: `{msg}`" for name, msg in result["errors"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--gt", type=Path, required=True)
    ap.add_argument("--model", default=None, help="timm name (default: the embedded model)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="model card or weights file")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)

    import warnings

    from segfromxai.models.model import load_model
    from segfromxai.run.pipeline import seed_everything
    from segfromxai.recipe.recipe import load_recipes

    seed_everything(0)
    warnings.filterwarnings("ignore")
    model = load_model(args.model, args.checkpoint)
    recipes = load_recipes(args.recipes)
    result = per_image(model, recipes, args.images, args.gt, batch_size=args.batch_size)
    names = [r.name for r in recipes]
    text = markdown(result, names)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file_name", "class", "confidence", *names], extrasaction="ignore")
            w.writeheader()
            w.writerows(result["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
