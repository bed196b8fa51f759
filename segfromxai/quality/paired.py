"""Paired evidence for comparing two recipes on the same images: the mean per-image difference with a paired
bootstrap interval, wins and losses beyond a margin, and per-subset means.

The interval is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) of the mean of the per-image differences
``b - a``: the images (pairs) are resampled with replacement ``resamples`` times (default 10,000) by
``numpy.random.default_rng(seed)`` (default seed 0) in one ``integers(0, n, (resamples, n))`` draw, and the 2.5th and
97.5th percentiles (numpy's linear interpolation) of the resampled means are the 95% interval. A pair where either
value is NaN (undefined, e.g. the IoU of two empty masks) is left out before anything is counted.

A subset of a ground-truth image is its entry's ``subset`` field, else its ``source`` field, else the prefix of its
file name (the base name) before the first ``_`` (the whole stem when there is none).
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from .metrics import finite_mean

RESAMPLES = 10_000
SEED = 0
MARGIN = 0.02


class Paired(NamedTuple):
    """The paired comparison of ``b`` against ``a``: the mean of ``b - a``, its 95% bootstrap interval, and the
    number of pairs where ``b`` is better (``b - a > margin``) or worse (``b - a < -margin``)."""

    mean_diff: float
    lo: float
    hi: float
    wins: int
    losses: int


def finite_pairs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """``b - a`` as float64 over the pairs where both are finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D sequences of one length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    return b[keep] - a[keep]


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                     margin: float = MARGIN, level: float = 0.95) -> Paired:
    """Mean paired difference ``b - a`` with a percentile bootstrap interval (see the module docstring).

    Parameters
    ----------
    a, b : sequences of float, one value per image (e.g. per-image IoU of a baseline and of a candidate); NaN pairs
        are left out.
    resamples : number of bootstrap resamples (>= 1); memory is ``resamples x n`` int64 indices.
    seed : seed of ``numpy.random.default_rng``.
    margin : a pair counts as a win when ``b - a > margin``, a loss when ``b - a < -margin``.
    level : the interval's coverage (0.95: the 2.5th and 97.5th percentiles).

    Returns
    -------
    Paired ``(mean_diff, lo, hi, wins, losses)``; NaN mean and interval (0 wins, 0 losses) when no pair is finite.
    Higher is better for ``b`` when the values are (IoU).
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    d = finite_pairs(a, b)
    if d.size == 0:
        return Paired(math.nan, math.nan, math.nan, 0, 0)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, (resamples, d.size))].mean(1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    return Paired(float(d.mean()), float(lo), float(hi), int((d > margin).sum()), int((d < -margin).sum()))


def subset_of(file_name: str, entry: dict[str, Any] | None = None) -> str:
    """The subset of a ground-truth image: ``entry["subset"]``, else the base file name's prefix before the first
    ``_``, else ``""`` (no subset: a name without ``_``, such as synth's ``000042.png``). A ``source`` field is not
    used: in the sets we know it names the file's origin (a path, a repository), one per image."""
    entry = entry or {}
    if entry.get("subset"):
        return str(entry["subset"])
    stem = PurePosixPath(file_name).stem
    return stem.split("_", 1)[0] if "_" in stem else ""


def paired_rows(per_image: list[dict[str, Any]], recipes: Sequence[str], *, key: str = "iou",
                resamples: int = RESAMPLES, seed: int = SEED, margin: float = MARGIN) -> list[dict[str, Any]]:
    """One row per recipe after the first: its paired comparison against ``recipes[0]`` on ``key`` over the images
    both scored (``per_image``: rows with ``file_name``, ``recipe`` and ``key``). Row keys: ``recipe``,
    ``baseline``, ``n`` (pairs used), ``mean_diff``, ``lo``, ``hi``, ``better``, ``worse``."""
    values: dict[str, dict[str, float]] = {}
    for row in per_image:
        values.setdefault(row["recipe"], {})[row["file_name"]] = row[key]
    base = values.get(recipes[0], {})
    files = sorted(base)
    out = []
    for name in recipes[1:]:
        a = [base[f] for f in files]
        b = [values.get(name, {}).get(f, math.nan) for f in files]
        p = paired_bootstrap(a, b, resamples=resamples, seed=seed, margin=margin)
        out.append({"recipe": name, "baseline": recipes[0], "n": int(finite_pairs(a, b).size),
                    "mean_diff": p.mean_diff, "lo": p.lo, "hi": p.hi, "better": p.wins, "worse": p.losses})
    return out


def subset_rows(per_image: list[dict[str, Any]], recipes: Sequence[str], *, key: str = "iou"
                ) -> list[dict[str, Any]]:
    """Per-image mean of ``key`` of every recipe per subset (rows need ``subset``; ``""``: none), then over ``all``: rows with
    ``subset``, ``images`` (images in the subset) and one column per recipe (mean over images where it is
    defined)."""
    subsets = sorted({row["subset"] for row in per_image} - {""})  # images without a subset count in "all" only
    out = []
    for s in [*subsets, "all"]:
        rows = [r for r in per_image if s == "all" or r["subset"] == s]
        out.append({"subset": s, "images": len({r["file_name"] for r in rows}),
                    **{name: finite_mean(r[key] for r in rows if r["recipe"] == name) for name in recipes}})
    return out


def _num(v: float, spec: str) -> str:
    return "n/a" if math.isnan(v) else format(v, spec)


def format_evidence(paired: list[dict[str, Any]], subsets: list[dict[str, Any]], recipes: Iterable[str], *,
                    resamples: int = RESAMPLES, seed: int = SEED, margin: float = MARGIN) -> str:
    """The paired table (every recipe against the first) and the per-subset table as plain text (NaN as n/a)."""
    recipes = list(recipes)
    lines = []
    if paired:
        lines.append(f"paired per-image IoU difference against {recipes[0]} (bootstrap 95% interval, {resamples} "
                     f"resamples, seed {seed}; better/worse: by more than {margin})")
        head = f"{'recipe':<32} {'n':>4} {'mean dIoU':>9} {'95% interval':>18} {'better':>6} {'worse':>6}"
        lines += [head, "-" * len(head)]
        for r in paired:
            interval = f"[{_num(r['lo'], '+.3f')}, {_num(r['hi'], '+.3f')}]"
            lines.append(f"{r['recipe'][:32]:<32} {r['n']:>4} {_num(r['mean_diff'], '+.3f'):>9} {interval:>18} "
                         f"{r['better']:>6} {r['worse']:>6}")
    width = max([6, *(len(r["subset"]) for r in subsets)])
    head = f"{'subset':<{width}} {'images':>6} " + " ".join(f"{name[:16]:>16}" for name in recipes)
    lines += ["mean IoU per subset (per image)", head, "-" * len(head)]
    for r in subsets:
        lines.append(f"{r['subset']:<{width}} {r['images']:>6} "
                     + " ".join(f"{_num(r[name], '.3f'):>16}" for name in recipes))
    return "\n".join(lines)
