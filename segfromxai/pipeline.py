"""The one place that chains the stages: images -> model -> explainers -> fusion -> threshold -> refine -> masks
-> COCO.

:func:`classify` is the classification pass alone; :func:`run` is a whole labelling run (see its docstring for the
files it writes and how it resumes).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .artifacts import save_artifacts
from .coco import atomic_write
from .dataset import done_indices, finish, prepare_out
from .explainers._hooks import capture
from .explainers.core import explain_with_logits
from .explainers.gradient import default_layer
from .fusion import as_numpy, fuse, resample
from .images import Failure, ImageLoadError, LoadedImage, find_images, iter_images, load_image
from .masks import encode, fill_holes, keep_largest, remove_small, split_components
from .model import LoadedModel, is_vit, token_grid
from .recipe import Recipe
from .refine import REFINERS
from .threshold import THRESHOLDS


@dataclass(frozen=True)
class Prediction:
    """The model's top-1 class of one image, with its softmax confidence."""

    rel_path: str
    label: int
    confidence: float


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
    failures = on_failure or (lambda f: None)
    out: list[Prediction] = []
    for batch in batched(iter_images(images), batch_size, failures):
        with torch.no_grad():
            x = model.preprocess.batch([r.image for r in batch]).to(model.device)
            prob = model.module(x).softmax(1).cpu()
        conf, label = prob.max(1)
        out.extend(Prediction(r.rel_path, int(k), float(c)) for r, k, c in zip(batch, label, conf))
    return out


def read_labels_csv(path: str | Path) -> dict[str, str]:
    """``file_name,label`` rows as a dict (file names relative to the image folder, POSIX separators)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file_name", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path} must have the header 'file_name,label'")
        return {r["file_name"]: r["label"] for r in reader}


def accuracy_table(preds: list[Prediction], classes: list[str], labels: dict[str, str]) -> list[dict]:
    """Per-class and overall top-1 accuracy of ``preds`` against ``labels`` (images without a label are left out).

    Returns rows ``{"class", "n", "correct", "accuracy"}``, one per class present in the labels, then ``"all"``.
    """
    truth = [(labels[p.rel_path], classes[p.label]) for p in preds if p.rel_path in labels]
    rows = []
    for c in sorted({t for t, _ in truth}, key=lambda c: classes.index(c) if c in classes else len(classes)):
        hits = [t == q for t, q in truth if t == c]
        rows.append({"class": c, "n": len(hits), "correct": sum(hits), "accuracy": float(np.mean(hits))})
    hits = [t == q for t, q in truth]
    rows.append({"class": "all", "n": len(hits), "correct": sum(hits),
                 "accuracy": float(np.mean(hits)) if hits else float("nan")})
    return rows


# ------------------------------------------------------------------------------------------------ labelling run
TARGET_SOURCES = ("top1", "labels", "folders")
@dataclass(frozen=True)
class Targets:
    """Which class each image is explained for: the model's top-1, a ``file_name,label`` CSV, or class folders."""

    source: str = "top1"
    labels: dict[str, str] | None = None

    def name(self, rel_path: str) -> str | None:
        """The class name given for an image (``None``: none given, or top-1)."""
        if self.source == "folders":
            return rel_path.split("/")[0] if "/" in rel_path else None
        return None if self.source == "top1" else (self.labels or {}).get(rel_path)

    def of(self, rel_path: str, classes: list[str]) -> int | str | None:
        """The class index to explain, ``None`` for top-1, or a reason (str) to skip the image."""
        if self.source == "top1":
            return None
        name = self.name(rel_path)
        if name is None:
            return "not inside a class folder" if self.source == "folders" else "no label in the labels file"
        return classes.index(name) if name in classes else f"label {name!r} is not a class of the model"

    def check(self, rel_paths: list[str], classes: list[str]) -> None:
        """Raise ValueError naming the labels that are not classes of the model, before any image is explained."""
        bad = sorted({n for n in map(self.name, rel_paths) if n is not None and n not in classes})
        if bad:
            raise ValueError(f"labels that are not classes of the model: {', '.join(bad)}; "
                             f"classes: {', '.join(classes)}")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n_labels": len(self.labels or {})}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the run has no randomness of its own; explainers added later might)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def feature_layer(module: torch.nn.Module, feature: str, block: int) -> str:
    """The module whose output gives ncut's token features: a block's ``attn.qkv`` (q, k, v) or the block itself
    (tokens) for a ViT; the Grad-CAM layer (last feature stage) for a CNN."""
    if not is_vit(module):
        return default_layer(module)
    n = len(module.blocks)
    if not -n <= block < n:
        raise ValueError(f"block {block} out of range for a model with {n} blocks")
    b = block % n
    return f"blocks.{b}" if feature == "tokens" else f"blocks.{b}.attn.qkv"


def token_features(module: torch.nn.Module, out: torch.Tensor, feature: str, input_size: tuple[int, int]
                   ) -> np.ndarray:
    """Per-token features (B, fh, fw, C) from the output of :func:`feature_layer`'s module."""
    out = out.detach().float()
    if not is_vit(module):
        return out.permute(0, 2, 3, 1).cpu().numpy()
    if feature != "tokens":
        b, n, three_d = out.shape
        out = out.reshape(b, n, 3, three_d // 3)[:, :, "qkv".index(feature)]
    gh, gw = token_grid(module, input_size)
    patches = out[:, module.num_prefix_tokens:]
    return patches.reshape(out.shape[0], gh, gw, -1).cpu().numpy()


def fusion_size(model: LoadedModel, maps: dict[str, torch.Tensor], grid: str) -> tuple[int, int]:
    """The common grid of :func:`fusion.fuse`: the token grid (a CNN: the coarsest map's) or the input size."""
    if grid == "input":
        return model.preprocess.size
    if model.is_vit:
        return token_grid(model.module, model.preprocess.size)
    return min((tuple(m.shape[-2:]) for m in maps.values()), key=lambda s: s[0] * s[1])


def fuse_recipe(model: LoadedModel, recipe: Recipe, maps: dict[str, torch.Tensor]) -> np.ndarray:
    """The recipe's fusion of a batch of maps, float32 (B, h, w) in [0, 1] on the recipe's grid."""
    f = recipe.fusion
    return as_numpy(fuse(maps, method=f["method"], size=fusion_size(model, maps, f["grid"]), clip=f["clip"],
                         eps=f["eps"], weights=f["weights"], renormalise=f["renormalise"]))


def clean_masks(masks: list[np.ndarray], spec: dict[str, Any]) -> list[np.ndarray]:
    """Fill holes, drop small components, keep all or the largest, optionally split into components; no empties.

    ``spec`` is the recipe's ``masks`` section (areas as fractions of the image area).
    """
    out = []
    for m in masks:
        n = m.size
        if spec["fill_holes"]:
            max_hole = None if spec["max_hole"] is None else int(round(spec["max_hole"] * n))
            m = fill_holes(m, max_area=max_hole)
        m = remove_small(m, min_area=max(1, int(np.ceil(spec["min_area"] * n))))
        if spec["keep"] == "largest" and m.any():
            m = keep_largest(m)
        parts = split_components(m) if spec["split_components"] else [m]
        out.extend(p for p in parts if p.any())
    return out


def label_image(fused: np.ndarray, size: tuple[int, int], recipe: Recipe, features: np.ndarray | None = None
                ) -> list[np.ndarray]:
    """Threshold, refine and clean one fused map (h, w) into bool instance masks at the image's ``size``."""
    mask = THRESHOLDS[recipe.threshold.method](fused, **recipe.threshold.params)
    masks = REFINERS[recipe.refine.method](fused, mask, size=size, features=features, **recipe.refine.params)
    return clean_masks(masks, recipe.masks)


def annotation_score(confidence: float, fused_pixels: np.ndarray, mask: np.ndarray) -> float:
    """Confidence of the explained class times the mean fused explanation (in [0, 1]) inside the mask."""
    return float(confidence * fused_pixels[mask].mean())


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


def shard_of(rel_path: str, num_shards: int) -> int:
    """The shard of an image: a stable hash (SHA-1) of its relative path, modulo ``num_shards``."""
    return int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big") % num_shards


@dataclass(frozen=True)
class _ChunkLoader(torch.utils.data.Dataset):
    """Loads and preprocesses one chunk of images per item (run in DataLoader workers when ``--workers`` > 0).

    An item is ``(records, loaded, x)``: records of images that failed to load or were skipped, the loaded images
    ``(index, rel, image, target)``, and their preprocessed batch (or None).
    """

    chunks: list[list[int]]
    paths: list[Path]
    rels: list[str]
    targets: Targets
    classes: list[str]
    preprocess: Any

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        records, loaded = [], []
        for i in self.chunks[k]:
            try:
                im = load_image(self.paths[i])
            except Exception as e:  # one bad file never stops the run (see images.iter_images)
                reason = e.reason if isinstance(e, ImageLoadError) else f"unexpected error ({e!r})"
                records.append({"index": i, "file_name": self.rels[i], "status": "failed", "reason": reason})
                continue
            t = self.targets.of(self.rels[i], self.classes)
            if isinstance(t, str):
                records.append({"index": i, "file_name": self.rels[i], "status": "skipped", "reason": t})
                continue
            loaded.append((i, self.rels[i], im, t))
        x = self.preprocess.batch([im for _, _, im, _ in loaded]) if loaded else None
        return records, loaded, x


def _as_is(item: Any) -> Any:
    """DataLoader's collate for whole chunks: keep NumPy images as they are."""
    return item


def _explain_batch(model: LoadedModel, recipe: Recipe, x: torch.Tensor, target: torch.Tensor | None
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray | None]:
    """Maps, logits and (for ncut) token features of one batch, all from one forward pass."""
    layer = None
    if recipe.refine.method == "ncut":
        params = recipe.refine.params
        layer = feature_layer(model.module, params["feature"], params["block"])
    with capture(model.module, layers=(layer,) if layer else ()) as got:
        maps, logits = explain_with_logits(model, x, recipe.explainers, target)
    feats = None
    if layer:
        feats = token_features(model.module, got.outputs[layer], recipe.refine.params["feature"],
                               tuple(x.shape[-2:]))
    return maps, logits, feats


def _label_chunk(model: LoadedModel, recipe: Recipe, loaded: list[tuple[int, str, np.ndarray, int | None]],
                 x: torch.Tensor, clock: Clock) -> tuple[list[dict], dict[int, dict]]:
    """Explain, fuse, threshold, refine and encode one preprocessed batch; returns records and maps to save."""
    x = x.to(model.device)
    targets = [t for _, _, _, t in loaded]
    target = None if all(t is None for t in targets) else torch.tensor(targets, device=model.device)
    with clock("explain"):
        maps, logits, feats = _explain_batch(model, recipe, x, target)
        cls = logits.argmax(1) if target is None else target
        conf = logits.float().softmax(1).gather(1, cls[:, None])[:, 0].cpu().numpy()
        cls = cls.cpu().numpy()
    with clock("fuse"):
        fused = fuse_recipe(model, recipe, maps)
    records, saved = [], {}
    provenance = {"recipe": recipe.name, "explainers": list(recipe.explainers), "fusion": recipe.fusion["method"],
                  "threshold": recipe.threshold.method, "refiner": recipe.refine.method}
    for j, (index, rel, im, _) in enumerate(loaded):
        h, w = im.shape[:2]
        image = {"id": index + 1, "file_name": rel, "height": h, "width": w}
        rec = {"index": index, "file_name": rel, "class": int(cls[j]), "confidence": float(conf[j])}
        if conf[j] < recipe.output["min_confidence"]:
            records.append({**rec, "status": "skipped",
                            "reason": f"confidence {conf[j]:.3f} < {recipe.output['min_confidence']}"})
            continue
        with clock("refine"):
            masks = label_image(fused[j], (h, w), recipe, None if feats is None else feats[j])
        with clock("encode"):
            fused_px = as_numpy(resample(torch.from_numpy(fused[j][None]), (h, w)))[0]
            anns = [{"category_id": int(cls[j]) + 1, "segmentation": encode(m),
                     "score": annotation_score(float(conf[j]), fused_px, m),
                     "attributes": {**provenance, "confidence": float(conf[j])}} for m in masks]
        records.append({**rec, "status": "ok" if anns else "empty", "image": image, "annotations": anns})
        if recipe.output["maps"] or recipe.output["overlays"]:
            saved[index] = {"maps": {k: v[j].cpu().numpy() for k, v in maps.items()}, "fused": fused[j],
                            "image": im, "masks": masks, "rel": rel}
    return records, saved


def process_chunk(model: LoadedModel, recipe: Recipe, out: Path, item: tuple, todo: set[int], clock: Clock
                  ) -> list[dict]:
    """Label one loaded chunk (an item of ``_ChunkLoader``), save its artefacts, and return the manifest records of
    the images in ``todo``, by index (the whole chunk is labelled so that each image sees the same batch)."""
    records, loaded, x = item
    if loaded:
        got, saved = _label_chunk(model, recipe, loaded, x, clock)
        records = records + got
        with clock("write"):
            for i, art in saved.items():
                if i in todo:
                    save_artifacts(out, art, maps=recipe.output["maps"], overlays=recipe.output["overlays"])
    return sorted((r for r in records if r["index"] in todo), key=lambda r: r["index"])


def run(recipe: Recipe, images: str | Path, out: str | Path, *, model: LoadedModel, targets: Targets = Targets(),
        batch_size: int = 32, limit: int | None = None, formats: tuple[str, ...] = ("coco",), resume: bool = False,
        overwrite: bool = False, seed: int = 0, shard: tuple[int, int] | None = None, workers: int = 0,
        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Label every image under ``images`` with ``recipe`` and write the dataset to ``out``.

    Writes ``out/pseudo_labels.json`` (COCO instances, category id = class index + 1), ``pseudo_labels_results.json``
    (for COCOeval), ``failures.jsonl`` (unreadable images with reasons), ``run.json`` (resolved recipe, versions,
    counts, skipped images, seconds per stage), the append-only ``manifest.jsonl``, and on request ``maps/*.npz``,
    ``overlays/*.png``, ``png/`` (index masks) and ``yolo/`` (polygons). Images are taken in sorted order, in
    chunks of ``batch_size`` consecutive files; each chunk's results are appended to the manifest in one write, so
    a killed run resumed with ``resume=True`` skips finished images and ends with the same files (chunks that were
    cut short are redone whole, with the same batch). Failures, skipped images (``min_confidence``, no label) and
    images without a mask are recorded once and never retried.

    ``shard=(i, n)`` takes only the images whose :func:`shard_of` is ``i`` (the parts of ``n`` such runs combine
    with :func:`segfromxai.dataset.merge`). ``workers`` > 0 loads and preprocesses chunks in that many worker
    processes (a torch DataLoader, two chunks ahead each) while the model works. ``progress(advance, total)`` is
    called once at the start and after every chunk. Returns the run summary (``run.json``).
    """
    out = Path(out)
    job = plan_run(recipe, images, out, model=model, targets=targets, batch_size=batch_size, limit=limit,
                   resume=resume, overwrite=overwrite, seed=seed, shard=shard)
    clock, processed = Clock(), 0
    if progress is not None:
        progress(job.total - job.pending, job.total)
    loader = torch.utils.data.DataLoader(job.loader, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=2 if workers else None, persistent_workers=False)
    with job.manifest:
        items = iter(loader)
        for chunk in job.chunks:
            with clock("load"):
                item = next(items)
            todo = {i for i in chunk if i not in job.done}
            records = process_chunk(model, recipe, out, item, todo, clock)
            with clock("write"):
                job.manifest.append(records)
            processed += len(todo)
            if progress is not None:
                progress(len(todo), job.total)
    return close_run(out, job, clock, processed, formats=formats, engine={"engine": "local", "workers": workers})


@dataclass
class Job:
    """A planned run: its manifest (open for appending), the chunks still to do, and their loader."""

    manifest: Any
    chunks: list[list[int]]
    done: set[int]
    loader: _ChunkLoader
    total: int

    @property
    def pending(self) -> int:
        return sum(len(c) for c in self.chunks)


def plan_run(recipe: Recipe, images: str | Path, out: Path, *, model: LoadedModel, targets: Targets,
             batch_size: int, limit: int | None, resume: bool, overwrite: bool, seed: int,
             shard: tuple[int, int] | None) -> Job:
    """Find the images (this shard's), prepare ``out`` (see :func:`segfromxai.dataset.prepare_out`) and cut the
    images not done yet into chunks of ``batch_size`` consecutive files."""
    seed_everything(seed)
    paths = find_images(images)[:limit]
    rels = [p.name if p == Path(images) else p.relative_to(images).as_posix() for p in paths]
    targets.check(rels, model.classes)
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    mine = [i for i in range(len(paths)) if shard is None or shard_of(rels[i], shard[1]) == shard[0]]
    header = {"recipe": recipe.digest(), "images": str(Path(images).resolve()), "model": model.source,
              "targets": targets.to_dict(), "shard": list(shard) if shard else None, "classes": list(model.classes),
              "resolved": recipe.to_dict()}
    manifest = prepare_out(out, header, resume=resume, overwrite=overwrite)
    done = done_indices(manifest)
    chunks = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    chunks = [c for c in chunks if any(i not in done for i in c)]
    loader = _ChunkLoader(chunks, paths, rels, targets, list(model.classes), model.preprocess)
    return Job(manifest, chunks, done, loader, len(mine))


def close_run(out: Path, job: Job, clock: Clock, processed: int, *, formats: tuple[str, ...],
              engine: dict[str, Any]) -> dict[str, Any]:
    """Write the dataset files from the manifest and ``run.json``; return the summary."""
    with clock("write"):
        summary = finish(out, [job.manifest], formats=formats)
    summary["seconds"] = {k: round(v, 4) for k, v in clock.seconds.items()}
    summary["processed_now"] = processed
    summary.update(engine)
    summary["images_per_second"] = processed / sum(clock.seconds.values()) if processed else None
    with atomic_write(out / "run.json") as f:
        json.dump(summary, f, indent=2)
    return summary
