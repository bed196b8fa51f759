import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from segfromxai.cli import main
from segfromxai.models.model import create, load_model, read_card
from segfromxai.quality.synth import write_synth
from segfromxai.models.finetune import finetune, read_labelled_folder

TINY = "vit_tiny_patch16_224"


def _image_folder(root, n=12, size=32):
    """Two trivially separable classes: dark and bright images."""
    rng = np.random.default_rng(0)
    for c, (lo, hi) in {"bright": (200, 255), "dark": (0, 55)}.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(lo, hi, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_read_labelled_folder_synth_and_imagefolder(tmp_path):
    write_synth(tmp_path / "s", 5, seed=0, size=32)
    ds = read_labelled_folder(tmp_path / "s")
    assert len(ds.paths) == 5 and ds.classes[0] == "circle" and all(p.is_file() for p in ds.paths)
    _image_folder(tmp_path / "f", n=3)
    ds = read_labelled_folder(tmp_path / "f")
    assert ds.classes == ["bright", "dark"] and list(ds.labels) == [0, 0, 0, 1, 1, 1]
    write_synth(tmp_path / "m", 2, seed=0, size=32, mode="multi")
    with pytest.raises(ValueError, match="more than once"):
        read_labelled_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="neither labels.csv nor class sub-folders"):
        read_labelled_folder(tmp_path / "s" / "images")


def test_finetune_learns_a_separable_task_and_writes_a_loadable_card(tmp_path):
    data = _image_folder(tmp_path / "data")
    card = finetune(data, TINY, tmp_path / "out", img_size=32, epochs=3, batch_size=8, lr=1e-3, head_lr=1e-2,
                    val_fraction=0.25, seed=0, progress=False, storage_dtype="float32", log=lambda *_: None)
    assert card["val_accuracy"] == 1.0
    assert card["classes"] == ["bright", "dark"] and card["n_train"] == 18 and card["n_val"] == 6
    assert len(card["training"]["history"]) == 3 and card["command"].startswith("segfromxai")
    on_disk = read_card(tmp_path / "out")
    assert on_disk["weights_sha256"] == card["weights_sha256"]
    loaded = load_model(checkpoint=tmp_path / "out")
    imgs = [np.full((40, 40, 3), 240, np.uint8), np.full((40, 40, 3), 10, np.uint8)]
    assert loaded(imgs).argmax(1).tolist() == [0, 1]


def test_freeze_blocks_keeps_the_trunk_and_init_resamples_the_grid(tmp_path):
    torch.manual_seed(1)
    src, _ = create(TINY, num_classes=11, img_size=64)  # another grid (4x4) and another head
    init = tmp_path / "init.safetensors"
    save_file(src.state_dict(), str(init))
    write_synth(tmp_path / "s", 16, seed=0, size=48)
    card = finetune(tmp_path / "s", TINY, tmp_path / "out", init=init, freeze_blocks=10, img_size=48, epochs=1,
                    batch_size=8, val_fraction=0.25, progress=False, storage_dtype="float32",
                    log=lambda *_: None)
    assert card["training"]["cached_trunk"] and card["init"]["sha256"]
    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = src.state_dict()
    for k in ref:
        if k.startswith(("blocks.0.", "blocks.9.", "patch_embed.", "cls_token")):
            assert torch.equal(sd[k], ref[k]), k  # frozen
    assert not torch.equal(sd["blocks.11.mlp.fc1.weight"], ref["blocks.11.mlp.fc1.weight"])  # trained
    assert sd["pos_embed"].shape == (1, 1 + 9, 192) and sd["head.weight"].shape == (8, 192)


def test_finetune_cli_and_bad_options(tmp_path):
    data = _image_folder(tmp_path / "data", n=4)
    r = CliRunner().invoke(main, ["finetune", "--data", str(data), "--model", TINY, "--out", str(tmp_path / "o"),
                                  "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "val acc" in r.output and json.loads((tmp_path / "o" / "card.json").read_text())["seed"] == 3
    r = CliRunner().invoke(main, ["finetune", "--data", str(data), "--model", "resnet18", "--out",
                                  str(tmp_path / "o2"), "--freeze-blocks", "2", "--img-size", "32"])
    assert r.exit_code != 0 and "needs a ViT" in str(r.exception)
