"""What a user meets downstream of `run`: progress in logs, run.json versions, --skip-empty, the YOLO export."""

import io
import json
import os
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from segfromxai.io.yolo import yolo_split_key
from segfromxai.run.outdir import finish
from segfromxai.run.manifest import Manifest
from segfromxai.io.progress import LogProgress, duration
from conftest import invoke

class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_log_progress_prints_every_n_images_or_t_seconds_with_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    p = LogProgress(400, 100, stream=out, every=50, seconds=30.0, clock=clock)  # resumed: 100 done before
    clock.t += 10
    p.update(20)  # 20 images, 10 s: no line (< 50 images, < 30 s)
    clock.t += 10
    p.update(40)  # 60 since the last line: a line
    clock.t += 31
    p.update(1)  # 31 s since the last line: a line
    clock.t += 1
    p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "progress: 100/400 images (25.0%), ? images/s, ETA ?"
    assert lines[1] == "progress: 160/400 images (40.0%), 3.00 images/s, ETA 1m20s"  # 60 images in 20 s
    assert lines[2] == f"progress: 161/400 images (40.2%), {61 / 51:.2f} images/s, ETA {duration(239 / (61 / 51))}"
    assert lines[3].startswith("progress: 162/400 images") and len(lines) == 4
    p.close()  # nothing new: no line
    assert len(out.getvalue().splitlines()) == 4
    assert [duration(s) for s in (4.4, 65, 3723, float("nan"))] == ["4s", "1m05s", "1h02m03s", "?"]
    with pytest.raises(ValueError, match="every"):
        LogProgress(1, stream=out, every=0)


def test_run_off_a_terminal_logs_progress_records_versions_and_exports_yolo(tmp_path, synth_images, tiny_card):
    out = tmp_path / "out"
    r = invoke("run", "default", "--images", synth_images / "images", "--out", out, "--checkpoint", tiny_card,
               "--batch-size", "5", "--format", "yolo")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("progress: ")]
    assert lines[0].startswith("progress: 0/12 images (0.0%)") and lines[-1].startswith("progress: 12/12 images")
    assert "images/s" in lines[-1] and "ETA 0s" in lines[-1] and "\r" not in r.stderr  # lines, not a bar
    summary = json.loads((out / "run.json").read_text())
    assert summary["versions"]["pycocotools"] == version("pycocotools") != "unknown"
    assert summary["skip_empty"] is False
    yolo = out / "yolo"
    yaml = (yolo / "data.yaml").read_text()
    assert f"path: {json.dumps(str(yolo.resolve()))}" in yaml and "val: images/val" in yaml
    names = sorted(p.name for p in (synth_images / "images").iterdir())
    val = sorted(p.name for p in (yolo / "images/val").iterdir())
    train = sorted(p.name for p in (yolo / "images/train").iterdir())
    assert sorted(val + train) == names and val and train
    assert val == sorted(n for n in names if yolo_split_key(n) < 0.1) or len(val) == 1
    for split, group in (("val", val), ("train", train)):
        for n in group:
            assert os.path.samefile(yolo / "images" / split / n, synth_images / "images" / n)
            assert (yolo / "labels" / split / n).with_suffix(".txt").exists()


def _manifest(out, statuses):
    import numpy as np

    from segfromxai.ops.masks import encode

    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    header = {"recipe": "x", "images": str(out), "model": "tiny", "targets": {}, "shard": None,
              "classes": ["a", "b"], "resolved": {"name": "x"}}
    manifest = Manifest(out / "manifest.jsonl")
    with manifest.open(header):
        manifest.append([{"index": k, "file_name": f"{k}.png", "status": s,
                          "image": {"id": k + 1, "file_name": f"{k}.png", "height": 4, "width": 4},
                          "annotations": [{"category_id": 1, "segmentation": encode(m), "score": 0.5}]
                          if s == "ok" else []} for k, s in enumerate(statuses)])
    return manifest


def test_skip_empty_leaves_images_without_a_mask_out_of_the_training_file_only(tmp_path):
    statuses = ["ok", "empty", "ok", "empty", "empty"]
    manifest = _manifest(tmp_path, statuses)
    kept = finish(tmp_path, [manifest], formats=("png",))
    assert kept["counts"]["no_mask"] == 3 and kept["skip_empty"] is False
    assert len(COCO(str(tmp_path / "pseudo_labels.json")).getImgIds()) == 5  # the default is unchanged
    summary = finish(tmp_path, [manifest], formats=("png",), skip_empty=True)
    coco = COCO(str(tmp_path / "pseudo_labels.json"))
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == ["0.png", "2.png"]
    assert all(coco.getAnnIds(imgIds=i) for i in coco.getImgIds())  # every image has a target
    assert summary["counts"] == kept["counts"] and summary["skip_empty"] is True
    assert len(list((tmp_path / "png").glob("*.png"))) == 5  # the exports keep background images


def test_run_skip_empty_flag(tmp_path, synth_images, tiny_card):
    recipe = tmp_path / "big.toml"  # masks must cover 95% of the image: every image ends without a mask
    recipe.write_text('name = "big"\n[explainers.gradcam]\n[masks]\nmin_area = 0.95\n')
    for flag, n_images in (("--format", 3), ("--skip-empty", 0)):
        out = tmp_path / flag
        args = ["run", recipe, "--images", synth_images / "images", "--out", out, "--checkpoint", tiny_card,
                "--limit", "3"] + (["--skip-empty"] if flag == "--skip-empty" else ["--format", "coco"])
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "run.json").read_text())
        assert summary["counts"]["no_mask"] == 3 and summary["formats"] == ["coco"]  # --format coco: the default
        assert len(json.loads((out / "pseudo_labels.json").read_text())["images"]) == n_images


# --- docs/outputs.md "Loading it downstream": every snippet runs on a real output -------------------------------


def _readme_blocks(lang):
    from conftest import docs_text

    readme = docs_text()  # README.md and docs/*.md; the section ends at the next heading of level 1 or 2
    section = re.split(r"\n#{1,2} ", readme.split("## Loading it downstream\n", 1)[1], maxsplit=1)[0]
    blocks = section.split(f"```{lang}\n")[1:]
    return ["\n".join(line[2:] if line.startswith("  ") else line for line in b.split("```")[0].splitlines())
            for b in blocks]


def _labelled_output(tmp_path, statuses, formats=("png",), skip_empty=False):
    """A run output over real image files, built from a hand-written manifest (no model needed)."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir(parents=True)
    for k in range(len(statuses)):
        Image.fromarray(np.full((4, 4, 3), 40 * k, np.uint8)).save(images / f"{k}.png")
    out = tmp_path / "out"
    out.mkdir()
    manifest = _manifest(out, statuses)
    header = json.loads(manifest.path.read_text().splitlines()[0])
    header["images"] = str(images)  # point the run at the image files
    lines = manifest.path.read_text().splitlines()
    manifest.path.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    finish(out, [manifest], formats=formats, skip_empty=skip_empty)
    return images, out


def _run_snippet(code, images, out):
    code = code.replace("data/samples/images", str(images)).replace("out/demo", str(out))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_coco_snippet(tmp_path):
    images, out = _labelled_output(tmp_path, ["ok", "empty", "ok"])
    (block,) = [b for b in _readme_blocks("python") if "pycocotools" in b]
    ns = _run_snippet(block, images, out)
    assert ns["mask"].dtype.name == "uint8" and ns["mask"].shape == (4, 4) and ns["mask"].sum() == 4


def test_readme_torchvision_snippet_and_its_note_on_images_without_a_mask(tmp_path):
    (block,) = [b for b in _readme_blocks("python") if "torchvision" in b]
    images, out = _labelled_output(tmp_path / "a", ["ok", "empty", "ok"])
    ns = _run_snippet(block, images, out)
    assert ns["target"]["masks"].shape == (1, 4, 4) and ns["target"]["labels"].tolist() == [1]
    assert set(ns["ds"][1][1]) == {"image_id"}  # as the README says: no boxes, labels or masks
    images, out = _labelled_output(tmp_path / "b", ["ok", "empty", "ok"], skip_empty=True)
    ds = _run_snippet(block, images, out)["ds"]
    assert len(ds) == 2 and all("masks" in ds[i][1] for i in range(len(ds)))


def test_readme_png_snippet(tmp_path):
    import torch

    (block,) = [b for b in _readme_blocks("python") if "PseudoMasks" in b]
    images, out = _labelled_output(tmp_path, ["ok", "empty", "ok"])
    ns = _run_snippet(block, images, out)
    ds = ns["ds"]
    assert len(ds) == 3
    x, y = ds[0]
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.unique().tolist()) == [0, 1] and ds[1][1].sum() == 0
    logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    ns["loss"](logits, y[None]).backward()  # a loss with ignore_index=255 takes the labels as they are


@pytest.mark.slow
def test_readme_yolo_command_trains_from_a_fresh_shell_elsewhere(tmp_path, synth_images, tiny_card):
    """`pytest -m slow`: the README's `yolo segment train` command on a run's export (needs ultralytics)."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("ultralytics", reason="ultralytics is optional: pip install 'segfromxai[yolo]'")
    out = tmp_path / "run"
    r = invoke("run", "default", "--images", synth_images / "images", "--out", out, "--checkpoint", tiny_card,
               "--format", "yolo")
    assert r.exit_code == 0, r.output
    (command,) = [b.strip() for b in _readme_blocks("sh") if b.strip().startswith("yolo ")]
    command = command.replace("out/demo", str(out)).replace("epochs=100", "epochs=1").replace("imgsz=224", "imgsz=64")
    yolo = shutil.which("yolo", path=str(Path(sys.executable).parent)) or "yolo"
    command = command.replace("yolo ", f"{yolo} ", 1) + f" device=cpu workers=0 batch=4 plots=False project={tmp_path}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "YOLO_OFFLINE": "1"}
    done = subprocess.run(["bash", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "images not found" not in log and "No labels found" not in log
    assert list(tmp_path.rglob("weights/last.pt"))


def test_merged_shards_export_one_yolo_dataset_with_the_same_split_rule(tmp_path):
    import numpy as np
    from PIL import Image

    from segfromxai.run.outdir import merge
    from segfromxai.ops.masks import encode

    images = tmp_path / "images"
    images.mkdir()
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    names = [f"{k:02d}.png" for k in range(10)]
    for k, n in enumerate(names):
        Image.fromarray(np.full((4, 4, 3), 20 * k, np.uint8)).save(images / n)
    parts = []
    for shard in range(2):
        part = tmp_path / f"part{shard}"
        part.mkdir()
        header = {"recipe": "x", "images": str(images), "model": "tiny", "targets": {}, "shard": [shard, 2],
                  "classes": ["a"], "resolved": {"name": "x"}}
        with Manifest(part / "manifest.jsonl").open(header) as manifest:
            manifest.append([{"index": k, "file_name": n, "status": "ok",
                              "image": {"id": k + 1, "file_name": n, "height": 4, "width": 4},
                              "annotations": [{"category_id": 1, "segmentation": encode(m), "score": 0.5}]}
                             for k, n in enumerate(names) if k % 2 == shard])
        parts.append(part)
    merge(parts, tmp_path / "merged", formats=("yolo",))
    yolo = tmp_path / "merged" / "yolo"
    val = sorted(p.name for p in (yolo / "images/val").iterdir())
    train = sorted(p.name for p in (yolo / "images/train").iterdir())
    assert sorted(val + train) == names and val and train
    expected = sorted(n for n in names if yolo_split_key(n) < 0.1) or [min(names, key=yolo_split_key)]
    assert val == expected
    assert all(os.path.samefile(yolo / "images/train" / n, images / n) for n in train)
