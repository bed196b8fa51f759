"""Small SVG charts for the HTML reports, written by hand (no plotting dependency, byte-identical output).

Both functions return the text of a standalone SVG file with ``width`` and ``height`` set, so it shows as an
``<img>`` and opens in any browser.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np

PALETTE = ("#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6", "#d2f53c")
_W, _H = 560, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 32, 48


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _frame(title: str, xlabel: str, ylabel: str, legend_rows: int = 0) -> list[str]:
    """The SVG head, white background, title and axis labels; ``legend_rows`` rows of 14 px added at the bottom."""
    h = _H + (14 * legend_rows + 6 if legend_rows else 0)
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{h}" viewBox="0 0 {_W} {h}" '
            'font-family="sans-serif" font-size="11">',
            f'<rect width="{_W}" height="{h}" fill="#fff"/>',
            f'<text x="{_W / 2:g}" y="18" text-anchor="middle" font-size="13">{_e(title)}</text>',
            f'<text x="{(_LEFT + _W - _RIGHT) / 2:g}" y="{_H - 8}" text-anchor="middle">{_e(xlabel)}</text>',
            f'<text x="14" y="{(_TOP + _H - _BOTTOM) / 2:g}" text-anchor="middle" '
            f'transform="rotate(-90 14 {(_TOP + _H - _BOTTOM) / 2:g})">{_e(ylabel)}</text>']


def _axes(xticks: Sequence[float], yticks: Sequence[float], x, y) -> list[str]:
    """Axis lines, ticks and grid; ``x``/``y`` map data to pixels."""
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP
    out = [f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#000"/>',
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#000"/>']
    for t in xticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{y0}" x2="{x(t):.1f}" y2="{y0 + 4}" stroke="#000"/>'
                   f'<text x="{x(t):.1f}" y="{y0 + 16}" text-anchor="middle">{t:g}</text>')
    for t in yticks:
        out.append(f'<line x1="{x0}" y1="{y(t):.1f}" x2="{x1}" y2="{y(t):.1f}" stroke="#ddd"/>'
                   f'<text x="{x0 - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    return out


def _ticks(top: float, n: int = 5) -> list[float]:
    """About ``n`` round ticks from 0 to at least ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    step = 10 ** math.floor(math.log10(top / n))
    for m in (1, 2, 2.5, 5, 10):
        if top / (m * step) <= n:
            step *= m
            break
    return [round(k * step, 10) for k in range(int(math.ceil(top / step)) + 1)]


def _legend(names: Sequence[str]) -> list[str]:
    """One row per series under the axis label, clear of the bars."""
    out = []
    for k, name in enumerate(names):
        yy = _H + 14 * k
        out.append(f'<rect x="{_LEFT + 24}" y="{yy}" width="10" height="10" fill="{PALETTE[k % 8]}"/>'
                   f'<text x="{_LEFT + 38}" y="{yy + 9}">{_e(name)}</text>')
    return out


def histogram_svg(values: dict[str, Sequence[float]], *, bins: int = 10, title: str = "Per-image IoU",
                  xlabel: str = "IoU") -> str:
    """Histogram of values in [0, 1], one colour per series (bars side by side within a bin).

    Parameters
    ----------
    values : dict of str to sequence of float
        Series name (e.g. a comparison, ``"pseudo vs GT"``) -> values; NaN values are left out and counted in
        the legend (``n`` = values drawn).
    bins : int
        Equal bins over [0, 1]; the last bin includes 1.

    Returns
    -------
    str
        SVG text.
    """
    counts = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[~np.isnan(v)]
        counts[f"{name} (n={v.size})"] = np.histogram(np.clip(v, 0, 1), bins=bins, range=(0.0, 1.0))[0]
    top = max([int(c.max()) for c in counts.values() if c.size] + [1])
    yt = [t for t in _ticks(top) if t == int(t)] or [0, 1]
    ymax = max(yt[-1], top)
    x = lambda t: _LEFT + t * (_W - _LEFT - _RIGHT)  # noqa: E731
    y = lambda t: _H - _BOTTOM - t / ymax * (_H - _TOP - _BOTTOM)  # noqa: E731
    out = _frame(title, xlabel, "images", legend_rows=len(counts)) + _axes([k / 5 for k in range(6)], yt, x, y)
    width = (x(1) - x(0)) / bins / max(1, len(counts))
    for s, c in enumerate(counts.values()):
        for b, n in enumerate(c):
            if n:
                left = x(b / bins) + s * width
                out.append(f'<rect x="{left:.1f}" y="{y(n):.1f}" width="{max(width - 1, 1):.1f}" '
                           f'height="{y(0) - y(n):.1f}" fill="{PALETTE[s % 8]}"><title>{int(n)}</title></rect>')
    out += _legend(list(counts)) + ["</svg>"]
    return "\n".join(out) + "\n"


def scatter_svg(points: Sequence[tuple[str, float, float]], *, title: str = "IoU against time per image",
                xlabel: str = "seconds per image", ylabel: str = "IoU (per-image mean)") -> str:
    """One labelled point per (name, x, y), x from 0 to the largest x, y over [0, 1]; NaN points are left out.

    Returns
    -------
    str
        SVG text.
    """
    pts = [(n, float(a), float(b)) for n, a, b in points if not (math.isnan(float(a)) or math.isnan(float(b)))]
    xt = _ticks(max([a for _, a, _ in pts] + [0.0]) or 1.0)
    x = lambda t: _LEFT + t / xt[-1] * (_W - _LEFT - _RIGHT)  # noqa: E731
    y = lambda t: _H - _BOTTOM - t * (_H - _TOP - _BOTTOM)  # noqa: E731
    out = _frame(title, xlabel, ylabel) + _axes(xt, [k / 5 for k in range(6)], x, y)
    for k, (name, a, b) in enumerate(pts):
        out.append(f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="4" fill="{PALETTE[k % 8]}"><title>{_e(name)}: '
                   f'{b:.3f} at {a:.3g} s</title></circle>'
                   + (f'<text x="{x(a) - 6:.1f}" y="{y(b) - 6:.1f}" font-size="10" text-anchor="end">'
                      if a > 0.6 * xt[-1] else f'<text x="{x(a) + 6:.1f}" y="{y(b) - 6:.1f}" font-size="10">')
                   + f"{_e(name)}</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
