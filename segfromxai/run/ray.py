"""The Ray Data engine of ``segfromxai run --engine ray``: the same chunks, labelled by a pool of model actors.

The driver plans the run exactly as the local engine does (:func:`segfromxai.run.local.plan_run`: same shard, same
chunks of ``batch_size`` consecutive files, same manifest), hands the chunk numbers to a Ray Dataset, and maps
them through an actor pool (:class:`_Labeller`, one model per actor) that loads, preprocesses and labels a chunk
with :func:`segfromxai.run.local.process_chunk`, so every image sees the same batch as in a local run and the
annotations are the same. The driver alone writes the manifest, in chunk order (results that arrive early wait in
a buffer of at most the pool's size), then the dataset files; a killed Ray run resumes with ``--resume`` by either
engine. Actors write maps and overlays themselves, so ``--out`` must be on a filesystem the workers share.

Resources: an actor takes ``num_gpus=1`` on a CUDA device; on the CPU a fraction of a CPU (``cpus_per_actor``,
default 0.9; the pool has one actor fewer than the cluster's CPUs, at least one, and each actor's torch uses
CPUs // actors threads), so that Ray Data's own read and write tasks always find a CPU (a pool that takes every
CPU can hang them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .local import close_run, discarded_on_failure, plan_run, process_chunk
from .pipeline import Clock
from ..recipe.recipe import Recipe
from .targets import Targets


class _Labeller:
    """A Ray actor: loads the model once, then labels chunks given by number."""

    def __init__(self, recipe: Recipe, model_args: dict[str, Any], loader: Any, out: str, done: set[int],
                 threads: int) -> None:
        import torch

        from ..models.model import load_model

        torch.set_num_threads(max(1, threads))
        self.model = load_model(**model_args)
        self.recipe, self.loader, self.out, self.done = recipe, loader, Path(out), done

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for k in batch["chunk"]:
            chunk = self.loader.chunks[int(k)]
            todo = {i for i in chunk if i not in self.done}
            clock = Clock()
            records = process_chunk(self.model, self.recipe, self.out, self.loader[int(k)], todo, clock)
            rows.append(json.dumps({"records": records, "seconds": clock.seconds}))
        return {"chunk": batch["chunk"], "records": np.array(rows, dtype=object)}


def run_ray(recipe: Recipe, images: str | Path, out: str | Path, *, model: Any, model_args: dict[str, Any],
            targets: Targets = Targets(), batch_size: int = 2, limit: int | None = None,
            formats: tuple[str, ...] = ("coco",), resume: bool = False, overwrite: bool = False, seed: int = 0,
            shard: tuple[int, int] | None = None, address: str | None = None, actors: int | None = None,
            cpus_per_actor: float = 0.9, progress: Callable[[int, int], None] | None = None,
            skip_empty: bool = False) -> dict[str, Any]:
    """:func:`segfromxai.run.local.run` on a Ray cluster (``address``: "auto", a cluster address, or None for a
    local one started here, or the one already initialised). ``model`` is the driver's copy (for the classes and
    the manifest header); ``model_args`` are :func:`segfromxai.models.model.load_model`'s arguments for the actors."""
    import ray

    out = Path(out)
    job = plan_run(recipe, images, out, model=model, targets=targets, batch_size=batch_size, limit=limit,
                   resume=resume, overwrite=overwrite, seed=seed, shard=shard, formats=formats)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    gpu = str(model_args.get("device", "cpu")).startswith("cuda")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    pool = actors or max(1, cpus - 1)
    clock, actors, processed, pending, nxt = Clock(), Clock(), 0, {}, 0
    if progress is not None:
        progress(job.total - job.pending, job.total)
    with job.manifest, discarded_on_failure(out, job):
        if job.chunks:
            ds = ray.data.from_items([{"chunk": k} for k in range(len(job.chunks))])
            ds = ds.map_batches(_Labeller, batch_size=1, concurrency=pool,
                                num_gpus=1 if gpu else 0, num_cpus=0 if gpu else cpus_per_actor,
                                fn_constructor_kwargs={"recipe": recipe, "model_args": model_args,
                                                       "loader": job.loader, "out": str(out), "done": job.done,
                                                       "threads": max(1, cpus // pool)})
            with clock("ray"):
                for row in ds.iter_rows():
                    got = json.loads(row["records"])
                    actors.add(got["seconds"])
                    pending[int(row["chunk"])] = got["records"]
                    while nxt in pending:  # the manifest is written in chunk order
                        records = pending.pop(nxt)
                        job.manifest.append(records)
                        processed += len(records)
                        if progress is not None:
                            progress(len(records), job.total)
                        nxt += 1
    return close_run(out, job, clock, processed, formats=formats,
                     engine={"engine": "ray", "actors": pool, "cpus_per_actor": 0 if gpu else cpus_per_actor,
                             "actor_seconds": {k: round(v, 4) for k, v in actors.seconds.items()}},
                     skip_empty=skip_empty)
