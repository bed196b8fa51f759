"""The hand-written SVG charts: valid XML, the right bar heights and point positions, NaN left out."""

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from segfromxai.quality.plots import histogram_svg, scatter_svg

NS = "{http://www.w3.org/2000/svg}"


def _rects(svg):
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg" and root.get("width") and root.get("height")
    return [r for r in root.iter(f"{NS}rect") if r.find(f"{NS}title") is not None]


def test_histogram_bars_count_the_values_of_each_bin():
    values = [0.05, 0.05, 0.15, 0.95, 1.0, float("nan")]
    bars = _rects(histogram_svg({"a": values}, bins=10))
    counts = sorted(int(r.find(f"{NS}title").text) for r in bars)
    assert counts == sorted(c for c in np.histogram(values[:-1], bins=10, range=(0, 1))[0] if c)
    heights = {int(r.find(f"{NS}title").text): float(r.get("height")) for r in bars}
    assert heights[2] == pytest.approx(2 * heights[1], abs=0.2)  # bar height proportional to the count
    assert "a (n=5)" in histogram_svg({"a": values})  # NaN left out of n


def test_histogram_two_series_side_by_side_and_empty_series():
    svg = histogram_svg({"one": [0.5], "two": [0.5], "none": []})
    bars = _rects(svg)
    assert len(bars) == 2 and bars[0].get("x") != bars[1].get("x") and bars[0].get("fill") != bars[1].get("fill")
    assert "none (n=0)" in svg


def test_scatter_places_points_by_value_and_skips_nan():
    svg = scatter_svg([("fast", 0.5, 0.25), ("slow", 2.0, 1.0), ("broken", math.nan, 0.5)])
    root = ET.fromstring(svg)
    dots = {c.find(f"{NS}title").text.split(":")[0]: (float(c.get("cx")), float(c.get("cy")))
            for c in root.iter(f"{NS}circle")}
    assert set(dots) == {"fast", "slow"}
    (x1, y1), (x2, y2) = dots["fast"], dots["slow"]
    assert x2 > x1 and y2 < y1  # right is slower, up is better
    assert "broken" not in svg and "&lt;" in scatter_svg([("<r>", 1.0, 0.5)])
