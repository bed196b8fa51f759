"""Boundary stage cost: every registered method on one refined mask, as a ratio to one forward pass, in one run.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_boundary.py [--sizes 224 500x375] [--repeats 5] [--threads 2]

Baseline: one forward pass of the embedded default model (batch of 1, 224 px, no gradient), timed in the same run.
Input: a synthetic scene per size (the ``tests/test_boundary.py`` square: a bright square on a textured ground) and
its coarse mask grown by a third of a token, turned into the soft map with :func:`segfromxai.boundary.mask_soft`
on a 14 x 14 grid, as the pipeline does. Each timing includes ``mask_soft``. Every method runs with its own
defaults, and once more as the default recipe's ``[boundary]`` section sets it (and, as the baseline of the
default's GrabCut, with ``init_stride = 1``: OpenCV's own k-means start on every pixel). Prints the median
milliseconds per image and the ratio to the forward pass: first one image at a time, then per image over a batch
of ``--batch`` images labelled side by side by ``pipeline.thread_map`` on ``--threads`` threads, as a run labels
a batch. torch and OpenCV are limited to ``--threads`` threads.
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
    ap.add_argument("--batch", type=int, default=8, help="images per batch for the side-by-side timing")
    args = ap.parse_args()

    import cv2
    import torch

    from segfromxai.boundary import BOUNDARIES, mask_soft
    from segfromxai.model import load_model
    from segfromxai.pipeline import thread_map
    from segfromxai.recipe import load_recipe

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    model = load_model()
    recipe = load_recipe("default")
    x = torch.zeros(1, 3, *model.preprocess.size)
    with torch.no_grad():
        forward = timed(lambda: model.module(x), args.repeats)
    print(f"one forward pass ({model.preprocess.size[0]} px, batch 1): {forward * 1000:.1f} ms")
    for size in args.sizes:
        w, h = (int(v) for v in size.split("x")) if "x" in size else (int(size), int(size))
        image, mask = scene(h, w)
        cell = (h / 14, w / 14)
        print(f"\n{w}x{h}:")
        runs = [(name, method, {}) for name, method in BOUNDARIES.items()]
        default = (f"default ({recipe.boundary.method})", BOUNDARIES[recipe.boundary.method], recipe.boundary.params)
        runs.append(default)
        if recipe.boundary.method == "grabcut":
            runs.append(("  its init_stride = 1", default[1], {**default[2], "init_stride": 1}))
        for name, method, params in runs:
            t = timed(lambda: method(mask_soft(mask, cell), image, **params), args.repeats)
            print(f"  {name:<24} {t * 1000:8.1f} ms  {t / forward:6.2f} x forward")
        print(f"  per image in a batch of {args.batch} on {args.threads} threads:")
        for name, method, params in runs[-2:] if recipe.boundary.method == "grabcut" else runs[-1:]:
            t = timed(lambda: thread_map(lambda _: method(mask_soft(mask, cell), image, **params),
                                         list(range(args.batch)), args.threads), args.repeats) / args.batch
            print(f"  {name:<24} {t * 1000:8.1f} ms  {t / forward:6.2f} x forward")


if __name__ == "__main__":
    main()
