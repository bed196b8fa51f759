"""The local engine of a labelling run: plan (find, shard, chunk), load, label, record, resume, finish.

A run's images go in sorted order, in chunks of ``batch_size`` consecutive files (this shard's); each chunk is
labelled by :func:`segfromxai.run.pipeline.label_batch` and its records are appended to the run's manifest in one
write, so a killed run resumes where it stopped. :mod:`segfromxai.run.ray` runs the same chunks on Ray.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .artifacts import save_artifacts
from .diagnose import empty_run_cause
from .outdir import check_export_names, done_indices, finish, prepare_out, remove_run
from ..fileio import atomic_write
from .targets import fit_classes
from ..io.images import ImageLoadError, find_images, load_image
from ..ops.masks import encode
from ..models.model import LoadedModel
from .pipeline import Clock, Labelled, label_batch, seed_everything
from ..recipe.recipe import Recipe
from ..recipe.checks import check_recipes_for_model
from .targets import Targets


def shard_of(rel_path: str, num_shards: int) -> int:
    """The shard of an image: a stable hash (SHA-1) of its relative path, modulo ``num_shards``."""
    raw = os.fsencode(rel_path)  # the name's bytes, also when they are not UTF-8 (surrogate escapes)
    return int.from_bytes(hashlib.sha1(raw).digest()[:8], "big") % num_shards


@dataclass(frozen=True)
class Item:
    """One loaded image of a chunk: its index in the run's sorted list, its relative path, the RGB image
    ``uint8 (H, W, 3)`` and the class to explain (``None``: the model's top-1)."""

    index: int
    rel_path: str
    image: np.ndarray
    target: int | None


@dataclass(frozen=True)
class ChunkLoader(torch.utils.data.Dataset):
    """Loads and preprocesses one chunk of images per item (run in DataLoader workers when ``--workers`` > 0).

    An item is ``(records, loaded, x)``: records of images that failed to load or were skipped, the loaded images
    (:class:`Item`), and their preprocessed batch (or None).
    """

    chunks: list[list[int]]
    paths: list[Path]
    rels: list[str]
    targets: Targets
    classes: list[str]
    preprocess: Any

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[list[dict], list[Item], torch.Tensor | None]:
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
            loaded.append(Item(i, self.rels[i], im, t))
        x = self.preprocess.batch([it.image for it in loaded]) if loaded else None
        return records, loaded, x


@dataclass(frozen=True)
class Found:
    """The images of a run: their paths in sorted order (the first ``limit``), their relative paths, the relative
    paths of every image found, and the model with the categories its masks get (a headless model's fitted)."""

    paths: list[Path]
    rels: list[str]
    every: list[str]
    model: LoadedModel


def find_run_images(images: str | Path, model: LoadedModel, targets: Targets, limit: int | None) -> Found:
    """Find the images under ``images``, give a headless model its categories and check the targets against them."""
    root = Path(images)
    found = find_images(images)
    every = [p.name if p == root else p.relative_to(root).as_posix() for p in found]
    paths, rels = found[:limit], every[:limit]
    model = fit_classes(model, targets, rels)  # a headless model gets categories
    targets.check(rels, model.classes)
    return Found(paths, rels, every, model)


def check_shard(shard: int | None, num_shards: int | None) -> tuple[int, int] | None:
    """The shard ``(shard, num_shards)``, or None when neither is given; ValueError unless both are given with
    0 <= shard < num_shards."""
    if (shard is None) != (num_shards is None) or (shard is not None and not 0 <= shard < num_shards):
        raise ValueError("give --shard I and --num-shards N together, with 0 <= I < N")
    return None if shard is None else (shard, num_shards)


def die_with_parent(parent: int, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: on Linux, ask the kernel to kill this worker when its parent dies (also by
    SIGKILL, which gives the parent no chance to stop its workers); exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(0)


def _as_is(item: Any) -> Any:
    """DataLoader's collate for whole chunks: keep NumPy images as they are."""
    return item


def batch_target(targets: list[int | None], device: Any) -> torch.Tensor | None:
    """The classes to explain as a tensor, or ``None`` when every image takes its top-1 class."""
    return None if all(t is None for t in targets) else torch.tensor(targets, device=device)


def label_items(model: LoadedModel, recipes: Sequence[Recipe], loaded: list[Item], x: torch.Tensor,
                clock: Clock | None = None) -> list[Labelled]:
    """Label a chunk's loaded images (``x``: their preprocessed batch) with every recipe, each image explaining its
    own target (see :func:`segfromxai.run.pipeline.label_batch`)."""
    target = batch_target([it.target for it in loaded], model.device)
    return label_batch(model, recipes, x, [it.image.shape[:2] for it in loaded], target, clock,
                       images=[it.image for it in loaded])


def records_of(recipe: Recipe, loaded: list[Item], got: Labelled) -> tuple[list[dict], dict[int, dict]]:
    """Manifest records (COCO image and annotations) of a labelled chunk, and the artefacts to save by index."""
    records, saved = [], {}
    provenance = {"recipe": recipe.name, "explainers": list(recipe.explainers), "fusion": recipe.fusion["method"],
                  "threshold": recipe.threshold.method, "refiner": recipe.refine.method}
    for j, item in enumerate(loaded):
        index, rel, im = item.index, item.rel_path, item.image
        h, w = im.shape[:2]
        cls, conf = int(got.target[j]), float(got.confidence[j])
        rec = {"index": index, "file_name": rel, "class": cls, "confidence": conf}
        masks = got.masks[j]
        if masks is None:
            records.append({**rec, "status": "skipped",
                            "reason": f"confidence {conf:.3f} < {recipe.output['min_confidence']}"})
            continue
        stages = recipe.stages_for(conf)  # a [domain]'s stages for an image the classifier is sure of
        where = {} if recipe.domain is None else {"refiner": stages.refine.method, "domain": stages is not recipe}
        quality = got.quality[j] if got.quality else [{} for _ in masks]
        kept = [k for k, s in enumerate(got.scores[j]) if s >= recipe.output.get("min_score", 0.0)]
        masks = [masks[k] for k in kept]  # the overlays show what the COCO file holds
        anns = [{"category_id": cls + 1, "segmentation": encode(masks[i]), "score": got.scores[j][k],
                 "attributes": {**provenance, **where, "confidence": conf, "quality": quality[k]}}
                for i, k in enumerate(kept)]
        image = {"id": index + 1, "file_name": rel, "height": h, "width": w}
        records.append({**rec, "status": "ok" if anns else "empty", "image": image, "annotations": anns})
        if recipe.output["maps"] or recipe.output["overlays"]:
            saved[index] = {"maps": {k: v[j].cpu().numpy() for k, v in got.maps.items()}, "fused": got.fused[j],
                            "image": im, "masks": masks, "rel": rel}
    return records, saved


def process_chunk(model: LoadedModel, recipe: Recipe, out: Path,
                  item: tuple[list[dict], list[Item], torch.Tensor | None], todo: set[int], clock: Clock
                  ) -> list[dict]:
    """Label one loaded chunk (an item of :class:`ChunkLoader`), save its artefacts, and return the manifest records
    of the images in ``todo``, by index (the whole chunk is labelled so that each image sees the same batch)."""
    records, loaded, x = item
    if loaded:
        got = label_items(model, [recipe], loaded, x, clock)[0]
        with clock("encode"):
            more, saved = records_of(recipe, loaded, got)
        records = records + more
        with clock("write"):
            for i, art in saved.items():
                if i in todo:
                    save_artifacts(out, art, maps=recipe.output["maps"], overlays=recipe.output["overlays"])
    return sorted((r for r in records if r["index"] in todo), key=lambda r: r["index"])


@dataclass
class Job:
    """A planned run: its manifest (open for appending), the chunks still to do, and their loader.

    ``fresh``: the run folder held no run before, so a run that fails before its first chunk is written removes
    its files again (:func:`discard`), and the folder itself when the run made it (``made_out``); ``names``:
    every image's relative path; ``warnings``: counts for ``run.json`` (e.g. ``labels_without_image``)."""

    manifest: Any
    chunks: list[list[int]]
    done: set[int]
    loader: ChunkLoader
    total: int
    fresh: bool = False
    made_out: bool = False
    names: list[str] = field(default_factory=list)
    warnings: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return sum(len(c) for c in self.chunks)


def plan_run(recipe: Recipe, images: str | Path, out: Path, *, model: LoadedModel, targets: Targets,
             batch_size: int, limit: int | None, resume: bool, overwrite: bool, seed: int,
             shard: tuple[int, int] | None, formats: tuple[str, ...] = ()) -> Job:
    """Check the recipe against the model and the exports' file names, find the images (this shard's), prepare
    ``out`` (see :func:`segfromxai.run.outdir.prepare_out`) and cut the images not done yet into chunks of
    ``batch_size`` consecutive files. Nothing is written before the checks pass."""
    seed_everything(seed)
    check_recipes_for_model(model, [recipe])  # before the images or the folder are touched
    found = find_run_images(images, model, targets, limit)
    paths, rels, every, model = found.paths, found.rels, found.every, found.model
    check_export_names(rels, formats)
    shard = None if shard is None else check_shard(*shard)
    mine = [i for i in range(len(paths)) if shard is None or shard_of(rels[i], shard[1]) == shard[0]]
    header = {"recipe": recipe.digest(), "images": str(Path(images).resolve()), "model": model.source,
              "targets": targets.to_dict(), "shard": list(shard) if shard else None, "classes": list(model.classes),
              "resolved": recipe.to_dict()}
    fresh, made_out = not (out / "manifest.jsonl").exists(), not out.exists()
    manifest = prepare_out(out, header, resume=resume, overwrite=overwrite, names=rels)
    done = done_indices(manifest)
    chunks = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    chunks = [c for c in chunks if any(i not in done for i in c)]
    loader = ChunkLoader(chunks, paths, rels, targets, list(model.classes), model.preprocess)
    unlabelled = targets.without_image(every)
    warnings = {"labels_without_image": len(unlabelled), "labels_without_image_first": unlabelled[:20]}
    return Job(manifest, chunks, done, loader, len(mine), fresh and not done, made_out, rels,
               warnings if unlabelled else {})


def discard(out: Path, job: Job) -> None:
    """Remove a fresh run that failed before its first chunk was written: its files, and ``out`` if the run made it
    (and it is empty)."""
    job.manifest.close()
    remove_run(out, job.names)
    if job.made_out:
        with contextlib.suppress(OSError):
            out.rmdir()


@contextlib.contextmanager
def discarded_on_failure(out: Path, job: Job) -> Iterator[None]:
    """Leave the block as it is; when it raises and the run is fresh with no record written yet, :func:`discard`
    the run first, so a failure before the first chunk leaves no run folder behind."""
    try:
        yield
    except BaseException:
        if job.fresh and next(job.manifest.records(), None) is None:
            discard(out, job)
        raise


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (``VmHWM`` in /proc/self/status), MiB; None where there is none."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
    return None if line is None else round(int(line.split()[1]) / 1024, 1)


def close_run(out: Path, job: Job, clock: Clock, processed: int, *, formats: tuple[str, ...],
              engine: dict[str, Any], skip_empty: bool = False) -> dict[str, Any]:
    """Write the dataset files from the manifest and ``run.json``; return the summary."""
    with clock("write"):
        summary = finish(out, [job.manifest], formats=formats, skip_empty=skip_empty)
    summary["seconds"] = {k: round(v, 4) for k, v in clock.seconds.items()}
    summary["processed_now"] = processed
    summary.update(engine)
    summary["images_per_second"] = processed / sum(clock.seconds.values()) if processed else None
    summary["warnings"] = dict(job.warnings)
    cause = empty_run_cause(summary["recipe"], summary["counts"])
    if cause:
        summary["warnings"]["no_mask"] = cause
    summary["peak_rss_mb"] = peak_rss_mb()  # of this process (the driver, on Ray)
    with atomic_write(out / "run.json") as f:
        json.dump(summary, f, indent=2)
    return summary


def run(recipe: Recipe, images: str | Path, out: str | Path, *, model: LoadedModel, targets: Targets = Targets(),
        batch_size: int = 2, limit: int | None = None, formats: tuple[str, ...] = ("coco",), resume: bool = False,
        overwrite: bool = False, seed: int = 0, shard: tuple[int, int] | None = None, workers: int = 0,
        progress: Callable[[int, int], None] | None = None, skip_empty: bool = False) -> dict[str, Any]:
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
    with :func:`segfromxai.run.outdir.merge`). ``workers`` > 0 loads and preprocesses chunks in that many worker
    processes (a torch DataLoader, two chunks ahead each) while the model works. ``progress(advance, total)`` is
    called once at the start and after every chunk. ``skip_empty`` leaves images without a mask out of
    ``pseudo_labels.json`` (see :func:`segfromxai.run.outdir.finish`). Returns the run summary (``run.json``).
    """
    out = Path(out)
    job = plan_run(recipe, images, out, model=model, targets=targets, batch_size=batch_size, limit=limit,
                   resume=resume, overwrite=overwrite, seed=seed, shard=shard, formats=formats)
    clock, processed = Clock(), 0
    if progress is not None:
        progress(job.total - job.pending, job.total)
    loader = torch.utils.data.DataLoader(job.loader, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=2 if workers else None, persistent_workers=False,
                                         worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    with job.manifest, discarded_on_failure(out, job):
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
    return close_run(out, job, clock, processed, formats=formats, engine={"engine": "local", "workers": workers},
                     skip_empty=skip_empty)
