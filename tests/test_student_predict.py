"""``segfromxai student predict``: a trained student labels a folder as ``run`` does (COCO, exports, run.json,
failures.jsonl, --gt report), skips a bad file, resumes after SIGKILL with the same files, and ``student --train``
still trains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segfromxai.student.config import StudentConfig
from conftest import invoke

FAST = dict(epochs=3, batch_size=8, lr=0.05, img_size=0, val_fraction=0.4, trunk_dtype="float32")

@pytest.fixture(scope="module")
def trained(tiny_model, synth_images, tmp_path_factory):
    """A student trained on the default recipe's run of the twelve synth images (tiny ViT): its job folder."""
    from segfromxai.recipe.recipe import load_recipe
    from segfromxai.run.local import run
    from segfromxai.student.job import train_student

    run_dir, out = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("student")
    run(load_recipe("default"), synth_images / "images", run_dir, model=tiny_model, batch_size=4)
    train_student(run_dir, synth_images / "images", out, model=tiny_model, config=StudentConfig(**FAST))
    return out


def annotations(out: Path) -> list[tuple]:
    doc = json.loads((out / "pseudo_labels.json").read_text())
    return [(a["image_id"], a["category_id"], a["segmentation"]["counts"], round(a["score"], 6))
            for a in doc["annotations"]]


def test_predict_writes_what_run_writes_and_skips_bad_files(trained, messy_images, synth_images, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "out"
    r = invoke("student", "predict", "--student", trained, "--images", messy_images, "--out", out, "--format", "png",
               "--format", "yolo", "--batch-size", "5", "--gt", synth_images / "annotations.json")
    assert r.exit_code == 0, r.output
    assert "15 images: " in r.output and "3 failed" in r.output and "IoU" in r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("progress: ")]  # off a terminal: lines
    assert lines[0].startswith("progress: 0/15 images") and lines[-1].startswith("progress: 15/15 images")
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["file_name"] for f in failures) == ["empty.jpg", "notes.jpg", "truncated.png"]
    assert all(f["reason"] for f in failures)
    coco = COCO(str(out / "pseudo_labels.json"))
    assert len(coco.getImgIds()) == 12 and coco.getAnnIds()
    train_run = json.loads((trained / "round_1" / "card.json").read_text())["train_run"]
    assert coco.dataset["categories"] == json.loads((Path(train_run) / "pseudo_labels.json").read_text())["categories"]
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        assert coco.annToMask(ann).shape == (img["height"], img["width"]) and coco.annToMask(ann).sum() > 0
        assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
        assert 0 < ann["score"] <= 1 and ann["attributes"]["student"] == "linear"
    info = json.loads((out / "pseudo_labels.json").read_text())["info"]
    assert info["recipe"]["name"] == "student" and info["recipe"]["boundary"]["method"] != "none"
    summary = json.loads((out / "run.json").read_text())
    assert summary["counts"]["found"] == 15 and summary["counts"]["failed"] == 3 and summary["engine"] == "student"
    assert (out / "pseudo_labels_results.json").is_file() and (out / "report.html").is_file()
    assert len(list((out / "png").glob("*.png"))) == 12 and (out / "yolo" / "data.yaml").is_file()
    assert (out / "metrics.json").is_file()


def test_a_killed_predict_resumed_gives_the_same_files(trained, tiny_card, tmp_path):
    from segfromxai.quality.synth import write_synth

    images = write_synth(tmp_path / "synth", 20, seed=11, size=40) / "images"
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    assert invoke("student", "predict", "--student", trained, "--images", images, "--out", clean,
                  "--batch-size", "3").exit_code == 0
    script = textwrap.dedent(f"""
        import os, signal
        from segfromxai.student.label import label_folder, open_student

        calls = []
        def kill(advance, total):
            calls.append(advance)
            if len(calls) == 3:  # after the second chunk is written
                os.kill(os.getpid(), signal.SIGKILL)

        label_folder(open_student({str(trained)!r}), {str(images)!r}, {str(cut)!r}, batch_size=3, progress=kill)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    lines = (cut / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 6 and not (cut / "pseudo_labels.json").exists()
    with open(cut / "manifest.jsonl", "a") as f:  # a torn last line, as a kill inside a write leaves
        f.write('{"index": 19, "file_name": "x.png", "sta')
    r = invoke("student", "predict", "--student", trained, "--images", images, "--out", cut, "--batch-size", "3")
    assert r.exit_code != 0 and "--resume" in r.output
    r = invoke("student", "predict", "--student", trained, "--images", images, "--out", cut, "--batch-size", "3",
               "--resume")
    assert r.exit_code == 0, r.output
    assert annotations(cut) == annotations(clean) and annotations(clean)
    indices = [json.loads(line)["index"] for line in (cut / "manifest.jsonl").read_text().splitlines()[1:]]
    assert sorted(indices) == list(range(20))  # nothing redone, nothing lost
    r = invoke("student", "predict", "--student", trained, "--images", images, "--out", cut, "--resume",
               "--boundary", "none")
    assert r.exit_code != 0 and "differs in recipe" in r.output  # another labeller is another job


def test_open_student_takes_a_job_folder_a_round_or_a_card_and_refuses_others(trained, tiny_card, tmp_path):
    from segfromxai.student.label import open_student, student_card

    assert student_card(trained) == trained / "round_1" / "card.json"
    assert student_card(trained / "round_1") == student_card(trained / "round_1" / "card.json")
    with pytest.raises(FileNotFoundError, match="no trained student"):
        student_card(tmp_path)
    with pytest.raises(ValueError, match="not a student"):
        open_student(tiny_card)
    r = invoke("student", "predict", "--student", tmp_path, "--images", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "Error: " in r.output and not (tmp_path / "o").exists()


def test_a_card_without_its_labeller_is_rebuilt_from_the_training_run(trained, tmp_path):
    from segfromxai.student.label import open_student

    old = tmp_path / "old"
    shutil.copytree(trained / "round_1", old)
    card = json.loads((old / "card.json").read_text())
    kept = card.pop("labeller")
    (old / "card.json").write_text(json.dumps(card))
    assert open_student(old).labeller.to_dict() == kept
    assert open_student(old, boundary="none").labeller.boundary == "none"


def test_student_still_trains_without_a_subcommand_and_refuses_mixing_them(tiny_card, trained, synth_images,
                                                                           tmp_path):
    r = invoke("student", "--images", synth_images / "images", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "Missing option '--train'" in r.output
    r = invoke("student", "--out", tmp_path / "o", "predict", "--student", trained, "--images",
               synth_images / "images", "--out", tmp_path / "p")
    assert r.exit_code == 2 and "without a subcommand" in r.output
