"""Explainer speed against one bare forward+backward of the same model, measured side by side in one run.

    .venv/bin/python bench/bench_explainers.py [--batches 1 32] [--repeats 3] [--threads 2]

Models: the embedded ViT (ViT-S/14 at 196 px) and timm's vit_small_patch16_224 with random weights. The baseline
is one forward pass plus the backward pass of the summed target logits to the input (what any gradient method
needs at least); a second baseline, ``loss.backward()`` with weight gradients, is printed beside it. Also: the set {gradcam, saliency, rollout} in one call, and our Grad-CAM against
pytorch-grad-cam's GradCAM on the same layer. Prints seconds per call and ratios to the baseline.
"""

from __future__ import annotations

import argparse
import time

import torch

from segfromxai.explainers import EXPLAINERS, explain

SET = ["gradcam", "saliency", "rollout"]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bare(model, x):
    def run():
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        torch.autograd.grad(y.gather(1, y.argmax(1, keepdim=True)).sum(), xi)

    return run


def bare_with_weights(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.gather(1, y.argmax(1, keepdim=True)).sum().backward()

    return run


def grad_cam_baseline(model, x):
    from pytorch_grad_cam import GradCAM

    npt = model.num_prefix_tokens
    gh, gw = model.patch_embed.grid_size

    def reshape(t):
        return t[:, npt:].reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)

    def run():
        with GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape) as cam:
            cam(input_tensor=x, targets=None)

    return run


def models():
    import timm

    from segfromxai.model import load_model

    torch.manual_seed(0)
    yield "embedded ViT-S/14 196px", load_model().module
    yield "vit_small_patch16_224 (random)", timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=sorted(EXPLAINERS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats}")
    for label, model in models():
        h, w = model.patch_embed.img_size
        for b in args.batches:
            x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0))
            reps = args.repeats if b == 1 else max(1, args.repeats // 3)
            base = timed(bare(model, x), reps)
            full = timed(bare_with_weights(model, x), reps)
            model.zero_grad(set_to_none=True)
            print(f"\n{label}, batch {b}: forward+backward to the input {base:.3f} s; "
                  f"with weight gradients too (loss.backward()) {full:.3f} s")
            rows = [(m, timed(lambda m=m: explain(model, x, [m]), reps)) for m in args.methods]
            rows.append(("{" + ", ".join(SET) + "}", timed(lambda: explain(model, x, SET), reps)))
            for name, t in rows:
                print(f"  {name:32s} {t:8.3f} s  {t / base:6.2f}x fwd+bwd(input)  {t / full:6.2f}x fwd+bwd(weights)")
            ours = dict(rows)["gradcam"]
            theirs = timed(grad_cam_baseline(model, x), reps)
            print(f"  pytorch-grad-cam GradCAM         {theirs:8.3f} s  ours is {theirs / ours:.2f}x faster")


if __name__ == "__main__":
    main()
