"""Issue 33, the student cases: the reuse key covers the pseudo-labels', the images' and the head weights' content
(1), ``--gt`` without ``--pseudo`` writes its report (2), bad ``--head-weights`` are refused before the token pass
(4), ``run``'s ``--out`` guards (8), a training run that labelled no image says so (9a), progress lines off a
terminal (10)."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from segfromxai.cli import main
from segfromxai.student.config import StudentConfig
from segfromxai.student.job import train_student

FAST = dict(epochs=2, batch_size=8, lr=0.05, img_size=0, val_fraction=0.4, trunk_dtype="float32")
CLI_FAST = ["--epochs", "2", "--img-size", "0", "--val-fraction", "0.4"]
def _copy_run(run: Path, images: Path, where: Path) -> tuple[Path, Path]:
    """A copy of ``run`` over a copy of its images (the manifest header names the copy)."""
    shutil.copytree(images, where / "images")
    shutil.copytree(run, where / "run")
    manifest = where / "run" / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["images"] = str(where / "images")
    manifest.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    return where / "run", where / "images"


def _train(run: Path, images: Path, out: Path, model, **cfg) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    train_student(run, images, out, model=model, config=StudentConfig(**{**FAST, **cfg}),
                  on_epoch=lambda r, e: seen.append((r, e)))
    return seen


def _cli(*args: str) -> object:
    return CliRunner().invoke(main, ["student", *args])


def _one_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith("progress: ")]
    assert lines[-1].startswith("Error:") and sum(line.startswith("Error:") for line in lines) == 1, res.output
    return lines[-1]


# case 1 ---------------------------------------------------------------------------------------------------------


def test_rerun_retrains_when_the_pseudo_labels_change(tiny_model, tiny_run, synth_images, tmp_path):
    run, images = _copy_run(tiny_run, synth_images / "images", tmp_path)
    assert _train(run, images, tmp_path / "s", tiny_model)
    assert _train(run, images, tmp_path / "s", tiny_model) == []  # nothing changed: the round is reused
    coco = run / "pseudo_labels.json"
    doc = json.loads(coco.read_text())
    doc["annotations"] = doc["annotations"][1:]  # the training run relabelled
    coco.write_text(json.dumps(doc))
    assert _train(run, images, tmp_path / "s", tiny_model) == [(1, 1), (1, 2)]


def test_rerun_retrains_when_a_training_image_changes_at_the_same_size_and_time(tiny_model, tiny_run, synth_images,
                                                                                tmp_path):
    from segfromxai.student.data import held_out

    run, images = _copy_run(tiny_run, synth_images / "images", tmp_path)
    assert _train(run, images, tmp_path / "s", tiny_model)
    name = next(p for p in sorted(images.iterdir()) if not held_out(p.name, 0.4))
    st = name.stat()
    data = bytearray(name.read_bytes())
    im = np.asarray(Image.open(name).convert("RGB"))
    Image.fromarray(255 - im).save(name)  # other pixels
    if name.stat().st_size != st.st_size:  # keep the size too: only the bytes differ
        raw = name.read_bytes()
        name.write_bytes(raw[:st.st_size] if len(raw) > st.st_size else raw + b"\0" * (st.st_size - len(raw)))
    assert name.read_bytes() != bytes(data) and name.stat().st_size == st.st_size
    import os

    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _train(run, images, tmp_path / "s", tiny_model)[:1] == [(1, 1)]
    assert len(list((tmp_path / "s" / "tokens").glob("*.safetensors"))) == 3  # the training tokens read again


def test_rerun_retrains_when_the_head_weights_file_changes(tiny_model, tiny_run, synth_images, tmp_path):
    from safetensors.torch import save_file

    dim = int(tiny_model.module.num_features)
    weights = tmp_path / "w.safetensors"
    save_file({"weight": torch.zeros(2, dim, 1, 1), "bias": torch.zeros(2)}, str(weights))
    images = synth_images / "images"
    assert _train(tiny_run, images, tmp_path / "s", tiny_model, head_weights=str(weights))
    save_file({"weight": torch.ones(2, dim, 1, 1), "bias": torch.ones(2)}, str(weights))  # same path
    assert _train(tiny_run, images, tmp_path / "s", tiny_model, head_weights=str(weights)) == [(1, 1), (1, 2)]


# case 2 ---------------------------------------------------------------------------------------------------------


def test_gt_without_pseudo_writes_the_report(tiny_model, tiny_run, synth_images, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(synth_images / "images", other)  # not the training folder: no held-out pseudo-labels
    train_student(tiny_run, other, tmp_path / "s", model=tiny_model, config=StudentConfig(**FAST),
                  gt=synth_images / "annotations.json")
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert "comparisons" not in metrics and metrics["n_images"] == 12  # one comparison: student vs GT
    assert "student vs GT" in (tmp_path / "s" / "report.html").read_text()


# case 4 ---------------------------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle payload ran",))


def _bad_weights(kind: str, folder: Path, dim: int) -> Path:
    from safetensors.torch import save_file

    if kind == "corrupt safetensors":
        path = folder / "w.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif kind == "empty torch":
        path = folder / "w.pt"
        path.write_bytes(b"")
    elif kind == "corrupt torch":
        path = folder / "w.pt"
        path.write_bytes(b"PK\x03\x04 truncated zip")
    elif kind in ("plain tensor", "list"):
        path = folder / "w.pt"
        torch.save(torch.zeros(3) if kind == "plain tensor" else [torch.zeros(3)], path)
    elif kind == "pickle":
        path = folder / "w.pkl"
        path.write_bytes(pickle.dumps(_Payload()))
    else:  # all NaN, of the head's own shapes
        path = folder / "w.safetensors"
        save_file({"weight": torch.full((2, dim, 1, 1), float("nan")), "bias": torch.full((2,), float("nan"))},
                  str(path))
    return path


@pytest.mark.parametrize("kind", ["corrupt safetensors", "empty torch", "corrupt torch", "plain tensor", "list",
                                  "pickle", "all NaN"])
def test_bad_head_weights_are_refused_before_the_token_pass(kind, tiny_card, tiny_model, tiny_run, synth_images,
                                                            tmp_path, monkeypatch):
    import segfromxai.student.tokens as tokens

    def no_trunk(*args, **kwargs):
        raise AssertionError("the token pass ran")

    monkeypatch.setattr(tokens, "cache_tokens", no_trunk)
    path = _bad_weights(kind, tmp_path, int(tiny_model.module.num_features))
    res = _cli("--train", str(tiny_run), "--images", str(synth_images / "images"), "--out", str(tmp_path / "s"),
               "--head-weights", str(path), "--checkpoint", str(tiny_card), *CLI_FAST)
    line = _one_error(res)
    assert "--head-weights" in line and str(path) in line
    assert "a pickle payload ran" not in res.output
    assert not (tmp_path / "s").exists()


# case 8 ---------------------------------------------------------------------------------------------------------


def _student_args(tiny_card: Path, run: Path, images: Path, out: Path) -> list[str]:
    return ["--train", str(run), "--images", str(images), "--out", str(out), "--checkpoint", str(tiny_card),
            *CLI_FAST]


def test_out_guards_refuse_a_foreign_folder_and_need_resume_or_overwrite(tiny_card, tiny_run, synth_images,
                                                                         tmp_path):
    args = _student_args(tiny_card, tiny_run, synth_images / "images", tmp_path / "s")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    line = _one_error(_cli(*args))
    assert str(tmp_path / "s") in line and "student" in line
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["notes.txt"]
    (tmp_path / "s" / "notes.txt").unlink()
    assert _cli(*args).exit_code == 0
    line = _one_error(_cli(*args))
    assert "--resume" in line and "--overwrite" in line
    res = _cli(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert "progress: round 1" not in res.stderr  # the finished round is reused
    (tmp_path / "s" / "round_1" / "mine.txt").write_text("x")
    res = _cli(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    assert "progress: round 1: 2/2 epochs" in res.stderr  # trained again
    assert (tmp_path / "s" / "round_1" / "card.json").is_file()
    assert (tmp_path / "s" / "round_1" / "mine.txt").read_text() == "x"  # never the user's files


def test_two_jobs_into_one_out_are_refused_by_a_lock(tiny_card, tiny_run, synth_images, tmp_path):
    from segfromxai.run.outdir import out_lock

    out = tmp_path / "s"
    out.mkdir()
    with out_lock(out):
        line = _one_error(_cli(*_student_args(tiny_card, tiny_run, synth_images / "images", out)))
    assert "another" in line and str(out) in line


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_out_gives_one_error_line(err, tiny_card, tiny_run, synth_images, tmp_path, monkeypatch):
    import segfromxai.student.tokens as tokens

    def full(*args, **kwargs):
        raise OSError(err, "No space left on device" if err == errno.ENOSPC else "Read-only file system")

    monkeypatch.setattr(tokens, "atomic_write", full)
    line = _one_error(_cli(*_student_args(tiny_card, tiny_run, synth_images / "images", tmp_path / "s")))
    assert str(tmp_path / "s") in line


def test_a_failed_student_leaves_no_out_behind(tiny_card, tiny_run, synth_images, tmp_path):
    args = _student_args(tiny_card, tiny_run, synth_images / "images", tmp_path / "s")
    _one_error(_cli(*args, "--max-area", "0.0001"))  # no training image passes the filter
    assert not (tmp_path / "s").exists()


# case 9a --------------------------------------------------------------------------------------------------------


def test_a_training_run_that_skipped_every_image_says_so(tiny_card, tiny_run, synth_images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    doc = json.loads((run / "pseudo_labels.json").read_text())
    doc["images"], doc["annotations"] = [], []
    (run / "pseudo_labels.json").write_text(json.dumps(doc))
    summary = json.loads((run / "run.json").read_text())
    summary["counts"].update(labelled=0, no_mask=0, skipped=12, annotations=0)
    (run / "run.json").write_text(json.dumps(summary))
    line = _one_error(_cli(*_student_args(tiny_card, run, synth_images / "images", tmp_path / "s")))
    assert str(run) in line and "labelled no image" in line and "12 skipped" in line
    assert "--val-fraction" not in line


# case 10 --------------------------------------------------------------------------------------------------------


def test_student_prints_progress_lines_off_a_terminal(tiny_card, tiny_run, synth_images, tmp_path):
    res = _cli(*_student_args(tiny_card, tiny_run, synth_images / "images", tmp_path / "s"))
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("progress: ")]
    assert any("training tokens" in line for line in lines) and any("round 1" in line for line in lines)
    assert any(line.startswith("progress: round 1: 2/2 epochs") for line in lines)
