"""Normalized-cut speed: ``ncut_bipartition(solver="lanczos")`` against dense generalized eigh, in one run.

    .venv/bin/python bench/bench_ncut.py [--grids 14 60] [--channels 384 64] [--repeats 3] [--threads 2]

Features: a (g, g) token grid with three spatial clusters (background, a disc, a rectangle); each token is its
cluster's random centre (C normal entries) plus unit normal noise per channel, so the cosine is about 0.5 inside a
cluster and about 0 +- 1/sqrt(C) across, and the tau = 0.2 graph has both kinds of edges. Baselines, on the same
graph: ``scipy.linalg.eigh(D - W, D)`` (all eigenpairs; the second eigenvector is taken) and the same with
``subset_by_index=[1, 1]``. Every timing includes building the graph from the features (also printed alone).
Prints the median seconds per image, the speed-up of Lanczos over each baseline, and whether the bipartition
``y > mean(y)`` is the same (as an unordered pair of sides) with the D-inner-product |cosine| of the eigenvectors.
Threads: threadpoolctl limits the BLAS pools when installed, else OMP/OPENBLAS/MKL_NUM_THREADS are set before NumPy
is imported (torch is not used here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def timed(fn, repeats: int):
    out = fn()  # warm-up, and the result to compare
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def features(g: int, channels: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    rr, cc = (np.mgrid[0:g, 0:g] + 0.5) / g
    label = np.zeros((g, g), dtype=int)
    label[(rr - 0.35) ** 2 + (cc - 0.3) ** 2 < 0.2**2] = 1
    label[(rr > 0.55) & (rr < 0.9) & (cc > 0.5) & (cc < 0.9)] = 2
    x = rng.standard_normal((3, channels))[label] + rng.standard_normal((g, g, channels))
    return x.reshape(g * g, channels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[14, 60], help="grid sides g (N = g * g tokens)")
    ap.add_argument("--channels", type=int, nargs="+", default=[384, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tau", type=float, default=0.2)
    args = ap.parse_args()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import numpy as np
    import scipy
    import scipy.linalg

    from segfromxai.stages.refine import affinity, ncut_bipartition

    limits = threadpool_limits(args.threads) if threadpool_limits else None
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, {args.threads} threads "
          f"({'threadpoolctl' if limits else 'environment'}), median of {args.repeats}, tau {args.tau}")

    def dense_full(x):
        w = affinity(x, tau=args.tau)
        d = np.diag(w.sum(axis=1))
        return scipy.linalg.eigh(d - w, d)[1][:, 1]

    header = (f"{'N':>6} {'C':>5} {'edges':>6} {'graph s':>8} {'lanczos s':>10} {'eigh full s':>12} "
              f"{'eigh [1,1] s':>13} {'x full':>8} {'x [1,1]':>8} {'same split':>11} {'|cos|_D':>9}")
    print(header)
    for g in args.grids:
        for c in args.channels:
            x = features(g, c)
            t_graph, w = timed(lambda: affinity(x, tau=args.tau), args.repeats)
            d = w.sum(axis=1)
            t_lz, (y, split) = timed(lambda: ncut_bipartition(x, tau=args.tau, solver="lanczos"), args.repeats)
            t_full, y_full = timed(lambda: dense_full(x), args.repeats)
            t_sub, (y_sub, _) = timed(lambda: ncut_bipartition(x, tau=args.tau, solver="dense"), args.repeats)
            side = y > split
            same = all(np.array_equal(side, r > r.mean()) or np.array_equal(side, r <= r.mean())
                       for r in (y_full, y_sub))
            cos = min(abs(y @ (d * r)) / np.sqrt((y @ (d * y)) * (r @ (d * r))) for r in (y_full, y_sub))
            print(f"{g * g:6d} {c:5d} {float((w == 1).mean()):6.2f} {t_graph:8.3f} {t_lz:10.3f} {t_full:12.3f} "
                  f"{t_sub:13.3f} {t_full / t_lz:8.1f} {t_sub / t_lz:8.1f} {str(same):>11} {cos:9.6f}")
    if limits is not None:
        limits.restore_original_limits()


if __name__ == "__main__":
    main()
