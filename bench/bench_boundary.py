"""Boundary stage cost: every registered method on one refined mask, as a ratio to one forward pass, in one run.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_boundary.py [--sizes 224 500x375] [--images data/samples/images]
        [--limit 16] [--repeats 5] [--threads 2] [--batch 8]

Baseline: one forward pass of the embedded default model (batch of 1, at its input size, no gradient), timed in the
same run. Inputs: a synthetic scene per size (the ``tests/test_boundary.py`` square: a bright square on a textured
ground) and its coarse mask grown by a third of a token; and ``default-synth``'s refined masks (the former default)
(before its boundary stage) of the first ``--limit`` images under ``--images`` (labelled first, untimed;
``--images ''``: none). Each mask becomes the soft map of :func:`segfromxai.stages.boundary.mask_soft` on the classifier's
token grid, as the pipeline does, and each timing includes ``mask_soft``. On the scenes every method runs with its own
defaults, and once more as ``default-synth``'s ``[boundary]`` section sets it (and, as the baseline of the
default's GrabCut, with ``init_stride = 1``: OpenCV's own k-means start on every pixel); on the images the last two.
Prints the median milliseconds per image and the ratio to the forward pass: first one image at a time, then per image
over a batch (``--batch`` copies of the scene, or all the images) labelled side by side by ``pipeline.thread_map`` on
``--threads`` threads, as a run labels a batch. torch and OpenCV are limited to ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scene(h: int, w: int):
    import numpy as np

    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(60, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    t, l, b, r = h // 4, w // 4, 3 * h // 4, 3 * w // 4
    image[t:b, l:r] = np.clip(rng.normal(190, 20, (b - t, r - l, 3)), 0, 255)
    g = max(1, round(min(h, w) / 42))  # a third of a token
    mask = np.zeros((h, w), bool)
    mask[t - g:b + g, l - g:r + g] = True
    return image, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["224", "500x375"], help="image sizes, S or WxH")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="copies of a scene per batch for the side-by-side timing")
    ap.add_argument("--images", default="data/samples/images", help="images whose refined masks are timed too")
    ap.add_argument("--limit", type=int, default=16)
    args = ap.parse_args()

    import cv2
    import torch

    from segfromxai.stages.boundary import BOUNDARIES, mask_soft
    from segfromxai.models.model import load_model, token_grid
    from segfromxai.run.pipeline import thread_map
    from segfromxai.recipe.recipe import load_recipe

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    model = load_model()
    recipe = load_recipe("default-synth")  # one feature set and GrabCut: the former default
    x = torch.zeros(1, 3, *model.preprocess.size)
    with torch.no_grad():
        forward = timed(lambda: model.module(x), args.repeats)
    print(f"one forward pass ({model.preprocess.size[0]} px, batch 1): {forward * 1000:.1f} ms")
    default = (f"default ({recipe.boundary.method})", BOUNDARIES[recipe.boundary.method], recipe.boundary.params)
    mine = [default]
    if recipe.boundary.method == "grabcut":
        mine.append(("  its init_stride = 1", default[1], {**default[2], "init_stride": 1}))
    grid = token_grid(model.module, model.preprocess.size)  # the fused map's grid: the pipeline's token cell
    cases = []  # (title, items timed one at a time, every item of a batch, the methods)
    for size in args.sizes:
        w, h = (int(v) for v in size.split("x")) if "x" in size else (int(size), int(size))
        image, mask = scene(h, w)
        one = [(mask, image, (h / grid[0], w / grid[1]))]
        cases.append((f"{w}x{h} scene", one, one * args.batch,
                      [(name, method, {}) for name, method in BOUNDARIES.items()] + mine))
    if args.images:
        masks = refined_masks(model, recipe, args.images, args.limit)
        cases.append((f"{len(masks)} refined masks of the default recipe on {args.images}", masks, masks, mine))
    for title, singles, batch, runs in cases:
        print(f"\n{title}, one image at a time:")
        for name, method, params in runs:
            t = timed(lambda: [method(mask_soft(m, c), im, **params) for m, im, c in singles], args.repeats)
            report(name, t / len(singles), forward)
        print(f"  per image in a batch of {len(batch)} on {args.threads} threads:")
        for name, method, params in mine:
            t = timed(lambda: thread_map(lambda j: method(mask_soft(batch[j][0], batch[j][2]), batch[j][1], **params),
                                         list(range(len(batch))), args.threads), args.repeats)
            report(name, t / len(batch), forward)


def report(name: str, seconds: float, forward: float) -> None:
    print(f"  {name:<24} {seconds * 1000:8.1f} ms  {seconds / forward:6.2f} x forward")


def refined_masks(model, recipe, folder: str, limit: int):
    """(mask, image, token cell) of every refined instance of the first ``limit`` images, before the boundary
    (:func:`segfromxai.run.pipeline.refine_image` on the recipe's shared pass and features, as a run chains them)."""
    from segfromxai.io.images import find_images, load_image
    from segfromxai.run.pipeline import feature_maps, fuse_recipe, refine_image, shared_pass

    ims = [load_image(p) for p in find_images(folder)[:limit]]
    out = []
    for s in range(0, len(ims), 8):
        batch = ims[s:s + 8]
        x = model.preprocess.batch(batch)
        got = shared_pass(model, [recipe], x, None)
        feats = next(iter(feature_maps(model, [recipe], x, got[0], batch).values()))
        fused = fuse_recipe(model, recipe, got[0].maps)
        for j, im in enumerate(batch):
            size = im.shape[:2]
            cell = (size[0] / fused.shape[1], size[1] / fused.shape[2])
            out.extend((m, im, cell) for m in refine_image(fused[j], size, recipe, feats[j]))
    return out


if __name__ == "__main__":
    main()
