"""Compare recipes on the same images and ground truth: the ViTmiX table (IoU, F1, PA, deletion AUC, time).

All recipes run on one model, and every batch is labelled by :func:`segfromxai.run.pipeline.label_batch`, the function
``segfromxai run`` labels with: the union of the recipes' explainers is computed in as few explain passes as the
parameters allow (one, unless two recipes give one explainer different parameters), so shared methods share the
forward and backward passes, and the refiners' token features come from the same forward. The explained class is
the model's top-1 or the one given by ``targets`` (a labels CSV or class folders), as in a run.

Columns, per recipe:

- ``iou``, ``f1``, ``pa``: per-image means of IoU, Dice and pixel accuracy of the union of the recipe's masks
  against the union of the ground-truth masks (class-agnostic, as in the ViTmiX paper); ``iou_pooled`` over all
  pixels. Images where a metric is undefined are skipped (see :mod:`segfromxai.quality.metrics`).
- ``deletion_auc``: mean RISE deletion AUC of the recipe's fused map (lower is better; zeros substrate,
  ``deletion_steps`` steps, :mod:`segfromxai.quality.faithfulness`).
- ``gae``: mean Global Attribution Evaluation of the recipe's fused map (:func:`segfromxai.quality.gae.gae`, higher is
  better, ``gae_steps`` = T = 10 as in the paper) on the first ``gae_images`` images only (each image costs
  2 T - 1 explanations beyond the shared pass, so it is the most expensive column; images without a negative of
  another class in the same batch are NaN and skipped); NaN when ``gae_images`` is 0.
- ``s_per_image``: seconds per image the recipe would take alone: its own explainers (and its feature backbone's
  extra forward, if any) timed alone on the first batch (after one untimed warm-up pass), plus its fusion,
  threshold, refinement and cleaning as timed in the shared run. Deletion is not counted.
- ``forwards_per_image``: forward passes per image of the classifier by the recipe's explainers alone on the first
  batch, counted by a hook (:func:`segfromxai.models.hooks.count_forwards`), not estimated; the shared pass
  counts 1 (a feature backbone's extra forward is not counted here).

The evidence, every recipe against the first one given (``paired``), from the per-image IoU: the mean difference
(recipe minus first) with a paired bootstrap 95% percentile interval (images resampled with replacement,
``resamples`` = 10,000 resamples by default, seed 0, :func:`segfromxai.quality.paired.paired_bootstrap`) and the
number of images better and worse by more than 0.02; an image where a recipe gives no mask is scored against an
empty mask (IoU 0 when the ground truth is not empty), and an image whose IoU is undefined for either recipe is left
out of that pair. ``subsets``: each recipe's mean IoU per subset of the ground truth (its image entry's ``subset``,
else ``source``, else the file-name prefix before the first ``_``; :func:`segfromxai.quality.paired.subset_of`) and
over all images.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .evaluate import load_source, match_names, union
from ..models.hooks import count_forwards, eval_mode
from ..explainers import explain_pass
from .faithfulness import deletion_auc
from ..recipe.checks import is_headless
from .gae import gae
from ..run.local import ChunkLoader, Item, find_run_images, label_items
from .metrics import METRICS, confusion, finite_mean, summarise
from .paired import RESAMPLES, SEED, paired_rows, subset_of, subset_rows
from ..models.model import LoadedModel
from ..models.features import backbone_for, uses_classifier
from ..run.pipeline import (
    confidence,
    explain_calls,
    feature_maps,
    fuse_recipe,
    seed_everything,
    shared_pass,
)
from ..stages.refine import REFINERS
from ..recipe.recipe import Recipe
from ..recipe.checks import check_recipes_for_model
from ..run.targets import Targets

COLUMNS = ("recipe", "explainers", "k", "iou", "f1", "pa", "deletion_auc", "gae", "s_per_image",
           "forwards_per_image", "iou_pooled", "images", "gae_images")


def _warm_up(model: LoadedModel, x: torch.Tensor) -> None:
    """One untimed forward and backward pass on the batch, so that the first recipe timed does not pay for the
    allocator and kernel start-up the others then reuse (parameter gradients untouched)."""
    with eval_mode(model.module):
        xr = x.detach().clone().requires_grad_(True)
        torch.autograd.grad(model.module(xr).max(1).values.sum(), xr)


def _time_alone(model: LoadedModel, recipe: Recipe, x: torch.Tensor) -> tuple[float, float]:
    """Seconds and forward passes (images through the model, counted) per image of the recipe's explainers."""
    for stages in recipe.stages():  # backbones loaded before the clock starts
        if "features" in REFINERS[stages.refine.method].requires and not uses_classifier(model, stages.features):
            backbone_for(model, stages.features)
    with count_forwards(model.module) as n:
        t0 = time.perf_counter()
        got = shared_pass(model, [recipe], x, None)[0]
        feature_maps(model, [recipe], x, got, conf=confidence(model, got))
        seconds = time.perf_counter() - t0
    return seconds / len(x), n.images / len(x)


def _recipe_gae(model: LoadedModel, recipe: Recipe, x: torch.Tensor, target: torch.Tensor, steps: int,
                seed: int, fused0: np.ndarray) -> np.ndarray:
    """GAE (per image) of the recipe's fused map, upsampled by :func:`segfromxai.quality.gae.gae` to the input size;
    ``fused0`` are the fused maps of ``x`` from the shared pass (not explained again)."""
    def fused(images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        maps = explain_pass(model, images, dict(recipe.explainers), t).maps
        return torch.from_numpy(fuse_recipe(model, recipe, maps)).to(images.device)

    return gae(model.module, fused, x, target, steps=steps, batch_size=len(x), seed=seed,
               maps=torch.from_numpy(fused0))["gae"]


class _Tally:
    """Per-recipe confusion counts, deletion AUCs, GAE values and post-processing seconds over the batches."""

    def __init__(self, recipes: list[Recipe]) -> None:
        self.counts: dict[str, list] = {r.name: [] for r in recipes}
        self.deletion: dict[str, list] = {r.name: [] for r in recipes}
        self.gaes: dict[str, list] = {r.name: [] for r in recipes}
        self.post = {r.name: 0.0 for r in recipes}
        self.alone: dict[str, tuple[float, float]] = {}
        self.failures: list[dict] = []
        self.files: list[str] = []
        self.subsets: dict[str, str] = {}
        self.n_done = 0

    def per_image(self, recipes: list[Recipe]) -> list[dict[str, Any]]:
        """One row per image and recipe: ``file_name``, ``recipe``, ``subset``, ``iou``, ``precision``,
        ``recall``, ``pa``."""
        names = {"iou": "iou", "precision": "precision", "recall": "recall", "pa": "pixel_accuracy"}
        return [{"file_name": f, "recipe": r.name, "subset": self.subsets[f],
                 **{k: METRICS[m].from_counts(*c) for k, m in names.items()}}
                for r in recipes for f, c in zip(self.files, self.counts[r.name])]

    def row(self, r: Recipe) -> dict[str, Any]:
        s = summarise(self.counts[r.name], ("iou", "dice", "pixel_accuracy"))
        deletion, gaes = self.deletion[r.name], self.gaes[r.name]
        return {"recipe": r.name, "explainers": "+".join(r.explainers), "k": len(r.explainers),
                "iou": s["iou"]["per_image_mean"], "f1": s["dice"]["per_image_mean"],
                "pa": s["pixel_accuracy"]["per_image_mean"],
                "deletion_auc": float(np.mean(deletion)) if deletion else float("nan"),
                "gae": finite_mean(gaes),
                "s_per_image": self.alone.get(r.name, (0.0, 0.0))[0] + self.post[r.name] / max(self.n_done, 1),
                "forwards_per_image": self.alone.get(r.name, (0.0, math.nan))[1],
                "iou_pooled": s["iou"]["pooled"], "images": len(self.counts[r.name]),
                "gae_images": int(np.isfinite(gaes).sum())}


def _score_batch(model: LoadedModel, recipes: list[Recipe], loaded: list[Item], x: torch.Tensor, gts: list,
                 tally: _Tally, settings: dict[str, Any]) -> None:
    """Label one batch with every recipe (one shared pass) and add its scores to ``tally``."""
    x = x.to(model.device)
    if not tally.alone:  # each recipe's explainers alone, on the first batch
        _warm_up(model, x)
        tally.alone = {r.name: _time_alone(model, r, x) for r in recipes}
    got = label_items(model, recipes, loaded, x)
    for r, lab in zip(recipes, got):
        for j, item in enumerate(loaded):
            pred = np.zeros(item.image.shape[:2], bool)
            for m in lab.masks[j] or []:  # an image under min_confidence has no mask, as in a run
                pred |= m
            tally.counts[r.name].append(confusion(pred, *gts[j]))
        tally.post[r.name] += lab.seconds
        cls = torch.from_numpy(lab.target).to(x.device)
        if is_headless(model.module):  # no class score to delete or to compare: deletion AUC and GAE are NaN
            continue
        tally.deletion[r.name] += list(deletion_auc(model.module, x, torch.from_numpy(lab.fused), cls,
                                                    steps=settings["deletion_steps"], batch_size=64))
        k = min(len(loaded), settings["gae_images"] - len(tally.gaes[r.name]))
        if k > 0:
            tally.gaes[r.name] += list(_recipe_gae(model, r, x[:k], cls[:k], settings["gae_steps"],
                                                   settings["seed"], lab.fused[:k]))


def compare(recipes: list[Recipe], images: str | Path, gt: str | Path, *, model: LoadedModel, batch_size: int = 16,
            deletion_steps: int = 10, gae_images: int = 16, gae_steps: int = 10, limit: int | None = None,
            seed: int = 0, targets: Targets = Targets(), progress: Callable[[int, int], None] | None = None,
            resamples: int = RESAMPLES) -> dict[str, Any]:
    """Run every recipe on the images under ``images`` and score it against ``gt`` (COCO file or PNG folder).

    Images are labelled by :func:`segfromxai.run.pipeline.label_batch`, as ``segfromxai run`` labels them: the same
    ``targets`` (top-1, a labels CSV or class folders; images without a label are skipped and listed) and each
    recipe's ``min_confidence`` (an image under it has no mask). Returns ``{"rows": [one dict per recipe with
    COLUMNS], "per_image": [...], "paired": [...], "subsets": [...], "failures": [...], "n_images": int,
    "settings": {...}}``; rows are ordered by the number of explainers, then by name. Unreadable images are skipped
    and listed. ``paired`` compares every recipe with the first one given (``recipes[0]``), ``subsets`` gives each
    recipe's mean IoU per subset (see the module docstring); ``resamples`` is the number of bootstrap resamples.
    """
    if not recipes:
        raise ValueError("no recipes to compare")
    seed_everything(seed)
    check_recipes_for_model(model, recipes)  # before any image is read
    images = Path(images)
    found = find_run_images(images, model, targets, limit)
    paths, rels, model = found.paths, found.rels, found.model
    ref = load_source(gt)
    pairs = dict(match_names(rels, ref)[0])
    chunks = [list(range(k, min(k + batch_size, len(paths)))) for k in range(0, len(paths), batch_size)]
    loader = ChunkLoader(chunks, paths, rels, targets, list(model.classes), model.preprocess)
    settings = {"recipes": {r.name: r.to_dict() for r in recipes}, "images": str(images), "gt": str(gt),
                "model": model.source, "batch_size": batch_size, "deletion_steps": deletion_steps,
                "gae_images": gae_images, "gae_steps": gae_steps, "seed": seed, "targets": targets.to_dict(),
                "explain_calls": len(explain_calls(recipes)), "resamples": resamples, "bootstrap_seed": SEED}
    tally = _Tally(recipes)
    for k in range(len(loader)):
        records, loaded, x = loader[k]
        tally.failures += [{"file_name": r["file_name"], "reason": r["reason"]} for r in records]
        if loaded:
            tally.files += [it.rel_path for it in loaded]
            tally.subsets.update({it.rel_path: subset_of(pairs[it.rel_path], ref.image_entry(pairs[it.rel_path]))
                                  for it in loaded})
            gts = [_gt_union(ref, pairs[it.rel_path]) for it in loaded]
            _score_batch(model, recipes, loaded, x, gts, tally, settings)
            tally.n_done += len(loaded)
        if progress is not None:
            progress(len(chunks[k]), len(paths))
    rows = sorted((tally.row(r) for r in recipes), key=lambda row: (row["k"], row["recipe"]))
    per_image, names = tally.per_image(recipes), [r.name for r in recipes]
    return {"rows": rows, "per_image": per_image, "failures": tally.failures, "n_images": tally.n_done,
            "settings": settings, "paired": paired_rows(per_image, names, resamples=resamples, seed=SEED),
            "subsets": subset_rows(per_image, names)}


def _gt_union(ref: Any, key: Any) -> tuple[np.ndarray, np.ndarray | None]:
    gm, ignore, size = ref.masks(key)
    return union(gm, size), ignore


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The comparison as a plain-text table (NaN as n/a)."""
    head = (f"{'recipe':<32} {'k':>2} {'IoU':>6} {'F1':>6} {'PA':>6} {'del.AUC':>8} {'GAE':>6} {'s/img':>7} "
            f"{'fwd/img':>8}")
    lines = [head, "-" * len(head)]
    fmt = lambda v, w, d=3: f"{'n/a' if v != v else f'{v:.{d}f}':>{w}}"  # noqa: E731  (v != v: NaN)
    for r in rows:
        lines.append(f"{r['recipe'][:32]:<32} {r['k']:>2} {fmt(r['iou'], 6)} {fmt(r['f1'], 6)} {fmt(r['pa'], 6)} "
                     f"{fmt(r['deletion_auc'], 8)} {fmt(r['gae'], 6)} {fmt(r['s_per_image'], 7, 2)} "
                     f"{fmt(r['forwards_per_image'], 8, 1)}")
    return "\n".join(lines)


def write_comparison(out: str | Path, result: dict[str, Any]) -> None:
    """``out/compare.json`` (rows, per-image rows, paired and per-subset evidence, failures, settings; NaN as null),
    ``out/compare.csv`` (one row per recipe), ``out/per_image.csv`` (one row per image and recipe),
    ``out/paired.csv`` (one row per recipe after the first), ``out/subsets.csv`` (one row per subset, one column per
    recipe) and ``out/compare.svg`` (IoU against seconds per image, one labelled point per recipe), atomically."""
    import csv
    import json

    from ..fileio import atomic_write
    from .evaluate import json_safe
    from .plots import scatter_svg

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "compare.json") as f:
        json.dump(json_safe(result), f, indent=2, allow_nan=False)
    with atomic_write(out / "compare.csv") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(result["rows"])
    with atomic_write(out / "per_image.csv") as f:
        w = csv.DictWriter(f, fieldnames=["file_name", "recipe", "subset", "iou", "precision", "recall", "pa"])
        w.writeheader()
        w.writerows(result.get("per_image", []))
    for name, rows in (("paired", result.get("paired", [])), ("subsets", result.get("subsets", []))):
        if rows:
            with atomic_write(out / f"{name}.csv") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    points = [(r["recipe"], r["s_per_image"], r["iou"]) for r in result["rows"]]
    with atomic_write(out / "compare.svg") as f:
        f.write(scatter_svg(points, title=f"IoU against seconds per image ({result['n_images']} images)"))
