"""Seconds and counted forward passes per image of each explainer setting on the embedded model (run by hand).

    .venv/bin/python bench/bench_perturbation.py --images work/synth64/images --n 4 [NAME ...]

Make the images with ``segfromxai synth --out work/synth64 --n 64 --seed 7``. All settings run one after the
other in this process, on the same batch, so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import time

import torch

from segfromxai.explainers import explain_with_logits
from segfromxai.models.hooks import count_forwards
from segfromxai.io.images import find_images, load_image
from segfromxai.models.model import load_model

SETTINGS = {
    "gradcam": {"gradcam": {}},
    "lrp": {"lrp": {}},
    "rcut_gradient": {"rcut": {"weights": "gradient"}},
    "rcut_topk16": {"rcut": {"weights": "topk", "k": 16}},
    "rcut_topk64": {"rcut": {"weights": "topk", "k": 64}},
    "rcut_scorecam": {"rcut": {"weights": "scorecam"}},
    "moxi_ins_tokens": {"moxi_insertion": {}},
    "moxi_ins_pixels": {"moxi_insertion": {"mode": "pixels"}},
    "moxi_del_tokens": {"moxi_deletion": {}},
    "moxi_del_28px": {"moxi_deletion": {"mode": "pixels", "patch": 28}},
    "moxi_del_49px": {"moxi_deletion": {"mode": "pixels", "patch": 49}},
    "coalition_50": {"coalition": {"steps": 50, "cluster_steps": 100}},
    "coalition": {"coalition": {}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=None, help=f"settings (default: all): {', '.join(SETTINGS)}")
    ap.add_argument("--images", default="work/synth64/images")
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model()
    x = lm.preprocess.batch([load_image(p) for p in find_images(args.images)[:args.n]])
    explain_with_logits(lm, x, {"gradcam": {}})  # warm-up: the first setting timed must not pay the start-up
    for name in args.names or SETTINGS:
        with count_forwards(lm.module) as n:
            t0 = time.perf_counter()
            explain_with_logits(lm, x, SETTINGS[name])
            dt = time.perf_counter() - t0
        print(f"{name:16s} {dt / len(x):8.2f} s/img {n.images / len(x):8.1f} forwards/img", flush=True)


if __name__ == "__main__":
    main()
