"""The student's trunk: its last blocks' tokens (``--blocks``) and its precision (``--trunk-dtype``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segfromxai.student.config import TRUNK_DTYPES, StudentConfig
from segfromxai.student.job import train_student
from segfromxai.student.train import load_student
from conftest import STUDENT_FAST, coco_anns, outlier_tokens

FAST = STUDENT_FAST


def test_last_blocks_tokens_are_each_blocks_output_after_the_final_norm(tiny_model):
    """Reference: forward hooks on the last two blocks, the final norm applied, prefix tokens dropped, reshaped to
    the grid; the last slice is the one-block trunk's tokens, and the classifier's probabilities are unchanged."""
    import torch

    from segfromxai.student.tokens import LastBlocks, student_trunk, trunk_tokens

    vit = tiny_model.module.eval()
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in vit.blocks[-2:]]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one, probs = trunk_tokens(vit, x)
        seen.clear()
        grid, probs2 = trunk_tokens(student_trunk(tiny_model, blocks=2).module, x)
    for h in hooks:
        h.remove()
    gh, gw, d = one.shape[1:]
    want = [vit.norm(t)[:, vit.num_prefix_tokens:].reshape(2, gh, gw, d) for t in seen]
    assert grid.shape == (2, gh, gw, 2 * d)
    assert torch.allclose(grid[..., :d], want[0], atol=1e-5) and torch.allclose(grid[..., d:], want[1], atol=1e-5)
    assert torch.allclose(grid[..., d:], one, atol=1e-5) and torch.allclose(probs2, probs, atol=1e-6)
    deep = LastBlocks(vit, len(vit.blocks) + 3)  # at most the trunk's depth
    assert deep.blocks == len(vit.blocks) and deep.num_features == len(vit.blocks) * d


def test_a_student_on_two_blocks_trains_reloads_and_labels_as_it_was_trained(tiny_model, tiny_run, synth_images,
                                                                             tmp_path):
    from segfromxai.student.label import label_folder, open_student

    cfg = StudentConfig(val_fraction=0.4, head="linear", blocks=2, **FAST)
    train_student(tiny_run, synth_images / "images", tmp_path / "s", model=tiny_model, config=cfg)
    _, head, card = load_student(tmp_path / "s" / "round_1")
    assert card["config"]["blocks"] == 2 and head.weight.shape[1] == 2 * tiny_model.module.num_features
    student = open_student(tmp_path / "s")
    label_folder(student, synth_images / "images", tmp_path / "p")
    trained = coco_anns(tmp_path / "s" / "student_labels.json")
    names = {a[0] for a in trained}
    labelled = [a for a in coco_anns(tmp_path / "p" / "pseudo_labels.json") if a[0] in names]
    assert trained and sorted(labelled) == sorted(trained)
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        StudentConfig(blocks=0)


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path):
    from segfromxai.student.tokens import cpu_has_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_bf16(info)
    for flag in ("amx_bf16", "avx512_bf16"):
        info.write_text(f"processor\t: 0\nflags\t\t: fpu avx2 {flag} avx512f\n")
        assert cpu_has_bf16(info)
    assert not cpu_has_bf16(tmp_path / "missing")


def test_trunk_dtype_auto_follows_the_device(monkeypatch):
    import segfromxai.student.tokens as tokens

    assert not tokens.use_bf16("float32", "cpu") and tokens.use_bf16("bfloat16", "cpu")
    for native in (False, True):
        monkeypatch.setattr(tokens, "cpu_has_bf16", lambda: native)
        assert tokens.use_bf16("auto", "cpu") is native
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        tokens.use_bf16("half", "cpu")
    with pytest.raises(ValueError, match="unknown trunk dtype"):
        StudentConfig(trunk_dtype="half")


def test_cli_trunk_dtypes_are_the_configs():
    from segfromxai import options

    assert options.TRUNK_DTYPES == TRUNK_DTYPES


def test_bf16_tokens_are_close_to_float32_and_cached_apart(tiny_model, synth_images, tmp_path):
    from segfromxai.io.images import load_image
    from segfromxai.student.tokens import batch_tokens, stored_tokens, student_trunk, token_key

    root = synth_images / "images"
    names = sorted(p.name for p in root.iterdir())[:2]
    trunk = student_trunk(tiny_model, blocks=2)
    ims = [load_image(root / n) for n in names]
    g32, p32 = batch_tokens(tiny_model, trunk, ims, True)
    g16, p16 = batch_tokens(tiny_model, trunk, ims, True, bf16=True)
    assert g16.shape == g32.shape and g16.dtype == torch.float16
    rel = float((g16.float() - g32.float()).norm() / g32.float().norm())
    assert 0 < rel < 0.02, rel  # bfloat16 keeps 8 bits of mantissa: about 0.4% per value
    assert np.allclose(p16, p32, atol=0.02)
    assert token_key(tiny_model, trunk, root, names, True) != token_key(tiny_model, trunk, root, names, True, True)
    a = stored_tokens(tiny_model, root, names, cache=tmp_path, trunk=trunk, bf16=True)
    assert torch.equal(a.grid, g16) and len(list(tmp_path.glob("*.safetensors"))) == 1


def test_a_card_from_before_trunk_dtype_labels_in_float32(tiny_model, tiny_run, synth_images, tmp_path):
    from segfromxai.student.label import open_student

    train_student(tiny_run, synth_images / "images", tmp_path, model=tiny_model,
                  config=StudentConfig(val_fraction=0.4, **{**FAST, "trunk_dtype": "bfloat16"}))
    assert open_student(tmp_path).bf16
    card_path = tmp_path / "round_1" / "card.json"
    card = json.loads(card_path.read_text())
    del card["config"]["trunk_dtype"]
    card_path.write_text(json.dumps(card))
    assert not open_student(tmp_path).bf16


def test_standardize_fits_the_training_tokens_statistics_against_numpy():
    from segfromxai.student.heads import HEADS, Standardize

    rng = np.random.default_rng(0)
    grid = torch.tensor(rng.normal([1.0, -3.0, 50.0], [0.5, 2.0, 30.0], (7, 3, 4, 3)), dtype=torch.float16)
    s = Standardize(3)
    s.fit(grid[i:i + 2] for i in range(0, 7, 2))
    flat = grid.double().numpy().reshape(-1, 3)
    assert np.allclose(s.mean.numpy(), flat.mean(0), rtol=1e-5) and np.allclose(s.std.numpy(), flat.std(0), rtol=1e-5)
    x = grid[:2].float().permute(0, 3, 1, 2)
    want = (x.double().numpy() - flat.mean(0)[:, None, None]) / flat.std(0)[:, None, None]
    assert np.allclose(s(x).numpy(), want, atol=1e-4)
    head = HEADS["std-linear"](3, 2)
    assert set(head.state_dict()) >= {"0.mean", "0.std"}  # a saved head carries its statistics


def test_std_linear_learns_a_label_that_an_outlier_channel_hides_and_keeps_its_statistics(tmp_path):
    from segfromxai.student.heads import view_probs
    from segfromxai.student.train import train_head

    tokens, fg = outlier_tokens()
    n, g = fg.shape[:2]
    keep = np.ones(n, bool)
    keep[0] = False  # statistics of the trained images only
    head = train_head(tokens, fg, keep, 2, StudentConfig(head="std-linear", epochs=40, lr=0.05, batch_size=8,
                                                         flip=False))
    with torch.no_grad():
        acc = (view_probs(head, tokens.grid, (g, g)).argmax(1).numpy() == fg).mean()
    assert acc == 1.0
    used = tokens.grid[1:, 0].double().numpy().reshape(-1, 2)
    assert np.allclose(head[0].mean.numpy(), used.mean(0), rtol=1e-4)


def test_trunk_dtype_auto_on_a_gpu_asks_for_native_bfloat16(monkeypatch):
    import segfromxai.student.tokens as tokens

    asked = []

    class Device:  # torch.cuda.device as a context manager that records the device
        def __init__(self, d):
            asked.append(str(d))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", Device)
    for native in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            n and not including_emulation)
        assert tokens.use_bf16("auto", "cuda:1") is native
    assert asked == ["cuda:1", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not tokens.use_bf16("auto", "cuda")


def test_a_std_linear_head_resumed_from_its_checkpoint_is_the_fresh_one(tmp_path):
    from segfromxai.student.train import train_head

    tokens, fg = outlier_tokens()
    keep = np.arange(len(fg)) > 0
    cfg = StudentConfig(head="std-linear", epochs=4, lr=0.05, batch_size=8, flip=False)
    fresh = train_head(tokens, fg, keep, 2, cfg)

    class Stop(Exception):
        pass

    def stop(r, e):
        if e == 2:
            raise Stop

    with pytest.raises(Stop):
        train_head(tokens, fg, keep, 2, cfg, checkpoint=tmp_path / "c.safetensors", key="k", on_epoch=stop)
    resumed = train_head(tokens, fg, keep, 2, cfg, checkpoint=tmp_path / "c.safetensors", key="k")
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_the_precision_auto_resolved_to_keys_the_rounds(tiny_model, tiny_run, synth_images, tmp_path, monkeypatch):
    """A job resumed where `auto` means another precision trains its rounds again on the new tokens."""
    import segfromxai.student.tokens as tokens

    cfg = StudentConfig(val_fraction=0.4, **{**FAST, "trunk_dtype": "auto"})
    seen = []
    for native in (False, True, True):
        monkeypatch.setattr(tokens, "cpu_has_bf16", lambda n=native: n)
        train_student(tiny_run, synth_images / "images", tmp_path, model=tiny_model, config=cfg, resume=True,
                      on_epoch=lambda r, e: seen.append((native, e)))
    assert seen == [(False, 1), (False, 2), (False, 3), (True, 1), (True, 2), (True, 3)]  # the third reuses
    card = json.loads((tmp_path / "round_1" / "card.json").read_text())
    assert card["trunk_bf16"] is True and card["config"]["trunk_dtype"] == "auto"


def test_blocks_above_the_depth_at_another_input_size_train_and_label(tiny_model, tiny_run, synth_images, tmp_path):
    from segfromxai.student.label import label_folder, open_student

    cfg = StudentConfig(val_fraction=0.4, head="std-linear", blocks=5, **{**FAST, "img_size": 48})
    train_student(tiny_run, synth_images / "images", tmp_path / "s", model=tiny_model, config=cfg)
    student = open_student(tmp_path / "s")
    assert student.trunk.module.blocks == len(tiny_model.module.blocks) and "last 2 blocks" in student.trunk.source
    summary = label_folder(student, synth_images / "images", tmp_path / "p")
    assert summary["counts"]["found"] == 12
