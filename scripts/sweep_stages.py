"""Sweep the post-explanation stages (refine, boundary) of a recipe over a cached explain pass.

Labelling is dominated by the explain pass and the feature backbone's forward; the stages after them are cheap. So
this script runs a recipe's shared pass and feature forward once per image set (``cache``), keeps the fused maps,
token features, images and the ground-truth union, and then scores many variants of the later stages on that
cache (``sweep``), exactly as :func:`segfromxai.run.pipeline.label_image` chains them; a recipe's ``[domain]`` is
applied per image by the cached confidence of its explained class, as a run does. Scores are per-image means of
the class-agnostic union of an image's masks against the ground-truth union (IoU, precision, recall), as
``segfromxai compare`` reports them.

    python scripts/sweep_stages.py cache --recipe default --images S/images --gt S/annotations.json --out c.pkl
    python scripts/sweep_stages.py sweep c.pkl --variants variants.toml

A variants file is TOML: each table is a variant, its keys ``refine``, ``boundary``, ``masks`` are dicts merged
over the recipe's sections (``boundary.method`` switches the method), e.g.::

    [guided-level-0.6]
    boundary = {method = "guided", level = 0.6}
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch

from segfromxai.run.local import ChunkLoader, batch_target
from segfromxai.quality.evaluate import load_source, match_names, union
from segfromxai.io.images import find_images
from segfromxai.quality.metrics import METRICS, confusion, finite_mean
from segfromxai.models.model import load_model
from segfromxai.run.pipeline import (
    confidence,
    explain_calls,
    feature_maps,
    features_key,
    fuse_recipe,
    label_image,
    shared_pass,
    thread_map,
    _maps_of,
)
from segfromxai.recipe.recipe import Recipe, load_recipe, parse_recipe
from segfromxai.run.targets import Targets


def cache(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    model = load_model(args.model, args.checkpoint)
    images = Path(args.images)
    paths = find_images(images)[:args.limit]
    rels = [p.relative_to(images).as_posix() for p in paths]
    ref = load_source(args.gt)
    pairs = dict(match_names(rels, ref)[0])
    chunks = [list(range(k, min(k + args.batch_size, len(paths)))) for k in range(0, len(paths), args.batch_size)]
    loader = ChunkLoader(chunks, paths, rels, Targets(), list(model.classes), model.preprocess)
    items = []
    for k in range(len(loader)):
        _, loaded, x = loader[k]
        ims = [it.image for it in loaded]
        passes = shared_pass(model, [recipe], x, batch_target([it.target for it in loaded], x.device))
        feats = feature_maps(model, [recipe], x, passes[0], ims)  # every stages' features (a [domain]'s too)
        conf = confidence(model, passes[0])
        fused = fuse_recipe(model, recipe, _maps_of(recipe, explain_calls([recipe]), passes))
        for j, it in enumerate(loaded):
            rel, im = it.rel_path, it.image
            gm, ignore, size = ref.masks(pairs[rel])
            gt = union(gm, size)
            items.append({"rel": rel, "image": im, "fused": fused[j], "confidence": float(conf[j]),
                          "features": {k: f[j].astype(np.float32) for k, f in feats.items()},
                          "gt": gt, "ignore": ignore})
        print(f"cached {len(items)}/{len(paths)}", file=sys.stderr, flush=True)
    with open(args.out, "wb") as f:
        pickle.dump({"recipe": recipe, "items": items}, f)


def variant_recipe(recipe: Recipe, spec: dict) -> Recipe:
    """``recipe`` with each section of ``spec`` merged over its own (a new ``method`` starts from that method's
    defaults), read back through :func:`segfromxai.recipe.recipe.parse_recipe`, so a variant is checked as a recipe is."""
    d = recipe.to_dict()
    for section, given in spec.items():
        if "method" in given and given["method"] != d.get(section, {}).get("method"):
            d[section] = {}
        d[section] = {**d.get(section, {}), **given}
    return parse_recipe(d, name=recipe.name)


SCORES = ("iou", "precision", "recall")


def score(recipe: Recipe, items: list[dict]) -> dict[str, list[float]]:
    """Per-image :data:`segfromxai.quality.metrics.METRICS` (NaN where undefined) of the union of each image's masks."""
    def counts_of(k: int) -> tuple:
        it = items[k]
        size = it["image"].shape[:2]
        stages = recipe.stages_for(it.get("confidence", 0.0))  # the recipe's own, or its [domain]'s
        feats = it["features"]
        if isinstance(feats, dict):
            feats = feats.get(features_key(stages))
        pred = np.zeros(size, bool)
        for m in label_image(it["fused"], size, stages, feats, it["image"]):
            pred |= m
        return confusion(pred, it["gt"], it["ignore"])

    out = {name: [] for name in SCORES}
    for counts in thread_map(counts_of, range(len(items))):  # images side by side, as a run labels a batch
        for name in SCORES:
            out[name].append(METRICS[name].from_counts(*counts))
    return out


def sweep(args: argparse.Namespace) -> None:
    variants = tomllib.loads(Path(args.variants).read_text())
    caches = [pickle.loads(Path(c).read_bytes()) for c in args.caches]
    head = "variant".ljust(28) + "".join(f"{Path(c).stem[:22]:>24}" for c in args.caches)
    for path, c in zip(args.caches, caches):
        r = c["recipe"]
        if getattr(r, "domain", None) is not None:  # a variant's sections change the recipe's own stages only
            n = sum(r.stages_for(it.get("confidence", 0.0)) is not r for it in c["items"])
            print(f"{Path(path).stem}: {n} of {len(c['items'])} images on the [domain] stages (a variant changes "
                  "them with its own domain = {...})")
    print(head)
    for name, spec in {"recipe": {}, **variants}.items():
        cells, per = [], []
        for c in caches:
            s = score(variant_recipe(c["recipe"], spec), c["items"])
            cells.append("/".join(f"{finite_mean(s[name]):.3f}" for name in SCORES))
            per.append(s["iou"])
        print(name.ljust(28) + "".join(f"{x:>24}" for x in cells), flush=True)
        if args.per_image:
            for c, ious in zip(caches, per):
                print("   ", " ".join(f"{v:.2f}" for v in ious))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--recipe", default="default")
    c.add_argument("--images", required=True)
    c.add_argument("--gt", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--model", default=None)
    c.add_argument("--checkpoint", default=None)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("sweep")
    s.add_argument("caches", nargs="+")
    s.add_argument("--variants", required=True)
    s.add_argument("--per-image", action="store_true")
    args = p.parse_args()
    cache(args) if args.cmd == "cache" else sweep(args)


if __name__ == "__main__":
    main()
