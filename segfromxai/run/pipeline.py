"""The one place that chains the stages: images -> model -> explainers -> fusion -> threshold -> refine -> boundary
-> masks.

:func:`label_batch` labels one preprocessed batch with one or more recipes (one shared explain pass); it is what
the local engine (:mod:`segfromxai.run.local`), the Ray engine (:mod:`segfromxai.run.ray`) and
:mod:`segfromxai.quality.compare` call. :func:`classify` is the classification pass alone. Whole labelling runs (plan,
chunks, resume, finish) live in :mod:`segfromxai.run.local`.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..stages.boundary import refine_boundary
from ..explainers import Explained, explain_pass
from ..models.features import (
    backbone_for,
    backbone_input,
    backbone_key,
    backbone_outputs,
    feature_layer,
    layer_features,
    uses_classifier,
)
from ..recipe.checks import is_headless, needed_layers
from ..stages.fusion import as_numpy, fuse_on_grid
from ..io.images import Failure, LoadedImage, iter_images
from ..ops.masks import clean
from ..models.model import LoadedModel, token_grid
from ..recipe.recipe import Recipe
from ..stages.refine import REFINERS
from ..ops.resize import resize_bilinear
from ..stages.quality import quality_score, quality_terms
from ..stages.threshold import THRESHOLDS
from .targets import Prediction


def batched(records: Iterator[LoadedImage], batch_size: int, on_failure: Callable[[Failure], None]
            ) -> Iterator[list[LoadedImage]]:
    """Group loaded images into lists of ``batch_size``; failed loads go to ``on_failure`` and are skipped."""
    batch: list[LoadedImage] = []
    for rec in records:
        if rec.failure is not None:
            on_failure(rec.failure)
            continue
        batch.append(rec)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def classify(model: LoadedModel, images: str | Path, *, batch_size: int = 32,
             on_failure: Callable[[Failure], None] | None = None) -> list[Prediction]:
    """Top-1 class and confidence of every readable image under ``images`` (sorted, recursive).

    Unreadable files are passed to ``on_failure`` (default: ignored) and never stop the pass.
    """
    if is_headless(model.module):
        raise ValueError("the model has no classifier head (num_classes=0): it has no classes to predict")
    failures = on_failure or (lambda f: None)
    out: list[Prediction] = []
    for batch in batched(iter_images(images), batch_size, failures):
        with torch.no_grad():
            x = model.preprocess.batch([r.image for r in batch]).to(model.device)
            prob = model.module(x).softmax(1).cpu()
        conf, label = prob.max(1)
        out.extend(Prediction(r.rel_path, int(k), float(c)) for r, k, c in zip(batch, label, conf))
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the run has no randomness of its own; explainers added later might)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Clock:
    """Seconds spent per stage, summed over the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def add(self, seconds: dict[str, float]) -> None:
        """Add another clock's seconds (e.g. a Ray actor's) to this one."""
        for stage, s in seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + s


# ------------------------------------------------------------------------------------------------ the stages
def fuse_recipe(model: LoadedModel, recipe: Recipe, maps: dict[str, torch.Tensor]) -> np.ndarray:
    """The recipe's fusion of a batch of maps, float32 (B, h, w) in [0, 1] on the recipe's grid."""
    grid = token_grid(model.module, model.preprocess.size) if model.is_vit else None
    return as_numpy(fuse_on_grid(maps, token_grid=grid, input_size=model.preprocess.size, **recipe.fusion))


def refine_image(fused: np.ndarray, size: tuple[int, int], recipe: Recipe, features: np.ndarray | None = None
                 ) -> list[np.ndarray]:
    """Threshold and refine one fused map (h, w) into bool instance masks at the image's ``size``: the refiner's
    masks, before the boundary stage and cleaning."""
    return cut_image(fused, size, recipe, features).refined


@dataclass
class Cut:
    """One image's masks through the later stages: ``explained``, the threshold stage's mask on the fused map's
    grid; ``refined``, the refiner's masks at the image's size; ``masks``, the final masks (snapped and cleaned;
    ``None`` until the boundary stage ran)."""

    explained: np.ndarray
    refined: list[np.ndarray]
    masks: list[np.ndarray] | None = None


def cut_image(fused: np.ndarray, size: tuple[int, int], recipe: Recipe, features: np.ndarray | None = None,
              image: np.ndarray | None = None, *, snap: bool = False) -> Cut:
    """Threshold and refine one fused map (h, w); with ``snap``, also snap to edges and clean (``image``: uint8
    (H, W, 3) RGB, the boundary stage's guide, needed unless its method is ``none``)."""
    explained = THRESHOLDS[recipe.threshold.method](fused, **recipe.threshold.params)
    cut = Cut(explained, REFINERS[recipe.refine.method](fused, explained, size=size, features=features,
                                                        **recipe.refine.params))
    if not snap:
        return cut
    masks = cut.refined
    if recipe.boundary.method != "none":
        if image is None:
            raise ValueError(f"boundary method {recipe.boundary.method!r} needs the image")
        cell = (size[0] / fused.shape[0], size[1] / fused.shape[1])
        masks = refine_boundary(masks, image, cell, recipe.boundary.method, recipe.boundary.params)
    cut.masks = clean(masks, **recipe.masks)
    return cut


def label_image(fused: np.ndarray, size: tuple[int, int], recipe: Recipe, features: np.ndarray | None = None,
                image: np.ndarray | None = None) -> list[np.ndarray]:
    """Threshold, refine, snap to edges and clean one fused map (h, w) into bool instance masks at the image's
    ``size`` (:func:`cut_image`); ``image`` (uint8 (H, W, 3) RGB) is the boundary stage's guide, needed unless its
    method is ``none``."""
    return cut_image(fused, size, recipe, features, image, snap=True).masks or []


def scored_masks(cut: Cut, confidence: float, tokens: np.ndarray | None
                 ) -> tuple[list[np.ndarray], list[float], list[dict[str, float]]]:
    """The cut's final masks, their quality scores and the terms behind them
    (:mod:`segfromxai.stages.quality`; ``tokens``: the refiner's features)."""
    masks = cut.masks or []
    terms = [quality_terms(m, confidence=confidence, refined=cut.refined, tokens=tokens) for m in masks]
    return masks, [quality_score(t) for t in terms], terms


# ------------------------------------------------------------------------------------------------ one batch
@dataclass
class Labelled:
    """One recipe's labelling of a batch of B images.

    ``maps``: the recipe's maps ``{name: (B, h, w)}``; ``fused``: float32 (B, h, w) in [0, 1]; ``target``: (B,) the
    class explained; ``confidence``: (B,) its softmax probability; ``masks[j]``: bool (H_j, W_j) instance masks of
    image j, or ``None`` when the image's confidence is below the recipe's ``min_confidence``; ``scores[j]``: one
    quality score per mask (:func:`scored_masks`) and ``quality[j]`` the terms behind each; ``seconds``: time spent
    after the shared pass (fuse to clean).
    """

    maps: dict[str, torch.Tensor]
    fused: np.ndarray
    target: np.ndarray
    confidence: np.ndarray
    masks: list[list[np.ndarray] | None]
    scores: list[list[float]]
    quality: list[list[dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0


def explain_calls(recipes: Sequence[Recipe]) -> list[dict[str, dict[str, Any]]]:
    """The explainers of all recipes grouped into as few explain calls as possible (a name appears once per
    call; the same name with other parameters goes to a later call)."""
    calls: list[dict[str, dict[str, Any]]] = []
    for r in recipes:
        for name, params in r.explainers.items():
            for call in calls:
                if call.get(name, params) == params:
                    call[name] = params
                    break
            else:
                calls.append({name: params})
    return calls


def features_key(recipe: Recipe) -> tuple:
    """The key of the recipe's token features in :func:`feature_maps`'s result."""
    return tuple(sorted(recipe.features.items()))


def feature_maps(model: LoadedModel, recipes: Sequence[Recipe], x: torch.Tensor, got: Explained,
                 images: Sequence[np.ndarray] | None = None, conf: np.ndarray | None = None
                 ) -> dict[tuple, np.ndarray]:
    """Token features (B, fh, fw, C) of each recipe's ``[features]`` section (and its ``[domain.features]``),
    keyed by :func:`features_key`: read from the shared pass ``got``, or from one extra forward per backbone (all
    its layers recorded at once). With ``conf`` (B,), the explained class's probabilities, a recipe gets only the
    features of the stages some image of the batch goes to (:meth:`Recipe.stages_for`; none for an image under its
    ``min_confidence``, which gets no mask)."""
    specs = {}
    for r in recipes:
        chosen = None if conf is None else [r.stages_for(float(c)) for c in conf
                                            if c >= r.output["min_confidence"]]
        for s in r.stages():
            if chosen is not None and not any(c is s for c in chosen):
                continue
            if "features" in REFINERS[s.refine.method].requires:
                specs[features_key(s)] = s.features
    out, by_backbone = {}, {}
    for key, spec in specs.items():
        if uses_classifier(model, spec):
            out[key] = layer_features(model.module, got.outputs, spec, tuple(x.shape[-2:]))
        else:
            by_backbone.setdefault(backbone_key(spec), []).append((key, spec))
    for wanted in by_backbone.values():
        bb = backbone_for(model, wanted[0][1])
        xb = backbone_input(bb, x, model.preprocess, images)
        layers = {key: feature_layer(bb.module, feature=spec["feature"], block=spec["block"])
                  for key, spec in wanted}
        outs = backbone_outputs(bb, xb, list(dict.fromkeys(layers.values())))
        for key, spec in wanted:
            out[key] = layer_features(bb.module, outs, spec, tuple(xb.shape[-2:]))
    return out


def shared_pass(model: LoadedModel, recipes: Sequence[Recipe], x: torch.Tensor, target: torch.Tensor | None
                ) -> list[Explained]:
    """The explain passes of ``recipes`` on one batch: one per :func:`explain_calls` group, the first recording
    every layer a refiner needs; later groups explain the class the first one chose."""
    calls = explain_calls(recipes)
    record = tuple(dict.fromkeys(layer for r in recipes for layer in needed_layers(model, r)))
    first = explain_pass(model, x, calls[0], target, record=record)
    if is_headless(model.module):  # no class to choose: the given category, else the only one
        first.target = target if target is not None else torch.zeros(len(x), dtype=torch.long, device=x.device)
    rest = [explain_pass(model, x, call, first.target) for call in calls[1:]]
    return [first, *rest]


def _maps_of(recipe: Recipe, calls: list[dict[str, dict[str, Any]]], passes: list[Explained]
             ) -> dict[str, torch.Tensor]:
    return {name: next(p.maps[name] for c, p in zip(calls, passes) if c.get(name) == params)
            for name, params in recipe.explainers.items()}


def confidence(model: LoadedModel, got: Explained) -> np.ndarray:
    """Softmax probability (B,) of the explained class; 1 for a headless model (it has no classes to weigh)."""
    if is_headless(model.module):
        return np.ones(len(got.target), dtype=np.float32)
    return got.logits.float().softmax(1).gather(1, got.target[:, None])[:, 0].cpu().numpy()


def label_maps(model: LoadedModel, recipe: Recipe, maps: dict[str, torch.Tensor], got: Explained,
               sizes: Sequence[tuple[int, int]], clock: Clock | None = None,
               feats: dict[tuple, np.ndarray] | None = None, images: Sequence[np.ndarray] | None = None) -> Labelled:
    """Fuse, threshold, refine, snap to edges and clean one recipe's maps of a batch (``got``: the first shared pass;
    ``feats``: the token features from :func:`feature_maps`, when a refiner needs them; ``images``: the loaded RGB
    images, the boundary stage's guides). Each image goes through the later stages of
    ``recipe.stages_for(its confidence)``: the recipe's own, or its ``[domain]``'s."""
    clock = clock or Clock()
    t0 = time.perf_counter()
    target = got.target.cpu().numpy()
    conf = confidence(model, got)
    with clock("fuse"):
        fused = fuse_recipe(model, recipe, maps)
    todo = [j for j in range(len(sizes)) if conf[j] >= recipe.output["min_confidence"]]

    def one(j: int) -> tuple[list[np.ndarray], list[float], list[dict[str, float]]]:
        stages = recipe.stages_for(float(conf[j]))
        f = (feats or {}).get(features_key(stages))
        f = None if f is None else f[j]
        cut = cut_image(fused[j], sizes[j], stages, f, None if images is None else images[j], snap=True)
        return scored_masks(cut, float(conf[j]), f)

    with clock("refine"):
        labelled = dict(zip(todo, thread_map(one, todo)))
    got = [labelled.get(j) for j in range(len(sizes))]
    masks = [None if g is None else g[0] for g in got]
    scores = [[] if g is None else g[1] for g in got]
    quality = [[] if g is None else g[2] for g in got]
    return Labelled(maps, fused, target, conf, masks, scores, quality, time.perf_counter() - t0)


def thread_map(fn: Callable[[int], Any], items: Sequence[int], workers: int | None = None) -> list[Any]:
    """``[fn(i) for i in items]`` on ``workers`` threads (default: torch's CPU thread count), in order, with
    NumPy's and SciPy's BLAS limited to one thread each.

    The stages after the explain pass (threshold, ncut, boundary, cleaning) are per image and spend their time in
    NumPy, SciPy and OpenCV calls that release the GIL, so the images of a batch are labelled side by side on the
    cores torch was given. Their matrices are small (a 784-token graph): a multi-threaded BLAS spends more time
    spinning than computing and takes the cores from OpenCV, so each call gets one thread (measured: a default
    image's later stages 56-67 ms with the BLAS's 2 threads, 40-46 ms with one, 23-32 ms per image on 2 workers).
    Every stage is deterministic per image (OpenCV's generator is per thread and reseeded before each use), so the
    masks do not depend on the number of workers.
    """
    workers = torch.get_num_threads() if workers is None else workers
    with _blas_controller().limit(limits=1, user_api="blas"):
        if workers <= 1 or len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))


@lru_cache(maxsize=1)
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries (made once: inspecting them takes milliseconds)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def label_batch(model: LoadedModel, recipes: Sequence[Recipe], x: torch.Tensor, sizes: Sequence[tuple[int, int]],
                target: torch.Tensor | None = None, clock: Clock | None = None,
                images: Sequence[np.ndarray] | None = None) -> list[Labelled]:
    """Label one preprocessed batch ``x`` (B, 3, h, w) of images of ``sizes`` with each recipe.

    All recipes share the explain pass (:func:`shared_pass`) and each feature backbone's forward
    (:func:`feature_maps`; ``images``, the original RGB images, are preprocessed for it, else ``x`` is resampled);
    ``target`` (B,) gives the class to explain per image (``None``: the model's top-1); ``images`` are also the
    boundary stage's guides (needed unless its method is ``none``). Returns one :class:`Labelled` per recipe, in
    order.
    """
    clock = clock or Clock()
    x = x.to(model.device)
    with clock("explain"):
        passes = shared_pass(model, recipes, x, target)
    with clock("features"):
        feats = feature_maps(model, recipes, x, passes[0], images, conf=confidence(model, passes[0]))
    calls = explain_calls(recipes)
    return [label_maps(model, r, _maps_of(r, calls, passes), passes[0], sizes, clock, feats, images)
            for r in recipes]

