"""Throughput of the engines and memory over a long run, measured side by side in one process.

    .venv/bin/python bench/bench_scale.py [--recipe vitmix/gradcam] [--images 256] [--memory-images 2000]

1. Images per second of `run` on the embedded model over ``--images`` images (the 32 samples linked many times):
   the local engine with 0 workers (loading in the main process), 1 and 2 workers, and the Ray engine on a local
   Ray cluster (``ray.init(num_cpus=<cores>)``), same recipe and batch size. Ratios are against 0 workers.
2. Peak resident memory (ru_maxrss) of one local run over ``--memory-images`` images, read when 500 images are done
   and at the end (after the COCO file is written). Flat memory: the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from segfromxai.images import find_images
from segfromxai.model import data_dir, load_model
from segfromxai.pipeline import run
from segfromxai.recipe import load_recipe


def link_samples(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    samples = find_images(data_dir() / "samples" / "images")
    for k in range(n):
        p = samples[k % len(samples)]
        os.symlink(p.resolve(), folder / f"{k:06d}{p.suffix}")
    return folder


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="vitmix/gradcam")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--memory-images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    recipe, model = load_recipe(args.recipe), load_model()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = link_samples(tmp / "images", args.images)
        rates = {}
        for workers in (0, 1, 2):
            t0 = time.perf_counter()
            run(recipe, images, tmp / f"w{workers}", model=model, batch_size=args.batch_size, workers=workers)
            rates[f"local, {workers} workers"] = args.images / (time.perf_counter() - t0)
        if not args.skip_ray:
            import ray

            from segfromxai.engine_ray import run_ray

            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            t0 = time.perf_counter()
            run_ray(recipe, images, tmp / "ray", model=model, model_args={}, batch_size=args.batch_size)
            rates[f"ray, local cluster of {cores} CPUs"] = args.images / (time.perf_counter() - t0)
            ray.shutdown()
        print(f"recipe {recipe.name!r}, {args.images} images, batch {args.batch_size}, {cores} cores, "
              f"torch threads {torch.get_num_threads()}")
        base = rates["local, 0 workers"]
        for name, r in rates.items():
            print(f"  {name:<32} {r:7.2f} images/s   x{r / base:.2f}")

        many = link_samples(tmp / "many", args.memory_images)
        marks = {}

        def progress(advance: int, total: int, seen=[0]) -> None:  # noqa: B006 - a counter local to this run
            seen[0] += advance
            if seen[0] >= 500 and 500 not in marks:
                marks[500] = peak_mib()

        t0 = time.perf_counter()
        run(recipe, many, tmp / "many_out", model=model, batch_size=args.batch_size, progress=progress)
        marks[args.memory_images] = peak_mib()
        print(f"peak RSS over {args.memory_images} images ({time.perf_counter() - t0:.0f} s): "
              f"{marks[500]:.0f} MiB at 500, {marks[args.memory_images]:.0f} MiB at {args.memory_images} "
              f"(x{marks[args.memory_images] / marks[500]:.3f})")


if __name__ == "__main__":
    main()
