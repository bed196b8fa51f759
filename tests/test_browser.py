"""The HTML reports in a real browser: headless Chromium opens report.html and compare.svg, and every image loads.

Needs Debian's `chromium` (`apt-get install chromium`, which `.ci/run` does when it is absent). Without it the tests
skip with the reason on a developer's machine, and fail when the environment variable ``CI`` is set, so CI never
reports them skipped.
"""

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segfromxai.cli import main
from segfromxai.io.coco import write_coco
from segfromxai.quality.compare import write_comparison
from segfromxai.ops.masks import encode

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
NO_BROWSER = "no headless browser: Debian's chromium is not installed (apt-get install chromium)"


def need_browser() -> str:
    """The browser's path; without one, skip (fail under CI, where .ci/run installs it). Called first by each test."""
    if BROWSER is None:
        if os.environ.get("CI"):
            pytest.fail(f"{NO_BROWSER}, and CI is set: .ci/run installs it; run that, or install it")
        pytest.skip(f"{NO_BROWSER}; the browser check is optional outside CI")
    return BROWSER

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const bad = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: images.length, bad: bad, title: document.title,
                                    h2: [...document.querySelectorAll("h2")].map(h => h.textContent)});
  document.body.appendChild(out);
});
</script>
"""


def load_in_browser(page):
    """Open a copy of ``page`` with a probe script added (the report itself runs no script) in headless Chromium;
    return what the probe saw after the load event: the number of images, those that did not load, headings."""
    probe = page.with_name("_probe_" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    probe.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page did not load: {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def _sources(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    pred, gt, student = [], [], []
    for k in range(8):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"img{k}.jpg")
        m = np.zeros((24, 32), bool)
        m[4:4 + 2 * k + 2, 6:20] = True
        image = {"id": k + 1, "file_name": f"img{k}.jpg", "height": 24, "width": 32}
        pred.append({"image": image,
                     "annotations": [{"category_id": 1 + k % 2, "segmentation": encode(m), "score": .5}]})
        g = np.roll(m, k, axis=1)
        gt.append({"image": image, "annotations": [{"category_id": 1 + k % 2, "segmentation": encode(g), "score": 1}]})
        student.append({"image": image, "annotations": [{"category_id": 1 + k % 2, "segmentation": encode(g | m),
                                                         "score": 1}]})
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    for name, recs in (("pred", pred), ("gt", gt), ("student", student)):
        write_coco(tmp_path / f"{name}.json", lambda recs=recs: iter(recs), categories=cats, info={})
    return images


def test_evaluation_report_and_every_image_load_in_chromium(tmp_path):
    need_browser()
    images = _sources(tmp_path)
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["evaluate", "--pred", str(tmp_path / "pred.json"), "--gt", str(tmp_path / "gt.json"),
                                  "--student", str(tmp_path / "student.json"), "--out", str(out),
                                  "--images", str(images)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    seen = load_in_browser(out / "report.html")
    n_files = len(list((out / "sheets").glob("*.png"))) + len(list((out / "figures").glob("*.svg")))
    assert seen["bad"] == [] and seen["images"] == n_files >= 1 + 2
    assert seen["title"] == "segfromxai quality report"
    assert {"Summary", "Figures", "Per category", "Best", "Worst", "Per image"} <= set(seen["h2"])


def test_a_broken_image_is_caught(tmp_path):
    need_browser()
    page = tmp_path / "page.html"
    page.write_text('<!DOCTYPE html><html><head><title>t</title></head><body><img src="missing.png"></body></html>')
    assert load_in_browser(page)["bad"] == ["missing.png"]


def test_compare_plot_loads_in_chromium(tmp_path):
    need_browser()
    rows = [{"recipe": "a", "iou": 0.4, "s_per_image": 0.2}, {"recipe": "b", "iou": 0.6, "s_per_image": 1.5}]
    write_comparison(tmp_path, {"rows": rows, "failures": [], "n_images": 4, "settings": {}})
    page = tmp_path / "plot.html"
    page.write_text('<!DOCTYPE html><html><head><title>c</title></head><body><img src="compare.svg"></body></html>')
    seen = load_in_browser(page)
    assert seen["images"] == 1 and seen["bad"] == []


def test_student_report_with_its_column_and_sheets_loads_in_chromium(tiny_card, synth_images, tmp_path):
    """`segfromxai student --gt` on a tiny run: report.html holds the three comparisons, and every sheet (five
    tiles: the student's mask too) and figure loads."""
    need_browser()
    from segfromxai.run.local import run
    from segfromxai.models.model import load_model
    from segfromxai.recipe.recipe import load_recipe

    run(load_recipe("default"), synth_images / "images", tmp_path / "run", model=load_model(checkpoint=tiny_card),
        batch_size=4)
    out = tmp_path / "student"
    r = CliRunner().invoke(main, ["student", "--train", str(tmp_path / "run"), "--images",
                                  str(synth_images / "images"), "--out", str(out), "--gt",
                                  str(synth_images / "annotations.json"), "--epochs", "2", "--val-fraction", "0.4",
                                  "--img-size", "64", "--checkpoint", str(tiny_card)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    assert all(c in page for c in ("pseudo vs GT", "student vs GT", "pseudo vs student"))
    sheets = sorted((out / "sheets").glob("*.png"))
    assert sheets and all(Image.open(s).width == 5 * 160 + 4 * 4 for s in sheets)  # a fifth tile: the student
    seen = load_in_browser(out / "report.html")
    assert seen["bad"] == [] and seen["images"] == len(sheets) + len(list((out / "figures").glob("*.svg")))
    assert seen["title"] == "segfromxai student report" and {"Summary", "Best", "Worst"} <= set(seen["h2"])
