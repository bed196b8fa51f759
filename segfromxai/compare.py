"""Compare recipes on the same images and ground truth: the ViTmiX table (IoU, F1, PA, deletion AUC, time).

All recipes run on one model. Per batch, the union of their explainers is computed in as few calls to
:func:`~segfromxai.explainers.explain_with_logits` as the parameters allow (one, unless two recipes give one
explainer different parameters), so shared methods share the forward and backward passes; ncut's token features
come from the same forward. Each recipe then fuses its own maps, thresholds, refines and cleans them exactly as
``segfromxai run`` does (:func:`segfromxai.pipeline.label_image`).

Columns, per recipe (the explained class is the model's top-1):

- ``iou``, ``f1``, ``pa``: per-image means of IoU, Dice and pixel accuracy of the union of the recipe's masks
  against the union of the ground-truth masks (class-agnostic, as in the ViTmiX paper); ``iou_pooled`` over all
  pixels. Images where a metric is undefined are skipped (see :mod:`segfromxai.metrics`).
- ``deletion_auc``: mean RISE deletion AUC of the recipe's fused map (lower is better; zeros substrate,
  ``deletion_steps`` steps, :mod:`segfromxai.faithfulness`).
- ``gae``: mean Global Attribution Evaluation of the recipe's fused map (:func:`segfromxai.gae.gae`, higher is
  better, ``gae_steps`` = T = 10 as in the paper) on the first ``gae_images`` images only (each image costs
  2 T - 1 explanations beyond the shared pass, so it is the most expensive column; images without a negative of
  another class in the same batch are NaN and skipped); NaN when ``gae_images`` is 0.
- ``s_per_image``: seconds per image the recipe would take alone: its own explainers timed alone on the first
  batch (after one untimed warm-up pass), plus its fusion, threshold, refinement and cleaning as timed in the shared
  run. Deletion is not counted.
- ``forwards_per_image``: forward passes per image of the recipe's explainers alone on the first batch, counted
  by a hook (:func:`segfromxai.explainers._hooks.count_forwards`), not estimated; the shared pass counts 1.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .evaluate import load_source, match_names, union
from .explainers._hooks import capture, count_forwards, eval_mode
from .explainers.core import explain_with_logits
from .faithfulness import deletion_auc
from .gae import gae
from .images import ImageLoadError, find_images, load_image
from .metrics import confusion, finite_mean, summarise
from .model import LoadedModel
from .pipeline import feature_layer, fuse_recipe, label_image, seed_everything, token_features
from .recipe import Recipe

COLUMNS = ("recipe", "explainers", "k", "iou", "f1", "pa", "deletion_auc", "gae", "s_per_image",
           "forwards_per_image", "iou_pooled", "images", "gae_images")


def explain_calls(recipes: list[Recipe]) -> list[dict[str, dict[str, Any]]]:
    """The explainers of all recipes grouped into as few ``explain`` calls as possible (a name appears once per
    call; the same name with other parameters goes to a later call)."""
    calls: list[dict[str, dict[str, Any]]] = []
    for r in recipes:
        for name, params in r.explainers.items():
            for call in calls:
                if call.get(name, params) == params:
                    call[name] = params
                    break
            else:
                calls.append({name: params})
    return calls


def _layer(model: LoadedModel, recipe: Recipe) -> str | None:
    if recipe.refine.method != "ncut":
        return None
    return feature_layer(model.module, recipe.refine.params["feature"], recipe.refine.params["block"])


def _explain(model: LoadedModel, x: torch.Tensor, calls: list[dict[str, dict[str, Any]]], layers: list[str]):
    """Maps per call, the logits and the captured outputs of ``layers``, from one forward per call."""
    out = []
    with capture(model.module, layers=tuple(layers)) as got:
        maps, logits = explain_with_logits(model, x, calls[0])
    out.append(maps)
    for call in calls[1:]:
        out.append(explain_with_logits(model, x, call)[0])
    return out, logits, {name: got.outputs[name] for name in layers}


def _maps_of(recipe: Recipe, calls: list[dict[str, dict[str, Any]]], maps: list[dict[str, torch.Tensor]]):
    return {name: next(m[name] for c, m in zip(calls, maps) if c.get(name) == params)
            for name, params in recipe.explainers.items()}


def _warm_up(model: LoadedModel, x: torch.Tensor) -> None:
    """One untimed forward and backward pass on the batch, so that the first recipe timed does not pay for the
    allocator and kernel start-up the others then reuse (parameter gradients untouched)."""
    with eval_mode(model.module):
        xr = x.detach().clone().requires_grad_(True)
        torch.autograd.grad(model.module(xr).max(1).values.sum(), xr)


def _time_alone(model: LoadedModel, recipe: Recipe, x: torch.Tensor) -> tuple[float, float]:
    """Seconds and forward passes (images through the model, counted) per image of the recipe's explainers."""
    layer = _layer(model, recipe)
    with count_forwards(model.module) as n:
        t0 = time.perf_counter()
        _explain(model, x, [dict(recipe.explainers)], [layer] if layer else [])
        seconds = time.perf_counter() - t0
    return seconds / len(x), n.images / len(x)


def _recipe_gae(model: LoadedModel, recipe: Recipe, x: torch.Tensor, target: torch.Tensor, steps: int,
                seed: int, fused0: np.ndarray) -> np.ndarray:
    """GAE (per image) of the recipe's fused map, upsampled by :func:`segfromxai.gae.gae` to the input size;
    ``fused0`` are the fused maps of ``x`` from the shared pass (not explained again)."""
    def fused(images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        maps = explain_with_logits(model, images, dict(recipe.explainers), t)[0]
        return torch.from_numpy(fuse_recipe(model, recipe, maps)).to(images.device)

    return gae(model.module, fused, x, target, steps=steps, batch_size=len(x), seed=seed,
               maps=torch.from_numpy(fused0))["gae"]


def compare(recipes: list[Recipe], images: str | Path, gt: str | Path, *, model: LoadedModel, batch_size: int = 16,
            deletion_steps: int = 10, gae_images: int = 16, gae_steps: int = 10, limit: int | None = None,
            seed: int = 0, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run every recipe on the images under ``images`` and score it against ``gt`` (COCO file or PNG folder).

    Returns ``{"rows": [one dict per recipe with COLUMNS], "failures": [...], "n_images": int, "settings": {...}}``;
    rows are ordered by the number of explainers, then by name. Unreadable images are skipped and listed.
    """
    if not recipes:
        raise ValueError("no recipes to compare")
    seed_everything(seed)
    images = Path(images)
    paths = find_images(images)[:limit]
    rels = [p.name if p == images else p.relative_to(images).as_posix() for p in paths]
    ref = load_source(gt)
    pairs = dict(match_names(rels, ref)[0])
    calls = explain_calls(recipes)
    layers = sorted({layer for r in recipes if (layer := _layer(model, r)) is not None})
    counts: dict[str, list] = {r.name: [] for r in recipes}
    deletion: dict[str, list] = {r.name: [] for r in recipes}
    gaes: dict[str, list] = {r.name: [] for r in recipes}
    post = {r.name: 0.0 for r in recipes}
    alone: dict[str, tuple[float, float]] = {}
    failures, n_done = [], 0
    for start in range(0, len(paths), batch_size):
        loaded = []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                loaded.append((rels[i], load_image(paths[i])))
            except ImageLoadError as e:
                failures.append({"file_name": rels[i], "reason": e.reason})
        if not loaded:
            continue
        x = model.preprocess.batch([im for _, im in loaded]).to(model.device)
        if not alone:  # each recipe's explainers alone, on the first batch
            _warm_up(model, x)
            alone = {r.name: _time_alone(model, r, x) for r in recipes}
        maps, logits, outputs = _explain(model, x, calls, layers)
        cls = logits.argmax(1)
        gts = []
        for rel, im in loaded:
            gm, ignore, size = ref.masks(pairs[rel])
            gts.append((union(gm, size), ignore))
        for r in recipes:
            t0 = time.perf_counter()
            fused = fuse_recipe(model, r, _maps_of(r, calls, maps))
            layer = _layer(model, r)
            feats = (token_features(model.module, outputs[layer], r.refine.params["feature"], tuple(x.shape[-2:]))
                     if layer else None)
            for j, (rel, im) in enumerate(loaded):
                masks = label_image(fused[j], im.shape[:2], r, None if feats is None else feats[j])
                pred = np.zeros(im.shape[:2], bool)
                for m in masks:
                    pred |= m
                counts[r.name].append(confusion(pred, *gts[j]))
            post[r.name] += time.perf_counter() - t0
            deletion[r.name] += list(deletion_auc(model.module, x, torch.from_numpy(fused), cls,
                                                  steps=deletion_steps, batch_size=64))
            k = min(len(loaded), gae_images - len(gaes[r.name]))
            if k > 0:
                gaes[r.name] += list(_recipe_gae(model, r, x[:k], cls[:k], gae_steps, seed, fused[:k]))
        n_done += len(loaded)
        if progress is not None:
            progress(len(loaded), len(paths))
    rows = []
    for r in recipes:
        s = summarise(counts[r.name], ("iou", "dice", "pixel_accuracy"))
        rows.append({"recipe": r.name, "explainers": "+".join(r.explainers), "k": len(r.explainers),
                     "iou": s["iou"]["per_image_mean"], "f1": s["dice"]["per_image_mean"],
                     "pa": s["pixel_accuracy"]["per_image_mean"],
                     "deletion_auc": float(np.mean(deletion[r.name])) if deletion[r.name] else float("nan"),
                     "gae": finite_mean(gaes[r.name]),
                     "s_per_image": alone.get(r.name, (0.0, 0.0))[0] + post[r.name] / max(n_done, 1),
                     "forwards_per_image": alone.get(r.name, (0.0, math.nan))[1],
                     "iou_pooled": s["iou"]["pooled"], "images": len(counts[r.name]),
                     "gae_images": int(np.isfinite(gaes[r.name]).sum())})
    rows.sort(key=lambda row: (row["k"], row["recipe"]))
    settings = {"recipes": {r.name: r.to_dict() for r in recipes}, "images": str(images), "gt": str(gt),
                "model": model.source, "batch_size": batch_size, "deletion_steps": deletion_steps,
                "gae_images": gae_images, "gae_steps": gae_steps, "seed": seed, "explain_calls": len(calls)}
    return {"rows": rows, "failures": failures, "n_images": n_done, "settings": settings}


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
    """``out/compare.json`` (rows, failures, settings; NaN as null) and ``out/compare.csv``, atomically."""
    import csv
    import json

    from .coco import atomic_write
    from .evaluate import json_safe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "compare.json") as f:
        json.dump(json_safe(result), f, indent=2, allow_nan=False)
    with atomic_write(out / "compare.csv") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(result["rows"])
