"""Student segmenter: a tiny run end to end (train, predict, evaluate), self-training, the held-out split, label
filters, checkpoints, resume after an interruption and after SIGKILL, determinism, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from segfromxai.ops import masks as mask_ops
from segfromxai.cli import main
from segfromxai.student.config import StudentConfig
from segfromxai.student.data import held_out, split
from segfromxai.student.heads import HEADS
from segfromxai.student.job import train_student
from segfromxai.student.targets import pseudo_targets
from segfromxai.student.tokens import Tokens
from segfromxai.student.train import load_checkpoint, load_student, save_checkpoint, train_head
from conftest import STUDENT_FAST, coco_anns, outlier_tokens

FAST = STUDENT_FAST
def test_held_out_is_a_stable_hash_of_the_name_with_the_requested_share():
    name = "sub/img_001.png"
    h = int(hashlib.sha1(name.encode()).hexdigest()[:16], 16) / 2**64  # slow reference
    assert held_out(name, h + 1e-9) and not held_out(name, h - 1e-9)
    share = np.mean([held_out(f"{i:05d}.png", 0.2) for i in range(2000)])
    assert 0.17 < share < 0.23


def test_split_holds_out_only_when_predicting_the_training_folder(synth_images, tmp_path):
    names = sorted(p.name for p in (synth_images / "images").iterdir())
    cfg = StudentConfig(val_fraction=0.3)
    sp = split(names, synth_images / "images", synth_images / "images", cfg)
    assert sp.held_out and sp.test and not set(sp.test) & set(sp.train)
    assert sorted(sp.test + sp.train) == names
    other = split(names, tmp_path, synth_images / "images", cfg)
    assert not other.held_out and other.train == names and other.test == names
    asked = split(names, synth_images / "images", synth_images / "images", StudentConfig(holdout=False))
    assert not asked.held_out and asked.test == names


def test_pseudo_targets_filters_large_and_low_score_masks():
    size = (10, 10)
    small = np.zeros(size, bool)
    small[2:5, 2:5] = True
    big = np.ones(size, bool)
    big[0] = False  # 90% of the image
    anns = {"a.png": [{"category_id": 2, "segmentation": mask_ops.encode(small), "score": 0.9}],
            "b.png": [{"category_id": 1, "segmentation": mask_ops.encode(big), "score": 0.9}],
            "c.png": [{"category_id": 1, "segmentation": mask_ops.encode(small), "score": 0.1}],
            "d.png": []}
    sizes = {n: size for n in anns}
    channel = {1: 1, 2: 2}
    t, keep = pseudo_targets(anns, sizes, list(anns), (5, 5), channel, max_area=0.5, min_score=0.5)
    assert keep.tolist() == [True, False, False, False]
    expected = np.zeros((5, 5), np.uint8)
    expected[1:3, 1:3] = 2  # nearest resampling of rows/cols 2..4 at scale 2
    assert np.array_equal(t[0], expected)
    _, keep = pseudo_targets(anns, sizes, list(anns), (5, 5), channel)
    assert keep.tolist() == [True, True, True, False]


def _toy_tokens(n: int = 6, g: int = 4, d: int = 3) -> tuple[Tokens, np.ndarray]:
    """Tokens whose first feature says foreground (+1) or background (-1): a linear probe can learn it exactly."""
    rng = np.random.default_rng(0)
    fg = rng.random((n, g, g)) > 0.5
    grid = np.concatenate([np.where(fg, 1.0, -1.0)[..., None], rng.normal(0, 0.1, (n, g, g, d - 1))], -1)
    views = np.stack([grid, grid[:, :, ::-1]], 1)
    tokens = Tokens([f"{i}.png" for i in range(n)], [(g, g)] * n, torch.tensor(views, dtype=torch.float16),
                    np.zeros((n, 0), np.float32))
    return tokens, fg.astype(np.uint8)


def test_linear_probe_learns_a_linearly_separable_known_answer():
    from segfromxai.student.heads import view_probs

    tokens, target = _toy_tokens()
    head = train_head(tokens, target, np.ones(len(target), bool), 2,
                      StudentConfig(head="linear", epochs=40, lr=0.1, batch_size=4))
    with torch.no_grad():
        pred = view_probs(head, tokens.grid, (4, 4)).argmax(1).numpy()
    assert np.array_equal(pred, target)


def test_context_head_learns_a_neighbourhood_label_that_a_linear_probe_cannot():
    """Known answer: one marked token per image, its 3x3 neighbourhood the foreground. Its neighbours' own features
    are those of the background, so only a head that sees a token's neighbours (``context``, 3x3) can learn it."""
    from segfromxai.student.heads import view_probs

    rng = np.random.default_rng(0)
    n, g = 8, 6
    grid = np.zeros((n, g, g, 2))
    grid[..., 1] = 1.0
    fg = np.zeros((n, g, g), np.uint8)
    for i, (r, c) in enumerate(rng.integers(1, g - 1, (n, 2))):
        grid[i, r, c, 0] = 1.0
        fg[i, r - 1:r + 2, c - 1:c + 2] = 1
    views = np.stack([grid, grid[:, :, ::-1]], 1)
    tokens = Tokens([f"{i}.png" for i in range(n)], [(g, g)] * n, torch.tensor(views, dtype=torch.float16),
                    np.zeros((n, 0), np.float32))
    got = {}
    for name in ("linear", "context"):
        head = train_head(tokens, fg, np.ones(n, bool), 2, StudentConfig(head=name, epochs=150, lr=0.1, batch_size=8))
        with torch.no_grad():
            got[name] = (view_probs(head, tokens.grid, (g, g)).argmax(1).numpy() == fg).mean()
    assert got["context"] == 1.0 and got["linear"] < 0.9, got


def test_bn_linear_head_learns_a_label_that_an_outlier_channel_hides_from_a_linear_probe():
    """Known answer: the label is the sign of a small channel (+-0.01), next to a channel of noise 1000 times
    larger (as a ViT's inner blocks have a few such channels). Batch norm puts both on one scale, so ``bn-linear``
    learns the label; the plain linear probe, whose noise weight moves as fast as its signal weight under AdamW,
    does not."""
    from segfromxai.student.heads import view_probs

    tokens, fg = outlier_tokens()
    n, g = fg.shape[:2]
    got = {}
    for name in ("linear", "bn-linear"):
        head = train_head(tokens, fg, np.ones(n, bool), 2, StudentConfig(head=name, epochs=40, lr=0.05, batch_size=8,
                                                                        flip=False))
        with torch.no_grad():
            got[name] = (view_probs(head, tokens.grid, (g, g)).argmax(1).numpy() == fg).mean()
    assert got["bn-linear"] == 1.0 and got["linear"] < 0.8, got


def test_checkpoint_round_trip_restores_head_and_optimiser(tmp_path):
    tokens, target = _toy_tokens()
    cfg = StudentConfig(head="linear", epochs=2, lr=0.1, batch_size=4)
    head = train_head(tokens, target, np.ones(len(target), bool), 2, cfg, checkpoint=tmp_path / "c.safetensors",
                      key="k")
    fresh = HEADS["linear"](3, 2)
    opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert load_checkpoint(tmp_path / "c.safetensors", fresh, opt, "other") == 0
    assert load_checkpoint(tmp_path / "c.safetensors", fresh, opt, "k") == 2
    for a, b in zip(head.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    save_checkpoint(tmp_path / "d.safetensors", fresh, opt, 2, "k")
    again = HEADS["linear"](3, 2)
    opt2 = torch.optim.AdamW(again.parameters(), lr=0.1)
    load_checkpoint(tmp_path / "d.safetensors", again, opt2, "k")
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_tiny_student_end_to_end_trains_predicts_and_scores(tiny_model, tiny_run, synth_images, tmp_path):
    from pycocotools.coco import COCO

    cfg = StudentConfig(val_fraction=0.4, rounds=2, **FAST)
    logs = []
    summary = train_student(tiny_run, synth_images / "images", tmp_path, model=tiny_model, config=cfg,
                            gt=synth_images / "annotations.json", log=logs.append)
    assert summary["held_out"] and [r["round"] for r in summary["rounds"]] == [1, 2]
    coco = COCO(str(tmp_path / "student_labels.json"))
    predicted = sorted(i["file_name"] for i in coco.dataset["images"])
    assert predicted and all(held_out(n, 0.4) for n in predicted)
    run_cats = json.loads((tiny_run / "pseudo_labels.json").read_text())["categories"]
    assert coco.dataset["categories"] == run_cats
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["comparisons"]) == {"pseudo vs GT", "student vs GT", "pseudo vs student"}
    assert metrics["comparisons"]["student vs GT"]["n_images"] == len(predicted)
    assert metrics["comparisons"]["pseudo vs GT"]["n_images"] == len(predicted)  # scored on the same images
    assert len(logs) == 2 and "student vs GT" in logs[0] and "round 2" in logs[1]
    card = json.loads((tmp_path / "round_2" / "card.json").read_text())
    assert card["format"] == "segfromxai-model-card/1" and card["round"] == 2
    model, head, _ = load_student(tmp_path / "round_2")
    assert isinstance(head, type(HEADS[cfg.head](1, 1))) and cfg.head == "linear"  # the default head


def test_same_run_twice_gives_the_same_masks(tiny_model, tiny_run, synth_images, tmp_path):
    cfg = StudentConfig(val_fraction=0.4, **FAST)
    for name in ("a", "b"):
        train_student(tiny_run, synth_images / "images", tmp_path / name, model=tiny_model, config=cfg)
    a, b = coco_anns(tmp_path / "a" / "student_labels.json"), coco_anns(tmp_path / "b" / "student_labels.json")
    assert a == b


def test_resume_after_an_interruption_ends_with_the_same_masks(tiny_model, tiny_run, synth_images, tmp_path):
    cfg = StudentConfig(val_fraction=0.4, rounds=2, **FAST)
    images = synth_images / "images"
    train_student(tiny_run, images, tmp_path / "ref", model=tiny_model, config=cfg)

    def stop(round_: int, epoch: int) -> None:
        if (round_, epoch) == (2, 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(tiny_run, images, tmp_path / "cut", model=tiny_model, config=cfg, on_epoch=stop)
    assert (tmp_path / "cut" / "round_1" / "card.json").is_file()
    assert (tmp_path / "cut" / "round_2" / "checkpoint.safetensors").is_file()
    seen = []
    train_student(tiny_run, images, tmp_path / "cut", model=tiny_model, config=cfg,
                  on_epoch=lambda r, e: seen.append((r, e)))
    assert seen == [(2, 3)]  # round 1 reloaded, round 2 continued after its last checkpoint
    assert coco_anns(tmp_path / "ref" / "student_labels.json") == coco_anns(tmp_path / "cut" / "student_labels.json")


def test_resume_after_sigkill(tiny_card, tiny_model, tiny_run, synth_images, tmp_path):
    cfg = dict(val_fraction=0.4, **FAST)
    script = textwrap.dedent(f"""
        import os, signal
        from segfromxai.models.model import load_model
        from segfromxai.student.config import StudentConfig
        from segfromxai.student.job import train_student

        def kill(round_, epoch):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        train_student({str(tiny_run)!r}, {str(synth_images / 'images')!r}, {str(tmp_path / 'cut')!r},
                      model=load_model(checkpoint={str(tiny_card)!r}), config=StudentConfig(**{cfg!r}), on_epoch=kill)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (tmp_path / "cut" / "round_1" / "checkpoint.safetensors").is_file()
    seen = []
    train_student(tiny_run, synth_images / "images", tmp_path / "cut", model=tiny_model,
                  config=StudentConfig(**cfg), on_epoch=lambda r, e: seen.append(e))
    train_student(tiny_run, synth_images / "images", tmp_path / "ref", model=tiny_model, config=StudentConfig(**cfg))
    assert seen == [3]
    assert coco_anns(tmp_path / "ref" / "student_labels.json") == coco_anns(tmp_path / "cut" / "student_labels.json")


def test_cli_student_prints_the_table_per_round(tiny_card, tiny_run, synth_images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["student", "--train", str(tiny_run), "--images", str(synth_images / "images"),
                                    "--out", "out", "--gt", str(synth_images / "annotations.json"),
                                    "--rounds", "2", "--epochs", "2", "--val-fraction", "0.4", "--max-area", "0.9",
                                    "--token-cache", "tok", "--checkpoint", str(tiny_card)])
    assert res.exit_code == 0, res.output
    assert "round 1" in res.output and "round 2" in res.output and "student vs GT" in res.output
    assert (tmp_path / "out" / "student_labels.json").is_file() and (tmp_path / "out" / "metrics.json").is_file()
    assert len(list((tmp_path / "tok").glob("*.safetensors"))) == 2  # a relative cache is relative to the cwd
    card = json.loads((tmp_path / "out" / "round_2" / "card.json").read_text())
    assert card["input_size"] == [392, 392]  # the default trunk input


def test_cli_student_names_the_valid_heads(tiny_card, tiny_run, synth_images, tmp_path):
    res = CliRunner().invoke(main, ["student", "--train", str(tiny_run), "--images", str(synth_images / "images"),
                                    "--out", str(tmp_path), "--head", "unet", "--checkpoint", str(tiny_card)])
    assert res.exit_code != 0 and all(h in res.output for h in HEADS)


def _attributes(path: Path) -> list[dict]:
    return [a["attributes"] for a in json.loads(path.read_text())["annotations"]]


def test_masks_take_the_run_recipes_boundary_and_an_override_reuses_the_trained_heads(tiny_model, tiny_run,
                                                                                       synth_images, tmp_path):
    from segfromxai.stages.boundary import BOUNDARIES

    method = json.loads((tiny_run / "run.json").read_text())["recipe"]["boundary"]["method"]
    assert method != "none" and method in BOUNDARIES  # the default recipe has a boundary stage
    cfg = StudentConfig(val_fraction=0.4, **FAST)
    images = synth_images / "images"
    train_student(tiny_run, images, tmp_path, model=tiny_model, config=cfg, gt=synth_images / "annotations.json")
    snapped = coco_anns(tmp_path / "student_labels.json")
    assert {a["boundary"] for a in _attributes(tmp_path / "student_labels.json")} == {method}
    assert (tmp_path / "report.html").is_file() and list((tmp_path / "sheets").glob("*.png"))
    seen = []
    off = StudentConfig(val_fraction=0.4, boundary="none", **FAST)
    train_student(tiny_run, images, tmp_path, model=tiny_model, config=off, on_epoch=lambda r, e: seen.append(e))
    assert seen == []  # the boundary does not change the head: round 1 is reloaded, not retrained
    assert {a["boundary"] for a in _attributes(tmp_path / "student_labels.json")} == {"none"}
    assert coco_anns(tmp_path / "student_labels.json") != snapped


def test_boundary_none_gives_the_winning_pixels_of_the_students_probabilities(tiny_model, tiny_run, synth_images,
                                                                               tmp_path):
    from segfromxai.student.heads import view_probs
    from segfromxai.student.job import prepare

    cfg = StudentConfig(val_fraction=0.4, boundary="none", **FAST)
    train_student(tiny_run, synth_images / "images", tmp_path, model=tiny_model, config=cfg)
    _, head, _ = load_student(tmp_path / "round_1")
    job = prepare(tiny_run, synth_images / "images", model=tiny_model, config=cfg)
    doc = json.loads((tmp_path / "student_labels.json").read_text())
    for i, img in enumerate(doc["images"]):
        with torch.no_grad():
            p = view_probs(head, job.test.grid[i:i + 1, :1], (img["height"], img["width"]))[0].numpy()
        got = np.zeros((img["height"], img["width"]), bool)
        for a in doc["annotations"]:
            if a["image_id"] == img["id"]:
                got |= mask_ops.decode(a["segmentation"])
        want = mask_ops.clean([p.argmax(0) == 1], **job.labeller.mask_params)
        assert np.array_equal(got, np.any(want, 0) if want else np.zeros_like(got))


def test_trunk_at_a_larger_input_gives_a_finer_grid_and_the_classifiers_own_classes(tiny_model, tiny_run,
                                                                                    synth_images, tmp_path):
    from segfromxai.student.tokens import cache_tokens, student_trunk

    names = sorted(p.name for p in (synth_images / "images").iterdir())[:3]
    native = cache_tokens(tiny_model, synth_images / "images", names)
    big = cache_tokens(tiny_model, synth_images / "images", names, trunk=student_trunk(tiny_model, 64))
    assert tuple(native.grid.shape[2:4]) == (4, 4) and tuple(big.grid.shape[2:4]) == (8, 8)
    assert np.allclose(big.probs, native.probs, atol=1e-6)  # the class run explains, at the classifier's size
    assert student_trunk(tiny_model, 32).module is tiny_model.module
    cfg = StudentConfig(val_fraction=0.4, **{**FAST, "img_size": 64})
    train_student(tiny_run, synth_images / "images", tmp_path, model=tiny_model, config=cfg)
    card = json.loads((tmp_path / "round_1" / "card.json").read_text())
    assert card["input_size"] == [64, 64] and card["config"]["img_size"] == 64


def test_cli_student_refuses_an_unknown_boundary_naming_the_valid_ones(tiny_card, tiny_run, synth_images, tmp_path):
    from segfromxai.stages.boundary import BOUNDARIES

    res = CliRunner().invoke(main, ["student", "--train", str(tiny_run), "--images", str(synth_images / "images"),
                                    "--out", str(tmp_path), "--boundary", "snap", "--checkpoint", str(tiny_card)])
    assert res.exit_code != 0 and all(b in res.output for b in BOUNDARIES)


def test_tokens_are_cached_on_disk_and_reused(tiny_model, tiny_run, synth_images, tmp_path, monkeypatch):
    import segfromxai.student.tokens as tokens

    cfg = StudentConfig(val_fraction=0.4, **FAST)
    train_student(tiny_run, synth_images / "images", tmp_path / "a", model=tiny_model, config=cfg,
                  cache=tmp_path / "tok")
    assert len(list((tmp_path / "tok").glob("*.safetensors"))) == 2  # training images (with mirrors), held out

    def no_trunk(*args, **kwargs):
        raise AssertionError("the trunk ran again")

    monkeypatch.setattr(tokens, "cache_tokens", no_trunk)  # where stored_tokens looks it up
    train_student(tiny_run, synth_images / "images", tmp_path / "b", model=tiny_model, config=cfg,
                  cache=tmp_path / "tok")
    assert coco_anns(tmp_path / "a" / "student_labels.json") == coco_anns(tmp_path / "b" / "student_labels.json")


def test_a_torchvision_segmenter_student_trains_on_the_pixels_and_writes_coco(tiny_model, tiny_run, synth_images,
                                                                               tmp_path):
    """``--head lraspp``: torchvision's LR-ASPP (no download) trained on the images themselves at 64 px, end to end
    through the same rounds, labels, card and reload as a token head."""
    from pycocotools.coco import COCO

    from segfromxai.student.heads import Segmenter
    from segfromxai.student.tokens import Pixels, student_trunk

    trunk = student_trunk(tiny_model, 64, pixels=True)
    assert isinstance(trunk.module, Pixels) and trunk.preprocess.size == (64, 64)
    cfg = StudentConfig(head="lraspp", val_fraction=0.4, epochs=1, batch_size=4, lr=1e-3, img_size=64)
    summary = train_student(tiny_run, synth_images / "images", tmp_path, model=tiny_model, config=cfg,
                            gt=synth_images / "annotations.json")
    coco = COCO(str(tmp_path / "student_labels.json"))
    assert summary["held_out"] and coco.dataset["images"]
    assert all(held_out(i["file_name"], 0.4) for i in coco.dataset["images"])
    _, head, card = load_student(tmp_path / "round_1")
    assert isinstance(head, Segmenter) and card["input_size"] == [64, 64]
    with torch.no_grad():
        assert head(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_head_weights_start_a_segmenter_from_a_classification_backbone(tmp_path):
    """Known answer: a MobileNetV3-Large classifier's ``features.N`` tensors land in the segmenter's
    ``net.backbone.N``; its 1000-class classifier fits nothing and is left out; a file that fits nothing fails."""
    from safetensors.torch import save_file
    from torchvision.models import mobilenet_v3_large

    from segfromxai.student.heads import Segmenter, load_head_weights

    torch.manual_seed(1)
    cnn = mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pt"
    torch.save(cnn.state_dict(), path)
    seg = Segmenter("lraspp", 2)
    n = load_head_weights(seg, path)
    feats = {k: v for k, v in cnn.state_dict().items() if k.startswith("features.")}
    assert n == len(feats)
    own = seg.state_dict()
    assert all(torch.equal(own["net.backbone." + k.removeprefix("features.")], v) for k, v in feats.items())
    save_file({"nothing": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="none of its 1 tensors"):
        load_head_weights(seg, tmp_path / "bad.safetensors")


def test_predict_gives_the_same_records_on_one_and_two_threads(tiny_model, tiny_run, synth_images, tmp_path):
    """The masks of a chunk are made on worker threads (GrabCut included); the records must not depend on how
    many."""
    from segfromxai.student.job import prepare, run_round
    from segfromxai.student.predict import predict

    cfg = StudentConfig(val_fraction=0.4, boundary="grabcut", **FAST)
    job = prepare(tiny_run, synth_images / "images", model=tiny_model, config=cfg)
    head = run_round(job, 1, "k", tmp_path, model=tiny_model, config=cfg)
    one = predict(head, job.test, job.labeller, chunk=3, workers=1)
    two = predict(head, job.test, job.labeller, chunk=3, workers=2)
    assert len(one) == len(job.test.names) and any(r["annotations"] for r in one)
    assert one == two

