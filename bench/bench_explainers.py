"""Explainer speed against one bare forward+backward of the same model, measured side by side in one run.

    .venv/bin/python bench/bench_explainers.py [--batches 1 32] [--rounds 3] [--threads 2] [--methods lrp abslrp]
        [--models embedded] [--clock cpu] [--reference ../main]

``--methods`` takes registered names, or several joined by ``+`` (``gradcam+lrp``: one call, as a recipe runs them).

Models: the embedded ViT (ViT-S/14 at 196 px) and timm's vit_small_patch16_224 with random weights. The baseline
is one forward pass plus the backward pass of the summed target logits to the input (what any gradient method
needs at least); a second baseline, ``loss.backward()`` with weight gradients, is printed beside it. Also: the set
{gradcam, saliency, rollout} in one call, and our Grad-CAM against pytorch-grad-cam's GradCAM on the same layer.
Prints seconds per call and ratios to the baseline.

Every timed call runs once per round, the rounds interleaved (baseline, method 1, method 2, ..., then again), and
the best round counts, so a load that comes and goes on a shared machine hits all of them alike. ``--clock cpu``
times the process's CPU seconds instead of wall seconds (with one thread, what the call computed, without the time
other jobs took the core). ``--reference DIR`` also times the package at ``DIR/segfromxai`` (another checkout, e.g.
the main branch) in the same rounds, imported as ``segfromxai_reference``: before/after ratios from one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from segfromxai.explainers import EXPLAINERS, explain

SET = ["gradcam", "saliency", "rollout"]


def reference_explain(root: str):
    """``explain`` of the package at ``root/segfromxai``, imported under another name beside this one."""
    init = Path(root) / "segfromxai" / "__init__.py"
    spec = importlib.util.spec_from_file_location("segfromxai_reference", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["segfromxai_reference"] = module
    spec.loader.exec_module(module)
    return module.explain


def best_of_rounds(calls: dict[str, callable], rounds: int, clock) -> dict[str, float]:
    """Seconds of each call, the best of ``rounds`` interleaved rounds after one warm-up round."""
    best = {name: float("inf") for name in calls}
    for r in range(rounds + 1):
        for name, fn in calls.items():
            t0 = clock()
            fn()
            if r:
                best[name] = min(best[name], clock() - t0)
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
        model.zero_grad(set_to_none=True)

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


def models(which: list[str]):
    import timm

    from segfromxai.models.model import load_model

    torch.manual_seed(0)
    if "embedded" in which:
        yield "embedded ViT-S/14 196px", load_model().module
    if "vit_small" in which:
        yield "vit_small_patch16_224 (random)", timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def calls_of(model, x, methods: list[str], reference) -> dict[str, callable]:
    calls = {"baseline": bare(model, x), "weights": bare_with_weights(model, x)}
    for m in methods:  # "gradcam+lrp": several methods in one call
        calls[m] = lambda m=m: explain(model, x, m.split("+"))
        if reference is not None:
            calls[f"{m} (reference)"] = lambda m=m: reference(model, x, m.split("+"))
    calls["{" + ", ".join(SET) + "}"] = lambda: explain(model, x, SET)
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", "--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=sorted(EXPLAINERS))
    ap.add_argument("--models", nargs="+", choices=["embedded", "vit_small"], default=["embedded", "vit_small"])
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--reference", help="a checkout whose segfromxai is timed beside this one")
    ap.add_argument("--no-gradcam-parity", action="store_true", help="skip pytorch-grad-cam")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    reference = reference_explain(args.reference) if args.reference else None
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.rounds} interleaved rounds, "
          f"{args.clock} clock" + (f", reference {args.reference}" if reference else ""))
    for label, model in models(args.models):
        h, w = model.patch_embed.img_size
        for b in args.batches:
            x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0))
            got = best_of_rounds(calls_of(model, x, args.methods, reference), args.rounds, clock)
            base, full = got.pop("baseline"), got.pop("weights")
            print(f"\n{label}, batch {b}: forward+backward to the input {base:.3f} s; "
                  f"with weight gradients too (loss.backward()) {full:.3f} s")
            for name, t in got.items():
                print(f"  {name:32s} {t:8.3f} s  {t / base:6.2f}x fwd+bwd(input)  {t / full:6.2f}x fwd+bwd(weights)")
            if not args.no_gradcam_parity and "gradcam" in got:
                theirs = best_of_rounds({"theirs": grad_cam_baseline(model, x)}, args.rounds, clock)["theirs"]
                print(f"  pytorch-grad-cam GradCAM         {theirs:8.3f} s  ours is {theirs / got['gradcam']:.2f}x faster")


if __name__ == "__main__":
    main()
