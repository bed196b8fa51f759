"""The feature backbone of ncut apart from the classifier (recipe [features] model/checkpoint/img_size)."""

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

from segfromxai.cli import main
from segfromxai.models.features import (
    backbone_for,
    backbone_input,
    backbone_outputs,
    feature_layer,
    key_bias,
    layer_features,
    token_features,
    uses_classifier,
)
from segfromxai.io.images import find_images, load_image
from segfromxai.models.model import LoadedModel, Preprocess, load_model
from segfromxai.run.pipeline import feature_maps, features_key, label_batch, needed_layers, shared_pass
from segfromxai.recipe.recipe import RecipeError, parse_recipe, with_features


def _recipe(explainer="gradcam", **features):
    return parse_recipe({"explainers": {explainer: {}}, "features": features,
                         "refine": {"method": "ncut", "tau": 0.0}, "masks": {"min_area": 0.0}})


@pytest.fixture(scope="module")
def tiny_cnn():
    torch.manual_seed(0)
    m = timm.create_model("test_efficientnet", pretrained=False, num_classes=8).eval()
    pre = Preprocess(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return LoadedModel(m, [f"c{i}" for i in range(8)], pre, "test_efficientnet", {"num_classes": 8})


def _images(folder, n=3):
    return [load_image(p) for p in find_images(folder)[:n]]


def test_recipe_features_section_defaults_and_checks():
    r = _recipe()
    assert r.features == {"feature": "k", "block": -1, "model": "auto", "checkpoint": "", "img_size": 0,
                          "drop_key_bias": False}
    assert with_features(r, model="embedded", img_size=392).features["img_size"] == 392
    with pytest.raises(RecipeError, match="img_size"):
        _recipe(img_size=-1)
    with pytest.raises(RecipeError, match="feature = 'x' is not one of"):
        _recipe(feature="x")
    with pytest.raises(RecipeError, match="drop_key_bias applies to keys"):
        _recipe(feature="q", drop_key_bias=True)


def test_which_pass_gives_the_features(tiny_card, tiny_cnn):
    vit = load_model(checkpoint=tiny_card)
    assert uses_classifier(vit, {"model": "auto"}) and uses_classifier(vit, {"model": "classifier", "img_size": 32})
    assert not uses_classifier(vit, {"model": "auto", "img_size": 64})
    assert not uses_classifier(vit, {"model": "embedded"})
    assert uses_classifier(tiny_cnn, {"model": "classifier"})  # the CNN's last stage, as before
    assert not uses_classifier(tiny_cnn, {"model": "auto"})  # a CNN gets the embedded ViT-S/14 by default
    assert needed_layers(vit, _recipe("rollout", img_size=64)) == ()


def test_backbone_at_a_larger_input_matches_timm_dynamic_size(tiny_card, synth_images):
    """A ViT built at 64 px (position embedding resampled) gives the tokens timm computes with dynamic_img_size
    (the same bicubic resampling at run time) on the same 64-px input: an 8 x 8 grid instead of 4 x 4."""
    vit = load_model(checkpoint=tiny_card)
    spec = _recipe(img_size=64).features
    bb = backbone_for(vit, spec)
    assert backbone_for(vit, spec) is bb and bb.preprocess.size == (64, 64)
    ims = _images(synth_images / "images")
    xb = bb.preprocess.batch(ims)
    layer = feature_layer(bb.module, feature="k", block=-1)
    got = token_features(bb.module, backbone_outputs(bb, xb, [layer])[layer], "k", (64, 64))
    assert got.shape[:3] == (3, 8, 8)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=8, dynamic_img_size=True).eval()
    ref.load_state_dict(vit.module.state_dict())
    # reference: block 1's keys, the blocks run by hand
    with torch.no_grad():
        h = ref._pos_embed(ref.patch_embed(xb))
        h = ref.blocks[0](h)
        qkv = ref.blocks[1].attn.qkv(ref.blocks[1].norm1(h))
    k = qkv.reshape(3, 65, 3, -1)[:, 1:, 1].reshape(3, 8, 8, -1).numpy()
    np.testing.assert_allclose(got, k, atol=1e-4)


def test_drop_key_bias_subtracts_the_qkv_key_bias_which_no_attention_weight_depends_on(tiny_card, synth_images):
    """``drop_key_bias`` gives the keys less the key slice of the block's qkv bias; the attention weights computed
    by hand from the block's queries are the same with either keys (the bias adds ``q_i . b``, constant over j)."""
    vit = load_model(checkpoint=tiny_card)
    qkv = vit.module.blocks[-1].attn.qkv
    c = qkv.weight.shape[1]
    b = qkv.bias.detach().numpy()[c:2 * c]
    np.testing.assert_array_equal(key_bias(vit.module, -1), b)
    x = vit.preprocess.batch(_images(synth_images / "images"))
    layer = feature_layer(vit.module, feature="k", block=-1)
    outs = backbone_outputs(type("B", (), {"module": vit.module})(), x, [layer])
    keep = layer_features(vit.module, outs, {"feature": "k", "block": -1}, (32, 32))
    drop = layer_features(vit.module, outs, {"feature": "k", "block": -1, "drop_key_bias": True}, (32, 32))
    np.testing.assert_allclose(keep - drop, np.broadcast_to(b, keep.shape), atol=1e-6)
    q = layer_features(vit.module, outs, {"feature": "q", "block": -1}, (32, 32)).reshape(3, 16, -1)
    heads = vit.module.blocks[-1].attn.num_heads

    def weights(k: np.ndarray) -> np.ndarray:
        qh, kh = q.reshape(3, 16, heads, -1), k.reshape(3, 16, heads, -1)
        s = np.einsum("bihd,bjhd->bhij", qh, kh)
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    np.testing.assert_allclose(weights(keep.reshape(3, 16, -1)), weights(drop.reshape(3, 16, -1)), atol=1e-5)
    with pytest.raises(ValueError, match="drop_key_bias applies to keys"):
        layer_features(vit.module, outs, {"feature": "q", "block": -1, "drop_key_bias": True}, (32, 32))


def test_backbone_input_from_the_batch_equals_preprocessing_the_images_at_the_same_size(tiny_card, synth_images):
    vit = load_model(checkpoint=tiny_card)
    bb = backbone_for(vit, {"model": "classifier", "checkpoint": "", "img_size": 48})
    ims = [im[:32, :32] for im in _images(synth_images / "images")]  # already the classifier's size
    x = vit.preprocess.batch(ims)
    same = Preprocess(size=(32, 32), mean=bb.preprocess.mean, std=bb.preprocess.std)
    bb32 = type(bb)(bb.module, same, bb.source)
    np.testing.assert_allclose(backbone_input(bb32, x, vit.preprocess), same.batch(ims), atol=1e-5)
    assert backbone_input(bb, x, vit.preprocess).shape == (3, 3, 48, 48)


def test_cnn_classifier_cut_on_a_vit_backbone(tiny_cnn, tiny_card, synth_images):
    """A CNN's Grad-CAM (2 x 2 grid at 64 px) picks the side of a cut made on a ViT's 4 x 4 tokens: one extra
    forward of the backbone, none of the classifier."""
    ims = _images(synth_images / "images")
    x = tiny_cnn.preprocess.batch(ims)
    r = _recipe(model="auto", checkpoint=str(tiny_card))
    got = shared_pass(tiny_cnn, [r], x, None)[0]
    feats = feature_maps(tiny_cnn, [r], x, got, ims)
    (f,) = feats.values()
    assert f.shape[:3] == (3, 4, 4)
    lab = label_batch(tiny_cnn, [r], x, [im.shape[:2] for im in ims], images=ims)[0]
    assert lab.fused.shape[1:] == (2, 2) and all(len(m) >= 1 for m in lab.masks)


def test_cli_features_options_reach_the_recipe(tmp_path, synth_images, tiny_card):
    res = CliRunner().invoke(main, ["run", "tokencut", "--images", str(synth_images / "images"), "--out",
                                    str(tmp_path / "o"), "--checkpoint", str(tiny_card), "--limit", "2",
                                    "--features-model", "classifier", "--features-img-size", "64"])
    assert res.exit_code == 0, res.output
    import json

    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["recipe"]["features"]["img_size"] == 64 and run["recipe"]["features"]["model"] == "classifier"


def test_domain_stages_label_exactly_the_confident_images(tiny_card, synth_images):
    """Each image goes through the later stages its explained class's probability selects: ``[domain]``'s at or
    above its confidence (here a cut on the last block's output tokens, all components), the recipe's own below
    (a cut on its keys); each stages' features are computed only for a batch holding an image that goes there."""
    model = load_model(checkpoint=tiny_card)
    ims = _images(synth_images / "images", n=6)
    x = model.preprocess.batch(ims)
    sizes = [im.shape[:2] for im in ims]
    main = {"explainers": {"gradcam": {}}, "features": {"feature": "k"}, "refine": {"method": "ncut", "tau": 0.0},
            "masks": {"min_area": 0.0}}
    domain = {"features": {"feature": "tokens"}, "refine": {"method": "ncut", "tau": 0.5, "components": "all"}}
    own = label_batch(model, [parse_recipe(main)], x, sizes, images=ims)[0]
    other = label_batch(model, [parse_recipe({**main, **domain})], x, sizes, images=ims)[0]
    conf = own.confidence
    cut = float(np.sort(conf)[3])  # three images below, three at or above
    r = parse_recipe({**main, "domain": {"confidence": cut, **domain}})
    got = label_batch(model, [r], x, sizes, images=ims)[0]
    assert any(len(a) != len(b) or not all((p == q).all() for p, q in zip(a, b))
               for a, b in zip(own.masks, other.masks))  # the two ways differ on this batch
    for j in range(len(ims)):
        ref = other if conf[j] >= cut else own
        a, b = got.masks[j], ref.masks[j]
        assert len(a) == len(b) and all((p == q).all() for p, q in zip(a, b))
    passed = shared_pass(model, [r], x, None)[0]
    keys = {"k": features_key(r), "tokens": features_key(r.domain.stages)}
    assert set(feature_maps(model, [r], x, passed, ims, conf=np.zeros(6))) == {keys["k"]}
    assert set(feature_maps(model, [r], x, passed, ims, conf=np.ones(6))) == {keys["tokens"]}
    assert set(feature_maps(model, [r], x, passed, ims, conf=conf)) == set(keys.values())
    skipping = parse_recipe({**main, "output": {"min_confidence": cut}, "domain": {"confidence": cut, **domain}})
    assert set(feature_maps(model, [skipping], x, passed, ims, conf=conf)) == {keys["tokens"]}  # the rest: no mask
    assert len(needed_layers(model, r)) == 2  # both feature sets come from the classifier's own pass
