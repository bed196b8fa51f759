"""Images per second of a labelling run (default recipe, embedded model), with the share of time per stage, against
the bare forward+backward passes of the same images measured in the same run.

    .venv/bin/python bench/bench_run.py [--recipe default] [--batch-size 32] [--copies 2] [--threads 2]

The images are the 32 samples in data/samples/images, linked ``--copies`` times into a temporary folder. The run
is :func:`segfromxai.pipeline.run` writing to a temporary folder; the baseline loads and preprocesses the same
images and runs one forward pass plus a backward pass of the summed top-1 logits to the input, batch by batch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from segfromxai.images import find_images, load_image
from segfromxai.model import data_dir, load_model
from segfromxai.engine import run
from segfromxai.recipe import load_recipe


def baseline(model, paths: list[Path], batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        x = model.preprocess.batch([load_image(p) for p in paths[i:i + batch_size]]).requires_grad_(True)
        y = model.module(x)
        torch.autograd.grad(y.gather(1, y.argmax(1, keepdim=True)).sum(), x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    recipe = load_recipe(args.recipe)
    samples = find_images(data_dir() / "samples" / "images")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for c in range(args.copies):
            for p in samples:
                os.symlink(p.resolve(), folder / f"{c}_{p.name}")
        paths = find_images(folder)
        base_s = baseline(model, paths, args.batch_size)
        t0 = time.perf_counter()
        summary = run(recipe, folder, Path(tmp) / "out", model=model, batch_size=args.batch_size)
        run_s = time.perf_counter() - t0
    n = len(paths)
    print(f"recipe {recipe.name!r}, {n} images of data/samples, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {summary['counts']['annotations']} masks")
    print(f"{'':28}{'seconds':>9}{'images/s':>10}{'x baseline':>12}")
    print(f"{'baseline fwd+bwd (+load)':28}{base_s:9.2f}{n / base_s:10.2f}{1.0:12.2f}")
    print(f"{'segfromxai run (all files)':28}{run_s:9.2f}{n / run_s:10.2f}{run_s / base_s:12.2f}")
    total = sum(summary["seconds"].values())
    print("share of the run's time per stage:")
    for stage, s in sorted(summary["seconds"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:12}{s:8.2f} s{100 * s / total:7.1f} %")


if __name__ == "__main__":
    main()
