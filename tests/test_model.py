import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from segfromxai.models.model import Preprocess, data_dir, load_model, read_card, token_grid, write_card


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def _save_named(m, path):
    """Save the _tiny() model as segfromxai does: safetensors naming its timm model and kwargs."""
    save_file(m.state_dict(), str(path), metadata={
        "timm_name": "vit_tiny_patch16_224",
        "timm_kwargs": json.dumps({"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 3})})
    return path


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown timm model 'vit_small_patch16_22'.*vit_small_patch16_224"):
        load_model("vit_small_patch16_22")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="model card not found"):
        load_model(checkpoint=tmp_path / "nope" / "card.json")


def test_safetensors_round_trip_names_its_model(tmp_path):
    m = _tiny()
    path = _save_named(m, tmp_path / "w.safetensors")
    loaded = load_model(checkpoint=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), m(x), atol=1e-6)
    assert loaded.classes == ["class_0", "class_1", "class_2"]
    assert loaded.preprocess.size == (32, 32)


def test_torch_checkpoint_wrapped_and_prefixed_loads_with_num_classes_from_head(tmp_path):
    m = _tiny(num_classes=7)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, path)
    loaded = load_model("vit_tiny_patch16_224", checkpoint=path, img_size=32, patch_size=8, depth=2,
                        classes=list("abcdefg"))
    assert loaded.module.num_classes == 7 and loaded.classes == list("abcdefg")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), m(x), atol=1e-6)


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_torch_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model("vit_tiny_patch16_224", checkpoint=path)


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    m = _tiny()
    path = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"does not fit the architecture.*(missing|mis-shaped) keys"):
        load_model("resnet18", checkpoint=path)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("blocks.1.")}
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\."):
        load_model("vit_tiny_patch16_224", checkpoint=path, img_size=32, patch_size=8, depth=2)


def test_position_embedding_resampled_to_another_grid(tmp_path):
    m = _tiny()
    path = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(path))
    loaded = load_model("vit_tiny_patch16_224", checkpoint=path, img_size=48, patch_size=8, depth=2)
    assert token_grid(loaded.module) == (6, 6)
    assert loaded.module.pos_embed.shape == (1, 1 + 36, 192)
    assert torch.equal(loaded.module.pos_embed[:, :1], m.pos_embed[:, :1])  # class token kept


def test_card_round_trip(tmp_path):
    m = _tiny()
    save_file({k: v.half() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    pre = Preprocess(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    card = {"timm_name": "vit_tiny_patch16_224",
            "timm_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 3},
            "classes": ["a", "b", "c"], "preprocess": pre.to_dict(), "weights": "model.safetensors"}
    write_card(tmp_path / "card.json", card)
    assert read_card(tmp_path)["classes"] == ["a", "b", "c"]
    for ref in (tmp_path, tmp_path / "card.json"):
        loaded = load_model(checkpoint=ref)
        assert loaded.classes == ["a", "b", "c"] and loaded.preprocess == pre
        assert loaded.module.blocks[0].attn.qkv.weight.dtype == torch.float32
        assert torch.equal(loaded.module.pos_embed, m.pos_embed.half().float())


def test_card_with_wrong_format_or_missing_key_is_refused(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a segfromxai model card"):
        load_model(checkpoint=tmp_path)
    write_card(tmp_path / "card.json", {"timm_name": "x", "classes": []})
    with pytest.raises(ValueError, match="lacks the key 'preprocess'"):
        load_model(checkpoint=tmp_path)


def test_preprocess_resizes_whole_image_and_normalises():
    pre = Preprocess(size=(16, 24), mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    img = np.empty((40, 90, 3), np.uint8)
    img[:] = (51, 102, 153)  # = mean * 255
    x = pre(img)
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-6)
    img[:] = 255
    assert torch.allclose(pre(img)[0], torch.full((16, 24), (1 - 0.2) / 0.5))
    assert pre.batch([img, img]).shape == (2, 3, 16, 24)
    with pytest.raises(ValueError, match="RGB uint8"):
        pre(img[..., 0])


def test_timm_preprocessing_of_a_cnn_and_vit_only_helpers():
    loaded = load_model("resnet18", num_classes=4)
    assert not loaded.is_vit and loaded.preprocess.size == (224, 224)
    assert loaded.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    with pytest.raises(TypeError, match="not a Vision Transformer"):
        token_grid(loaded.module)
    logits = loaded([np.zeros((50, 70, 3), np.uint8)])
    assert logits.shape == (1, 4)


def test_pretrained_without_a_name_is_refused():
    with pytest.raises(ValueError, match="needs a model name"):
        load_model(pretrained=True)


def test_checkpoint_metadata_kwargs_apply_when_the_name_matches(tmp_path):
    m = _tiny()
    path = _save_named(m, tmp_path / "w.safetensors")
    loaded = load_model("vit_tiny_patch16_224", checkpoint=path)
    assert len(loaded.module.blocks) == 2 and loaded.preprocess.size == (32, 32)
    save_file(m.state_dict(), str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="does not name its timm model"):
        load_model(checkpoint=tmp_path / "bare.safetensors")


def test_card_with_a_base_shares_its_tensors_and_checks_its_hash(tmp_path, monkeypatch):
    """A card with ``base`` takes the base card's tensors (less the base's head) and overrides them with its own;
    the base's hash is checked, and a base outside data/ is refused."""
    from segfromxai.models.model import sha256

    monkeypatch.setenv("SEGFROMXAI_DATA", str(tmp_path))
    base, own = _tiny(), _tiny()
    with torch.no_grad():
        for p in own.parameters():
            p.add_(1.0)
    (tmp_path / "base").mkdir()
    save_file(base.state_dict(), str(tmp_path / "base" / "model.safetensors"))
    pre = Preprocess(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
    write_card(tmp_path / "base" / "card.json", {
        "timm_name": "vit_tiny_patch16_224", "timm_kwargs": {**kwargs, "num_classes": 3}, "classes": ["a", "b", "c"],
        "preprocess": pre.to_dict(), "weights": "model.safetensors"})
    delta = {k: v for k, v in own.state_dict().items() if k.startswith("blocks.1.") or k.startswith("norm.")}
    (tmp_path / "feat").mkdir()
    save_file(delta, str(tmp_path / "feat" / "delta.safetensors"))
    card = {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {**kwargs, "num_classes": 0}, "classes": [],
            "preprocess": pre.to_dict(), "weights": "delta.safetensors",
            "base": {"card": "base", "weights_sha256": sha256(tmp_path / "base" / "model.safetensors")}}
    write_card(tmp_path / "feat" / "card.json", card)
    got = load_model(checkpoint=tmp_path / "feat").module.state_dict()
    assert "head.weight" not in got or got["head.weight"].numel() == 0
    for k, v in got.items():
        ref = delta[k] if k in delta else base.state_dict()[k]
        assert torch.equal(v, ref), k
    write_card(tmp_path / "feat" / "card.json", {**card, "base": {**card["base"], "weights_sha256": "0" * 64}})
    with pytest.raises(ValueError, match="not the weights it was built on"):
        load_model(checkpoint=tmp_path / "feat")
    write_card(tmp_path / "feat" / "card.json", {**card, "base": {**card["base"], "card": "../base"}})
    with pytest.raises(ValueError, match="folder name in"):
        load_model(checkpoint=tmp_path / "feat")
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    (tmp_path / "base").rename(outside)
    (tmp_path / "base").symlink_to(outside)  # a link out of data/ is refused even with the right hash
    write_card(tmp_path / "feat" / "card.json", card)
    with pytest.raises(ValueError, match="folder name in"):
        load_model(checkpoint=tmp_path / "feat")


def test_shipped_dinov2_is_the_backbone_under_the_embedded_model():
    """data/dinov2 shares data/model's patch embedding and frozen blocks 0-7 exactly and has its own blocks 8-11
    (the embedded model's were fine-tuned); it is headless."""
    emb = load_model().module.state_dict()
    dino = load_model(checkpoint=data_dir() / "dinov2")
    assert dino.module.num_classes == 0 and dino.classes == []
    sd = dino.module.state_dict()
    for k in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.7.mlp.fc2.weight"):
        assert torch.equal(sd[k], emb[k]), k
    for k in ("blocks.8.attn.qkv.weight", "blocks.11.attn.qkv.weight", "norm.weight"):
        assert not torch.equal(sd[k], emb[k]), k
