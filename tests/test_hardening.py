"""Regression tests of issue 20 (hardening): every bad input, flag and file gets a clear error before work starts,
and nothing of the user's is touched. Each test is named after the case it pins down."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from segfromxai.cli import main
from segfromxai.run.outdir import check_out, run_records
from segfromxai.run.local import run, shard_of
from segfromxai.quality.evaluate import evaluate
from segfromxai.io.images import find_images, load_image, ImageLoadError
from segfromxai.run.manifest import Manifest
from segfromxai.models.model import load_model, read_card, read_state_dict, write_card
from segfromxai.recipe.recipe import parse_recipe
from segfromxai.recipe.checks import check_recipe_for_model
from segfromxai.run.targets import read_labels_csv, write_predictions_csv
from segfromxai.run.targets import Prediction
from conftest import error_line, invoke


@pytest.fixture(scope="module")
def tiny(tiny_card):
    return load_model(checkpoint=tiny_card)


# ------------------------------------------------------------------------------------------------ exports
def test_export_collision_a_png_beside_a_jpg_is_labelled_and_exported_twice(tmp_path, images, tiny):
    first = sorted(images.glob("*.png"))[0]
    shutil.copy(first, images / "twin.png")
    shutil.copy(first, images / "twin.jpg")  # a PNG named .jpg still loads
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("twin.png", "twin.jpg"):
        shutil.move(images / name, folder / name)
    out = tmp_path / "out"
    summary = run(parse_recipe({"explainers": {"gradcam": {}}, "output": {"maps": True}}), folder, out,
                  model=tiny, formats=("png",))
    assert summary["counts"]["found"] == 2 and (out / "run.json").exists()
    assert sorted(p.name for p in (out / "png").iterdir()) == ["twin.jpg.png", "twin.png.png"]
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["twin.jpg.npz", "twin.png.npz"]
    r = invoke("evaluate", "--pred", out / "png", "--gt", out / "pseudo_labels.json")
    assert r.exit_code == 0, r.output  # the PNG folder matches its COCO file name for name


def test_export_collision_with_yolo_is_refused_before_labelling_and_resume_never_wedges(tmp_path, images, tiny):
    first = sorted(images.glob("*.png"))[0]
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(first, folder / "twin.png")
    shutil.copy(first, folder / "twin.jpg")
    out = tmp_path / "out"
    recipe = parse_recipe({"explainers": {"gradcam": {}}})
    with pytest.raises(ValueError, match="twin.jpg and twin.png would both be written as yolo/labels/twin.txt"):
        run(recipe, folder, out, model=tiny, formats=("yolo",))
    assert not out.exists()
    assert run(recipe, folder, out, model=tiny, formats=("png",))["counts"]["found"] == 2
    assert run(recipe, folder, out, model=tiny, formats=("png",), resume=True)["processed_now"] == 0


# ------------------------------------------------------------------------------------------------ --out
def test_non_empty_out_holding_no_run_is_refused_and_left_alone(tmp_path, images, tiny):
    out = tmp_path / "mine"
    (out / "png").mkdir(parents=True)
    (out / "png" / "my_mask.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="not empty and holds no segfromxai run"):
        run(parse_recipe({"explainers": {"gradcam": {}}}), images, out, model=tiny, limit=2, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["png", "png/my_mask.png"]
    (tmp_path / "dotted").mkdir()
    (tmp_path / "dotted" / ".DS_Store").write_bytes(b"")
    check_out(tmp_path / "dotted")  # hidden files do not count


def test_overwrite_removes_only_what_the_run_wrote(tmp_path, images, tiny):
    out = tmp_path / "out"
    recipe = parse_recipe({"explainers": {"gradcam": {}}, "output": {"maps": True, "overlays": True}})
    run(recipe, images, out, model=tiny, limit=3, formats=("png", "yolo"))
    mine = [out / "notes.txt", out / "png" / "my_own.png", out / "maps" / "keep.npz", out / "yolo" / "labels" / "x.txt",
            out / "yolo" / "train.py", out / "sheets" / "mine.png"]
    for p in mine:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"user")
    first = sorted(p.name for p in images.glob("*.png"))[0]
    linked = out / "yolo" / "images" / "train" / first  # an image a YOLO export linked or copied
    linked.parent.mkdir(parents=True, exist_ok=True)
    linked.unlink(missing_ok=True)  # the export may have hard-linked it: never write through to the original
    linked.write_bytes(b"run")
    mine.append(out / "yolo" / "images" / "train" / "mine.jpg")
    mine[-1].write_bytes(b"user")
    run(recipe, images, out, model=tiny, limit=2, overwrite=True)  # no png/yolo export this time
    assert all(p.read_bytes() == b"user" for p in mine)
    assert sorted(p.name for p in (out / "png").iterdir()) == ["my_own.png"]
    assert sorted(p.name for p in (out / "yolo" / "labels").iterdir()) == ["x.txt"]
    assert not (out / "yolo" / "data.yaml").exists() and not linked.exists()
    assert len(list((out / "maps").glob("*.png.npz"))) == 2 and len(list((out / "overlays").iterdir())) == 2


def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, images, monkeypatch):
    import segfromxai.models.model as model

    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a_file").write_text("x")
    line = error_line(invoke("run", "vitmix/gradcam", "--images", images, "--out", tmp_path / "a_file" / "out"))
    assert "a_file is a file, not a folder" in line
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert "not writable" in error_line(invoke("run", "vitmix/gradcam", "--images", images, "--out", ro / "o"))


# ------------------------------------------------------------------------------------------------ labels CSV
def test_labels_csv_with_a_utf8_bom_is_read(tmp_path):
    p = tmp_path / "l.csv"
    p.write_bytes("\ufefffile_name,label\na.png,cat\n".encode("utf-8"))
    assert read_labels_csv(p) == {"a.png": "cat"}


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"a.png,cat\nb.png,dog\n", "must start with the header 'file_name,label'"),
    ("file_name,label\nb\xe9b\xe9.png,cat\n".encode("latin-1"), "is not UTF-8 text"),
])
def test_labels_csv_empty_headerless_or_latin1_is_a_clear_error(tmp_path, content, message):
    p = tmp_path / "l.csv"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        read_labels_csv(p)
    assert str(p) in str(e.value)


def test_labels_duplicate_rows_for_one_image_are_an_error_naming_the_file(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("file_name,label\na.png,cat\nb.png,dog\n./a.png,dog\n")
    with pytest.raises(ValueError, match=r"a.png has two labels, 'cat' \(line 2\) and 'dog' \(line 4\)"):
        read_labels_csv(p)
    p.write_text("file_name,label\na.png,cat\na.png,cat\n")
    assert read_labels_csv(p) == {"a.png": "cat"}  # the same label twice is harmless


def test_labels_dot_slash_rows_are_normalised(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("file_name,label\n./a.png,cat\nsub//./b.png,dog\n")
    assert read_labels_csv(p) == {"a.png": "cat", "sub/b.png": "dog"}


def test_labels_rows_for_missing_files_are_counted_in_run_json_and_stderr(tmp_path, images, tiny_card):
    labels = tmp_path / "l.csv"
    first = sorted(p.name for p in images.glob("*.png"))[0]
    labels.write_text(f"file_name,label\n./{first},circle\ngone.png,circle\nalso_gone.png,square\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", "vitmix/gradcam", "--images", str(images), "--out", str(out),
                                 "--checkpoint", str(tiny_card), "--labels", str(labels),
                                 "--limit", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "2 rows of" in r.stderr and "also_gone.png" in r.stderr
    warnings = json.loads((out / "run.json").read_text())["warnings"]
    assert warnings["labels_without_image"] == 2 and warnings["labels_without_image_first"] == ["also_gone.png",
                                                                                                "gone.png"]


def test_classify_out_writes_quoted_csv_that_run_labels_reads_back(tmp_path):
    preds = [Prediction("a,1.png", 0, 0.5), Prediction('b"q.png', 1, 0.25)]
    write_predictions_csv(tmp_path / "pred.csv", preds, ["tench, Tinca tinca", 'say "hi"'])
    assert read_labels_csv(tmp_path / "pred.csv") == {"a,1.png": "tench, Tinca tinca", 'b"q.png': 'say "hi"'}


# ------------------------------------------------------------------------------------------------ checkpoints
def test_truncated_or_garbage_safetensors_is_a_clear_error(tmp_path, tiny_card):
    good = (Path(tiny_card).parent / "model.safetensors").read_bytes()
    for name, data in (("garbage.safetensors", b"\x00garbage" * 10), ("cut.safetensors", good[: len(good) // 2])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"cannot read checkpoint .*{name}"):
            read_state_dict(tmp_path / name)


def test_device_cuda_without_gpu_and_bogus_device_are_usage_errors(tmp_path, images):
    assert "unknown device 'bogus'" in error_line(invoke("run", "vitmix/gradcam", "--images", images, "--out",
                                                         tmp_path / "o", "--device", "bogus"))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in error_line(invoke("classify", "--images", images, "--device", "cuda"))


def _tiny_card_copy(tmp_path, tiny_card, **changes):
    folder = tmp_path / f"card{len(list(tmp_path.iterdir()))}"
    shutil.copytree(Path(tiny_card).parent, folder)
    card = {k: v for k, v in json.loads(Path(tiny_card).read_text()).items() if k != "format"}
    write_card(folder / "card.json", {**card, **changes})
    return folder / "card.json"


def test_model_card_weights_path_is_confined_to_the_card_folder(tmp_path, tiny_card):
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for weights in ("../outside.safetensors", "/etc/passwd", "../../../../etc/passwd"):
        with pytest.raises(ValueError, match="outside the card's folder"):
            load_model(checkpoint=_tiny_card_copy(tmp_path, tiny_card, weights=weights))


def test_model_card_weights_sha256_is_checked(tmp_path, tiny_card):
    card = _tiny_card_copy(tmp_path, tiny_card, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="does not match the card's weights_sha256"):
        load_model(checkpoint=card)
    from segfromxai.models.model import sha256

    good = _tiny_card_copy(tmp_path, tiny_card, weights_sha256=sha256(card.parent / "model.safetensors"))
    assert load_model(checkpoint=good).classes


def test_model_card_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"model card {tmp_path / 'card.json'} is not a JSON file"):
        read_card(tmp_path)
    line = error_line(invoke("classify", "--images", tmp_path, "--checkpoint", tmp_path / "card.json"))
    assert "card.json is not a JSON file" in line


def test_dinov2_checkpoint_with_an_8_class_head_takes_the_class_count_from_it(tmp_path):
    import timm

    kw = {"depth": 1, "img_size": 28}
    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=8, **kw)
    torch.save(m.state_dict(), tmp_path / "x.pt")
    loaded = load_model("vit_small_patch14_dinov2", tmp_path / "x.pt", **kw)
    assert len(loaded.classes) == 8 and torch.equal(loaded.module.head.weight, m.head.weight)


def test_checkpoint_without_batchnorm_num_batches_tracked_is_accepted(tmp_path):
    import timm

    m = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "bn.pt")
    loaded = load_model("resnet10t", tmp_path / "bn.pt")
    assert len(loaded.classes) == 3 and torch.equal(loaded.module.fc.weight, m.fc.weight)


# ------------------------------------------------------------------------------------------------ recipe vs model
def test_a_negative_start_layer_the_explainer_takes_passes_the_model_check(tiny):
    check_recipe_for_model(tiny, parse_recipe({"explainers": {"rollout": {"start_layer": -1}}}))


@pytest.mark.parametrize("data, message", [
    ({"explainers": {"gradcam": {"layer": "blocks.99.norm1"}}}, r"\[explainers.gradcam\] layer: the model has no "
                                                                "layer 'blocks.99.norm1'; did you mean"),
    ({"explainers": {"gradcam": {}}, "refine": {"method": "ncut"}, "features": {"block": 99}},
     r"\[features\]: block 99 out of range for a model with 2 blocks"),
    ({"explainers": {"rollout": {"start_layer": 5}}}, r"start_layer must lie in \[-2, 2\)"),
    ({"explainers": {"rollout": {"start_layer": -3}}}, r"start_layer must lie in \[-2, 2\)"),
])
def test_model_dependent_recipe_values_fail_before_any_image(tmp_path, tiny, data, message):
    recipe = parse_recipe(data)
    with pytest.raises(ValueError, match=message):
        check_recipe_for_model(tiny, recipe)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run(recipe, tmp_path / "no_such_folder", out, model=tiny)  # the images are never looked at
    assert not out.exists()


def test_compare_checks_every_recipe_against_the_model_before_any_image(tmp_path, tiny):
    from segfromxai.quality.compare import compare

    good, bad = parse_recipe({"explainers": {"gradcam": {}}}), parse_recipe({"explainers": {"gradcam": {
        "layer": "blocks.7"}}}, name="deep")
    with pytest.raises(ValueError, match="recipe 'deep', \\[explainers.gradcam\\] layer: the model has no layer"):
        compare([good, bad], tmp_path / "no_images", tmp_path / "no_gt.json", model=tiny)


def test_vit_only_explainer_on_a_cnn_fails_before_any_image(tmp_path):
    cnn = load_model("resnet10t", num_classes=3)
    with pytest.raises(ValueError, match="rollout need a Vision Transformer .* explainers for it: .*gradcam"):
        check_recipe_for_model(cnn, parse_recipe({"explainers": {"rollout": {}}}))
    check_recipe_for_model(cnn, parse_recipe({"explainers": {"gradcam": {}}}))


def test_run_failing_in_its_first_chunk_leaves_no_run_folder_behind(tmp_path, images, tiny, monkeypatch):
    import segfromxai.run.local as engine

    def boom(*a, **k):
        raise FloatingPointError("explainer produced NaN")

    monkeypatch.setattr(engine, "process_chunk", boom)
    out = tmp_path / "out"
    recipe = parse_recipe({"explainers": {"gradcam": {}}})
    with pytest.raises(FloatingPointError):
        run(recipe, images, out, model=tiny, limit=2)
    assert not out.exists()
    out.mkdir()  # an empty folder given by the user stays, empty
    with pytest.raises(FloatingPointError):
        run(recipe, images, out, model=tiny, limit=2)
    assert out.is_dir() and list(out.iterdir()) == []
    monkeypatch.undo()
    assert run(recipe, images, out, model=tiny, limit=2)["counts"]["found"] == 2  # no "holds a run already"


# ------------------------------------------------------------------------------------------------ files and processes
def test_manifest_line_that_is_not_a_run_record_is_a_clear_error(tmp_path, images, tiny_card):
    out = tmp_path / "out"
    args = ("run", "vitmix/gradcam", "--images", images, "--out", out, "--checkpoint", tiny_card, "--limit", 2)
    assert invoke(*args).exit_code == 0
    with open(out / "manifest.jsonl", "a") as f:
        f.write("{}\n")
    line = error_line(invoke(*args, "--resume"))
    assert "manifest.jsonl, line 4: not a run record" in line and "--overwrite" in line
    assert invoke(*args, "--overwrite").exit_code == 0
    assert len(list(run_records(Manifest(out / "manifest.jsonl")))) == 2


def test_stale_tmp_files_of_a_killed_run_are_removed_on_resume(tmp_path, images, tiny):
    out = tmp_path / "out"
    recipe = parse_recipe({"explainers": {"gradcam": {}}})
    run(recipe, images, out, model=tiny, limit=2, formats=("png",))
    stale = [out / ".pseudo_labels.json.4242.0123abcd.tmp", out / "png" / ".x.png.png.4242.deadbeef.tmp"]
    for p in stale:
        p.write_text("half")
    (out / ".my_notes.tmp").write_text("mine")  # not an atomic_write name
    run(recipe, images, out, model=tiny, limit=2, formats=("png",), resume=True)
    assert not any(p.exists() for p in stale) and (out / ".my_notes.tmp").exists()


def test_dangling_symlink_in_the_image_folder_is_recorded_as_a_failure(tmp_path, images, tiny):
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert images / "gone.png" in find_images(images)
    with pytest.raises(ImageLoadError, match="broken symbolic link"):
        load_image(images / "gone.png")
    out = tmp_path / "out"
    run(parse_recipe({"explainers": {"gradcam": {}}}), images, out, model=tiny)
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"file_name": "gone.png", "reason": "broken symbolic link (its target is missing)"}]


def test_non_utf8_file_name_with_shard(tmp_path, images, tiny):
    odd = os.fsdecode(b"caf\xe9.png")
    shutil.copy(sorted(images.glob("*.png"))[0], images / odd)
    assert 0 <= shard_of(odd, 3) < 3
    recipe = parse_recipe({"explainers": {"gradcam": {}}})
    parts = [run(recipe, images, tmp_path / f"s{i}", model=tiny, shard=(i, 3)) for i in range(3)]
    assert sum(p["counts"]["found"] for p in parts) == 13
    r = invoke("merge", *(tmp_path / f"s{i}" for i in range(3)), "--out", tmp_path / "merged")
    assert r.exit_code == 0, r.output


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_dataloader_workers_die_when_the_run_is_sigkilled(tmp_path, tiny_card):
    from PIL import Image

    images = tmp_path / "big"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # a chunk larger than a pipe's buffer: a worker of a dead run blocks on it forever
        Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "segfromxai", "run", "vitmix/gradcam", "--images", str(images), "--out", str(out),
           "--checkpoint", str(tiny_card), "--workers", "2", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(workers) < 2:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the run started no workers"
    time.sleep(3)  # the workers load their chunks and wait to hand them over
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and "Z" not in (Path(f"/proc/{w}/stat").read_text().split()[2:3] or [""])]
    for w in alive:  # leave nothing running, whatever the outcome
        os.kill(w, signal.SIGKILL)
    assert alive == []


# ------------------------------------------------------------------------------------------------ evaluate
def _coco_file(path, cat_name, masks):
    images = [{"id": i + 1, "file_name": f"{i}.png", "height": 8, "width": 8} for i in range(len(masks))]
    anns = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "score": 0.9,
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                     "area": float(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": cat_name}]}))
    return path


def test_ap_class_agnostic_is_right_when_category_names_differ(tmp_path):
    masks = [np.zeros((8, 8), bool) for _ in range(2)]
    masks[0][1:5, 1:5] = True
    masks[1][2:7, 3:8] = True
    gt = _coco_file(tmp_path / "gt.json", "dog", masks)
    pred = _coco_file(tmp_path / "pred.json", "class_0", masks)
    result = evaluate(pred, gt)
    assert result["ap_agnostic"] == pytest.approx(1.0) and result["ap"] == pytest.approx(0.0)
    assert evaluate(gt, gt)["ap"] == pytest.approx(1.0)


def test_evaluate_pred_given_a_coco_results_list_or_empty_list_is_refused_clearly(tmp_path):
    masks = [np.ones((8, 8), bool)]
    gt = _coco_file(tmp_path / "gt.json", "dog", masks)
    (tmp_path / "pseudo_labels.json").write_text(gt.read_text())
    for name, doc in (("pseudo_labels_results.json", [{"image_id": 1, "category_id": 1}]), ("empty.json", [])):
        (tmp_path / name).write_text(json.dumps(doc))
        line = error_line(invoke("evaluate", "--pred", tmp_path / name, "--gt", gt))
        assert f"{tmp_path / name}: a JSON list" in line
    assert "use " + str(tmp_path / "pseudo_labels.json") in line or "pseudo_labels.json" in line


# ------------------------------------------------------------------------------------------------ the CLI on bad input
def test_cli_bad_files_and_bad_recipes_exit_2_with_one_line_naming_the_file_or_key(tmp_path, synth_images):
    bad = tmp_path / "bad"
    bad.mkdir()
    files = {"bom_less_empty.csv": b"", "no_header.csv": b"a.png,circle\n",
             "latin1.csv": "file_name,label\n\xe9.png,circle\n".encode("latin-1"),
             "dupes.csv": b"file_name,label\na.png,circle\na.png,square\n",
             "card.json": b"{oops", "weights.safetensors": b"\x01\x02 not safetensors",
             "unknown_key.toml": b"[explainers.gradcam]\n[fusion]\nmethd = 'geometric'\n",
             "unknown_method.toml": b"[explainers.gradcm]\n",
             "results.json": b"[]"}
    for name, data in files.items():
        (bad / name).write_bytes(data)
    images = synth_images / "images"
    run_args = ["--images", images, "--out", tmp_path / "o"]
    cases = [
        (["run", "vitmix/gradcam", *run_args, "--labels", bad / "bom_less_empty.csv"], "bom_less_empty.csv is empty"),
        (["run", "vitmix/gradcam", *run_args, "--labels", bad / "no_header.csv"], "no_header.csv must start with"),
        (["run", "vitmix/gradcam", *run_args, "--labels", bad / "latin1.csv"], "latin1.csv is not UTF-8"),
        (["run", "vitmix/gradcam", *run_args, "--labels", bad / "dupes.csv"], "dupes.csv: a.png has two labels"),
        (["run", "vitmix/gradcam", *run_args, "--checkpoint", bad / "card.json"], "card.json is not a JSON file"),
        (["run", "vitmix/gradcam", *run_args, "--checkpoint", bad / "weights.safetensors"], "weights.safetensors"),
        (["run", bad / "unknown_key.toml", *run_args], "methd"),
        (["run", bad / "unknown_method.toml", *run_args], "unknown explainer 'gradcm'"),
        (["run", "vitmix/gradcam", *run_args, "--device", "bogus"], "unknown device 'bogus'"),
        (["run", "vitmix/gradcam", "--images", images, "--out", bad / "card.json" / "o"], "card.json is a file"),
        (["run", "vitmix/gradcam", "--images", images, "--out", bad], "not empty and holds no segfromxai run"),
        (["evaluate", "--pred", bad / "results.json", "--gt", synth_images / "annotations.json"], "results.json"),
        (["classify", "--images", images, "--labels", bad / "latin1.csv"], "latin1.csv is not UTF-8"),
    ]
    for args, needle in cases:
        line = error_line(invoke(*args))
        assert needle in line, (args, line)
    assert sorted(p.name for p in bad.iterdir()) == sorted(files)  # nothing written into the bad folder


def test_export_png_names_match_a_voc_style_png_ground_truth_folder():
    from segfromxai.quality.evaluate import MaskSource, match_names

    ref = MaskSource(Path("gt"), "png", {"sub/a.png": None, "b.png": None})
    pairs, missing = match_names(["sub/a.jpg.png", "b.jpg.png"], ref)
    assert pairs == [("b.jpg.png", "b.png"), ("sub/a.jpg.png", "sub/a.png")] and missing == []
    coco_ref = MaskSource(Path("gt.json"), "coco", {"sub/a.jpg": 1, "sub/a.png": 2})
    assert match_names(["sub/a.jpg.png", "sub/a.png.png"], coco_ref)[0] == [("sub/a.jpg.png", "sub/a.jpg"),
                                                                            ("sub/a.png.png", "sub/a.png")]
