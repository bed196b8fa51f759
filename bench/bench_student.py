"""Student labelling against the default recipe on the same images, in one run: images/s of each and their ratio.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_student.py --student S [--images data/samples/images] [--limit 8]
        [--threads 2] [--batch-size 8] [--repeats 1] [--float32-too]

``S`` is a trained student (the folder ``segfromxai student`` wrote, a ``round_<r>`` folder or its ``card.json``).
Both sides label the first ``--limit`` images of ``--images`` end to end into a temporary folder, as their
commands do: the recipe with :func:`segfromxai.run.local.run` (``load_recipe("default")``, the embedded model in
``data/model``; explain, fuse, cut, boundary, encode, write), the student with
:func:`segfromxai.student.label.label_folder` (image reads, the trunk's tokens at the student's input size, the
classifier's pass for the category, the head, the boundary stage, cleaning, encode, write). Loading the models is
not timed, nor is one image labelled by each first (lazy loads and first calls). With ``--repeats`` > 1 the two
alternate (recipe, student, recipe, ...) and each keeps its fastest repeat. Wall and CPU seconds (this process's)
and each side's seconds by stage (its ``run.json``) are printed; torch and OpenCV get ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[Path], dict]) -> tuple[float, float, dict]:
    """(wall, CPU) seconds of ``fn(out)`` into a fresh temporary folder, and its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = fn(Path(tmp) / "out")
        return time.perf_counter() - t0, time.process_time() - c0, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True)
    p.add_argument("--images", default=str(ROOT / "data" / "samples" / "images"))
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="the student's chunk (the recipe runs at its default, 2)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--float32-too", action="store_true",
                   help="also time the student with its trunk in float32 (where the card's auto picks bfloat16)")
    args = p.parse_args()

    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from segfromxai.models.model import load_model
    from segfromxai.recipe.recipe import load_recipe
    from segfromxai.run.local import run
    from segfromxai.student.label import label_folder, open_student

    model, recipe, student = load_model(), load_recipe("default"), open_student(args.student)
    students = {"student": student}
    if args.float32_too and student.bf16:
        students["student float32"] = dataclasses.replace(student, bf16=False)
    sides = {"default recipe": lambda out: run(recipe, args.images, out, model=model, limit=args.limit)}
    for name, s in students.items():
        sides[name] = lambda out, s=s: label_folder(s, args.images, out, batch_size=args.batch_size, limit=args.limit)
    for name in sides:  # untimed warm-up on one image: lazy loads (feature backbone, first calls) out of the numbers
        with tempfile.TemporaryDirectory() as tmp:
            (run(recipe, args.images, Path(tmp), model=model, limit=1) if name == "default recipe" else
             label_folder(students[name], args.images, Path(tmp), limit=1))
    best: dict[str, tuple[float, float, dict]] = {}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            got = timed(fn)
            if name not in best or got[0] < best[name][0]:
                best[name] = got
    n = {name: s["counts"]["found"] for name, (_, _, s) in best.items()}
    card = student.card
    print(f"{n['student']} images of {args.images}, torch threads {args.threads}; student: {card['config']['head']} "
          f"head, trunk {card['trunk']} at {card['input_size'][0]} px, last {card['config'].get('blocks', 1)} "
          f"block(s), {'bfloat16' if student.bf16 else 'float32'}, boundary {student.labeller.boundary}")
    print(f"{'':<16}{'wall s':>9}{'CPU s':>9}{'images/s':>10}{'masks':>7}")
    for name, (wall, cpu, s) in best.items():
        print(f"{name:<16}{wall:>9.2f}{cpu:>9.2f}{n[name] / wall:>10.3f}{s['counts']['annotations']:>7}")
    for name, (_, _, s) in best.items():
        stages = sorted(s["seconds"].items(), key=lambda kv: -kv[1])
        print(f"{name} seconds by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in stages))
    rw, rc, _ = best["default recipe"]
    for name in students:
        sw, sc, _ = best[name]
        print(f"{name} / default recipe: {rw / sw:.2f}x images/s (wall), {rc / sc:.2f}x (CPU)")


if __name__ == "__main__":
    main()
