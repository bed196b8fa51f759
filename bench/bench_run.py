"""Labelling runs (default recipe and Grad-CAM alone, embedded model) against the bare forward+backward passes of the
same images measured in the same run: seconds, ratio to the baseline, peak resident memory, share of time per stage.

    .venv/bin/python bench/bench_run.py [--recipes default vitmix/gradcam] [--batch-size N] [--copies 1] [--threads 2]

Ratios are printed for wall seconds and, in brackets, for CPU seconds (the process's, children's DataLoader workers
not counted: keep the default 0 workers); with one thread on a machine other jobs share, the CPU ratio is the steadier.
The baseline is timed before and after the runs and the better of the two counts.

The images are the 32 samples in data/samples/images (or those under ``--images``), linked ``--copies`` times into a
temporary folder. Each run is :func:`segfromxai.run.local.run` (load, explain, fuse, cut, encode, write) at
``--batch-size`` (default: the run's own default) in a fresh process, so its peak RSS (VmHWM) is the run's, model
included; the resident memory after the first and after the last chunk shows whether it stays flat. The baseline loads
and preprocesses the same images and runs one forward pass plus a backward pass of the summed top-1 logits to the
input, batch by batch, in this process.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from segfromxai.run.local import peak_rss_mb, run
from segfromxai.io.images import find_images, load_image
from segfromxai.models.model import data_dir, load_model
from segfromxai.recipe.recipe import load_recipe


def baseline(model, paths: list[Path], batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds of loading the images and one forward+backward to the input, batch by batch."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(paths), batch_size):
        x = model.preprocess.batch([load_image(p) for p in paths[i:i + batch_size]]).requires_grad_(True)
        y = model.module(x)
        torch.autograd.grad(y.gather(1, y.argmax(1, keepdim=True)).sum(), x)
    return time.perf_counter() - t0, time.process_time() - c0


def rss_mb() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def child(recipe_name: str, folder: str, out: str, batch_size: int) -> None:
    """One run in this (fresh) process; prints its figures as one JSON line."""
    model = load_model()
    rss: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run(load_recipe(recipe_name), folder, out, model=model, batch_size=batch_size,
                  progress=lambda advance, total: rss.append(rss_mb()))
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                      "stages": summary["seconds"], "peak_rss_mb": peak_rss_mb(),
                      "rss_first_chunk": rss[1] if len(rss) > 1 else None, "rss_last_chunk": rss[-1],
                      "masks": summary["counts"]["annotations"]}))


def run_child(recipe: str, folder: Path, out: Path, batch_size: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", recipe, str(folder), str(out), str(batch_size), str(threads)]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if got.returncode:
        raise RuntimeError(f"run of {recipe!r} failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["default", "vitmix/gradcam"])
    ap.add_argument("--batch-size", type=int, default=inspect.signature(run).parameters["batch_size"].default)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", default=None, help="image folder (default: data/samples/images), e.g. the photos of "
                    "`make real-bench`")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(int(args.child[4]))
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    torch.set_num_threads(args.threads)
    model = load_model()
    source = Path(args.images) if args.images else data_dir() / "samples" / "images"
    samples = find_images(source)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for c in range(args.copies):
            for p in samples:
                os.symlink(p.resolve(), folder / f"{c}_{p.name}")
        paths = find_images(folder)
        before = baseline(model, paths, args.batch_size)
        runs = {r: run_child(r, folder, Path(tmp) / f"out{k}", args.batch_size, args.threads)
                for k, r in enumerate(args.recipes)}
        after = baseline(model, paths, args.batch_size)
    # the better of before and after the runs: on a shared machine the load drifts
    base_s, base_cpu = min(before[0], after[0]), min(before[1], after[1])
    n = len(paths)
    print(f"{n} images of {source}, batch {args.batch_size}, {args.threads} threads; each run in a fresh process; "
          "x baseline: wall seconds (CPU seconds) over the baseline's")
    print(f"{'':34}{'seconds':>9}{'images/s':>10}{'x baseline':>16}{'peak RSS MB':>13}{'RSS 1st/last chunk':>20}")
    print(f"{'baseline fwd+bwd (+load)':34}{base_s:9.2f}{n / base_s:10.2f}{'1.00 (1.00)':>16}")
    for name, r in runs.items():
        first = "-" if r["rss_first_chunk"] is None else f"{r['rss_first_chunk']:.0f}"
        chunks = f"{first} / {r['rss_last_chunk']:.0f}"
        ratio = f"{r['seconds'] / base_s:.2f} ({r['cpu_seconds'] / base_cpu:.2f})"
        print(f"{'run ' + name + ' (' + str(r['masks']) + ' masks)':34}{r['seconds']:9.2f}{n / r['seconds']:10.2f}"
              f"{ratio:>16}{r['peak_rss_mb']:13.0f}{chunks:>20}")
    for name, r in runs.items():
        total = sum(r["stages"].values())
        shares = ", ".join(f"{stage} {100 * s / total:.0f} %" for stage, s in sorted(r["stages"].items(),
                                                                                    key=lambda kv: -kv[1]))
        print(f"share of the {name!r} run's time per stage: {shares}")


if __name__ == "__main__":
    main()
