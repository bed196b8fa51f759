import html
import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from segfromxai.quality.report import Sheet, contact_sheet, write_report

NAMES = ["a/b c.png", "ünïcødé 画像.jpg", 'x<script>alert("1")</script>.png', "plain.png", "d/e/plain.png"]


def _sheet(k, name, *, h=40, w=60, gt=True, heatmap=True):
    image = np.full((h, w, 3), 60 + 20 * k, np.uint8)
    image[h // 4:h // 2, w // 5:w // 2] = (200, 180, 30)
    pred = np.zeros((h, w), bool)
    pred[h // 4:3 * h // 4, w // 4:3 * w // 4] = True
    g = np.zeros((h, w), bool)
    g[h // 5:h // 2, w // 5:w // 2] = True
    yy, xx = np.mgrid[0:5, 0:7]
    heat = (yy + xx) / 10.0
    return Sheet(file_name=name, image=image, pred=pred, gt=g if gt else None, heatmap=heat if heatmap else None,
                 caption=f"IoU {0.1 * k:.3f} · circle")


def _sheets():
    return [_sheet(0, NAMES[0]), _sheet(1, NAMES[1], gt=False), _sheet(2, NAMES[2], heatmap=False),
            _sheet(3, NAMES[3]), _sheet(4, NAMES[4], gt=False, heatmap=False)]


def _write(out):
    sheets = _sheets()
    per_image = [{"file_name": n, "iou": 0.1 * k, "n_pred": k} for k, n in enumerate(NAMES)]
    per_image.append({"file_name": "no_gt.png", "iou": float("nan"), "n_pred": 0})
    return write_report(out, title="Quality <report>", notes=["a note & more"],
                        summary=[{"metric": "mIoU", "value": 0.4567, "average": "per image"},
                                 {"metric": "recall", "value": float("nan"), "average": "pooled"}],
                        per_category=[{"category": "circle", "iou": 0.5, "images": 3}],
                        per_image=per_image, best=sheets[:3], worst=sheets[3:],
                        settings={"recipe": {"threshold": "otsu", "cmd": "segfromxai eval --x '<a>'"},
                                  "versions": {"segfromxai": "0.1.0"}})


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.links, self.cells = [], [], []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href")]
        self._in_td = tag == "td"

    def handle_endtag(self, tag):
        self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def _parse(path):
    p = _Collector()
    p.feed(Path(path).read_text(encoding="utf-8"))
    p.close()
    return p


def test_links_relative_existing_and_offline(tmp_path):
    out = tmp_path / "rep"
    path = _write(out)
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")
    p = _parse(path)
    assert "script" not in p.tags and "link" not in p.tags
    assert len(p.links) == 5 and all(v.startswith("sheets/") for v in p.links)
    for v in p.links:
        u = urlparse(v)
        assert not u.scheme and not u.netloc and not v.startswith("/") and "//" not in v and ".." not in v
        target = (out / v).resolve()
        assert target.is_file() and target.is_relative_to(out.resolve())
    assert sorted(out.joinpath("sheets").iterdir()) == sorted((out / v) for v in p.links)
    assert "http" not in page.lower() and str(tmp_path) not in page
    assert "&lt;script&gt;" in page and "<script" not in page.lower()


def test_sheet_names_sanitised_and_indexed(tmp_path):
    p = _parse(_write(tmp_path))
    names = [v.removeprefix("sheets/") for v in p.links]
    assert names[0] == "000_a_b_c.png" and names[3] == "003_plain.png" and names[4] == "004_d_e_plain.png"
    for k, n in enumerate(names):
        assert n.startswith(f"{k:03d}_") and n.isascii()
        assert all(c.isalnum() or c in "._-" for c in n)


def test_every_image_listed_and_nan_shown_as_na(tmp_path):
    page = _write(tmp_path).read_text(encoding="utf-8")
    for name in NAMES + ["no_gt.png"]:
        assert html.escape(name) in page
    cells = _parse(tmp_path / "report.html").cells
    assert cells[:6] == ["mIoU", "0.457", "per image", "recall", "n/a", "pooled"]
    assert cells[-3:] == ["no_gt.png", "n/a", "0"]
    assert "Quality &lt;report&gt;" in page and "a note &amp; more" in page
    assert "&#x27;&lt;a&gt;&#x27;" in page  # settings JSON escaped inside <pre>
    for heading in ("Summary", "Per category", "Best", "Worst", "Settings", "Per image"):
        assert f"<h2>{heading}</h2>" in page
    assert page.index("<h2>Per image</h2>") > page.index("<h2>Settings</h2>")


def test_per_category_none_and_no_sheets(tmp_path):
    path = write_report(tmp_path, title="t", summary=[], per_category=None, per_image=[{"file_name": "a.png"}],
                        best=[], worst=[], settings={})
    page = path.read_text(encoding="utf-8")
    assert "Per category" not in page and "a.png" in page and "<img" not in page


def test_reproducible_and_relocatable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a)
    first = {p.relative_to(a): p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
    _write(a)
    _write(b)
    for root in (a, b):
        again = {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        assert again == first  # also: no stray temporary files left behind
    assert len(first) == 6


def _tiles(strip, tile):
    gap = (strip.shape[1] - 4 * tile) // 3
    top = strip.shape[0] - tile
    return [strip[top:, k * (tile + gap):k * (tile + gap) + tile] for k in range(4)]


def _content_box(t):
    ys, xs = np.nonzero((t != 255).any(axis=2))
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_contact_sheet_shape_and_dtype():
    strip = contact_sheet(_sheet(0, "x.png"), tile=64)
    assert strip.dtype == np.uint8 and strip.ndim == 3 and strip.shape[2] == 3
    assert strip.shape[0] >= 64 and strip.shape[1] >= 4 * 64
    assert contact_sheet(_sheet(0, "x.png")).shape[1] == strip.shape[1] + 4 * (160 - 64)


@pytest.mark.parametrize("h, w", [(40, 80), (80, 40), (30, 30)])
def test_letterbox_keeps_aspect_ratio(h, w):
    tile = 160
    image = np.full((h, w, 3), 90, np.uint8)  # never the white padding
    s = Sheet("x.png", image, np.zeros((h, w), bool), None, None, "")
    y0, y1, x0, x1 = _content_box(_tiles(contact_sheet(s, tile=tile), tile)[0])
    scale = tile / max(h, w)
    assert (y1 - y0, x1 - x0) == (round(h * scale), round(w * scale))
    assert math.isclose((x1 - x0) / (y1 - y0), w / h)
    assert y0 == (tile - (y1 - y0)) // 2 and x0 == (tile - (x1 - x0)) // 2  # centred


def test_pred_overlay_differs_exactly_where_mask():
    s = _sheet(0, "x.png")  # 40 x 60: with tile 60 no resampling happens
    image, heat, overlay_, gt = _tiles(contact_sheet(s, tile=60), 60)
    inside = np.zeros((60, 60), bool)
    inside[10:50] = s.pred
    assert (image[10:50] == s.image).all()
    assert (overlay_[inside] != image[inside]).any(axis=1).all()
    assert (overlay_[~inside] == image[~inside]).all()
    assert not (heat == image).all() and not (gt == image).all()


def test_missing_map_and_gt_tiles_are_grey():
    s = _sheet(0, "x.png", gt=False, heatmap=False)
    _, heat, _, gt = _tiles(contact_sheet(s, tile=60), 60)
    for t in (heat, gt):
        grey = (t == 200).all(axis=2)
        assert grey.mean() > 0.8 and not grey.all()  # a grey tile with some text on it


def test_heatmap_any_grid_and_bad_shapes():
    s = _sheet(0, "x.png")
    big = Sheet(s.file_name, s.image, s.pred, s.gt, np.random.default_rng(0).random((97, 13)), s.caption)
    assert contact_sheet(big, tile=60).shape == contact_sheet(s, tile=60).shape
    with pytest.raises(ValueError, match="pred"):
        contact_sheet(Sheet("x", s.image, s.pred[:-1], None, None, ""))
    with pytest.raises(ValueError, match="uint8"):
        contact_sheet(Sheet("x", s.image.astype(float), s.pred, None, None, ""))


def test_ground_truth_and_student_are_solid_so_they_show_on_any_image():
    s = _sheet(0, "x.png")  # 40 x 60: with tile 60 no resampling happens
    student = np.zeros((40, 60), bool)
    student[5:20, 30:50] = True
    s = Sheet(s.file_name, s.image, s.pred, s.gt, s.heatmap, s.caption, student)
    strip = contact_sheet(s, tile=60)
    assert strip.shape[1] == 5 * 60 + 4 * 4
    top = strip.shape[0] - 60
    for k, m, colour in ((3, s.gt, (60, 180, 75)), (4, student, (0, 130, 200))):
        t = strip[top:, k * 64:k * 64 + 60][10:50]
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
        assert (t[inner] == colour).all()  # opaque fill, whatever the image's colour
        assert (t[~m] == s.image[~m]).all()
    assert contact_sheet(_sheet(0, "x.png"), tile=60).shape[1] == 4 * 60 + 3 * 4  # no student: four tiles


def test_figures_are_written_and_linked(tmp_path):
    from segfromxai.quality.plots import histogram_svg

    svg = histogram_svg({"pseudo vs GT": [0.1, 0.5, 0.55, float("nan")]})
    path = write_report(tmp_path, title="t", summary=[], per_category=None, per_image=[], best=[], worst=[],
                        settings={}, figures=[("iou histogram", "Per-image IoU", svg)])
    page = path.read_text()
    assert '<img src="figures/iou_histogram.svg" alt="Per-image IoU">' in page
    assert (tmp_path / "figures/iou_histogram.svg").read_text() == svg
    assert page.index("<h2>Figures</h2>") < page.index("<h2>Settings</h2>")
