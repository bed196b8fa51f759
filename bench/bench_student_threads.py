"""Student prediction cost: ``student.predict`` on one thread against its worker threads, in one run.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_student_threads.py --train RUN --images DIR [--limit 32] [--threads 2]
        [--repeats 3] [--boundary grabcut]

Trains a linear student (one round, 5 epochs; untimed) on the pseudo-labels of the run folder ``RUN`` and predicts
the first ``--limit`` images under ``--images`` (the training run's images are held out as ``student`` does), with
the boundary method ``--boundary`` (default: the training run's recipe's). Times ``predict`` (probabilities, image
reads, boundary stage, cleaning, no COCO writing) with ``workers = 1`` and ``workers = --threads`` side by side,
median of ``--repeats``, and checks both give the same records. torch and OpenCV are limited to ``--threads``
threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--boundary", default=None)
    args = p.parse_args()

    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from segfromxai.models.model import load_model
    from segfromxai.student.config import StudentConfig
    from segfromxai.student.job import prepare, run_round
    from segfromxai.student.predict import predict
    from segfromxai.student.tokens import Tokens

    model = load_model()
    config = StudentConfig(epochs=5, boundary=args.boundary)
    with tempfile.TemporaryDirectory() as tmp:
        job = prepare(args.train, args.images, model=model, config=config)
        head = run_round(job, 1, "bench", Path(tmp), model=model, config=config)
    n = min(args.limit, len(job.test.names))
    t = job.test
    test = Tokens(t.names[:n], t.sizes[:n], t.grid[:n], t.probs[:n], t.root)
    rows, records = {}, {}
    for workers in (1, args.threads):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            records[workers] = predict(head, test, job.labeller, workers=workers)
            times.append(time.perf_counter() - t0)
        rows[workers] = statistics.median(times) / n
    same = records[1] == records[args.threads]
    print(f"{n} images, boundary {job.labeller.boundary}, torch threads {args.threads}; same records: {same}")
    for workers, s in rows.items():
        print(f"workers {workers}: {1000 * s:.1f} ms per image ({rows[1] / s:.2f}x workers 1)")


if __name__ == "__main__":
    main()
