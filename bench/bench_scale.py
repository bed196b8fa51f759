"""Throughput of the engines and memory over a long run, measured side by side in one process.

    .venv/bin/python bench/bench_scale.py [--recipe vitmix/gradcam] [--images 256] [--memory-images 2000]

1. Images per second of `run` on the embedded model over ``--images`` images (the 32 samples linked many times):
   the local engine with 0 workers (loading in the main process), 1 and 2 workers, and the Ray engine on a local
   Ray cluster (``ray.init(num_cpus=<cores>)``), same recipe and batch size. Ratios are against 0 workers.
2. In a fresh process (so nothing measured before counts): peak resident memory (VmHWM) and current resident memory
   (VmRSS) of one local run over ``--memory-images`` images, read when 500 images are done and at the end (after
   the COCO file is written). Flat memory: the ratios stay near 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from segfromxai.io.images import find_images
from segfromxai.models.model import data_dir, load_model
from segfromxai.run.local import run
from segfromxai.recipe.recipe import load_recipe


def link_samples(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    samples = find_images(data_dir() / "samples" / "images")
    for k in range(n):
        p = samples[k % len(samples)]
        os.symlink(p.resolve(), folder / f"{k:06d}{p.suffix}")
    return folder


def rss_mib() -> tuple[float, float]:
    """(peak, current) resident memory of this process in MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def memory(recipe_name: str, n: int, batch_size: int) -> None:
    recipe, model = load_recipe(recipe_name), load_model()
    with tempfile.TemporaryDirectory() as tmp:
        many = link_samples(Path(tmp) / "many", n)
        marks = {}
        seen = [0]

        def progress(advance: int, total: int) -> None:
            seen[0] += advance
            if seen[0] >= 500 and 500 not in marks:
                marks[500] = rss_mib()

        t0 = time.perf_counter()
        run(recipe, many, Path(tmp) / "out", model=model, batch_size=batch_size, progress=progress)
        marks[n] = rss_mib()
    (p5, c5), (pn, cn) = marks[500], marks[n]
    print(f"memory over {n} images ({time.perf_counter() - t0:.0f} s, fresh process): peak {p5:.0f} MiB at 500, "
          f"{pn:.0f} MiB at {n} (x{pn / p5:.3f}); current {c5:.0f} MiB at 500, {cn:.0f} MiB at {n} "
          f"(x{cn / c5:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="vitmix/gradcam")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--memory-images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--part", choices=("all", "rates", "memory"), default="all")
    args = ap.parse_args()
    if args.part == "memory":
        return memory(args.recipe, args.memory_images, args.batch_size)
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

            from segfromxai.run.ray import run_ray

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

    if args.part == "all":
        subprocess.run([sys.executable, __file__, "--part", "memory", "--recipe", args.recipe, "--memory-images",
                        str(args.memory_images), "--batch-size", str(args.batch_size)], check=True)


if __name__ == "__main__":
    main()
