"""A trained head's masks as COCO: its probabilities at each image's size, the winning channel's pixels moved by
the boundary stage and cleaned with the run recipe's ``[masks]`` section, written with the run's categories as
``run`` writes ``pseudo_labels.json``; in ``binary`` mode each image's category is the trunk classifier's top-1
class, as ``run`` explains it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.coco import write_coco
from ..io.images import load_image
from ..models.model import LoadedModel
from ..ops import masks as mask_ops
from .config import StudentConfig
from .data import RunSource
from .heads import view_probs
from .masks import channel_masks
from .tokens import Tokens


@dataclass(frozen=True)
class Labeller:
    """What turns a student's probabilities into COCO annotations: the mode, the run's categories, the category of
    each trunk class (binary mode; ``fallback`` for classes the run does not name), the ``[masks]`` section and the
    boundary stage (``boundary``, a name in :data:`segfromxai.stages.boundary.BOUNDARIES`, with ``boundary_params``, on
    the soft map ``soft`` of :data:`segfromxai.student.masks.SOFT_MAPS`)."""

    mode: str
    categories: list[dict]
    class_category: dict[int, int]
    fallback: int
    mask_params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    boundary: str = "none"
    boundary_params: dict[str, Any] = field(default_factory=dict)
    soft: str = "ramp"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a student's model card keeps them, so that a folder is labelled without the training
        run); ``class_category``'s keys as strings."""
        d = dict(self.__dict__)
        d["class_category"] = {str(k): v for k, v in self.class_category.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Labeller":
        """The labeller :meth:`to_dict` wrote."""
        return cls(**{**d, "class_category": {int(k): int(v) for k, v in d["class_category"].items()}})


def student_boundary(recipe: dict[str, Any], method: str | None = None) -> tuple[str, dict[str, Any]]:
    """The boundary method and parameters of a student's masks: the training run's recipe's ``[boundary]``
    (``{"method": ..., **params}``), or ``method`` when given (with the recipe's parameters when it is the recipe's
    method, else its own defaults)."""
    given = dict(recipe) if recipe else {"method": "none"}
    own = str(given.pop("method", "none"))
    if method is None or method == own:
        return own, given
    return method, {}


def make_labeller(model: LoadedModel, src: RunSource, anns: dict[str, list[dict]], mode: str,
                  config: StudentConfig) -> Labeller:
    """The :class:`Labeller` of a student trained on ``src`` (trunk classes matched to the run's categories by name;
    fallback: the category with most training masks)."""
    by_name = {c["name"]: int(c["id"]) for c in src.categories}
    counts: dict[int, int] = {}
    for v in anns.values():
        for a in v:
            counts[int(a["category_id"])] = counts.get(int(a["category_id"]), 0) + 1
    fallback = max(counts, key=lambda c: (counts[c], -c)) if counts else int(src.categories[0]["id"])
    class_category = {i: by_name[c] for i, c in enumerate(model.classes) if c in by_name}
    method, params = student_boundary(src.boundary, config.boundary)
    provenance = {"student": config.head, "mode": mode, "trunk": model.source, "boundary": method}
    return Labeller(mode, src.categories, class_category, fallback, src.mask_params, provenance, method, params,
                    config.soft)


def annotations_of(probs: np.ndarray, class_probs: np.ndarray, lab: Labeller, *, image: np.ndarray | None = None,
                   grid: tuple[int, int] = (1, 1)) -> list[dict]:
    """Annotations of one image from the student's probabilities float32 (K, H, W): per foreground channel, the
    cleaned masks of the pixels where it wins, moved onto the image's edges by ``lab.boundary``
    (:func:`segfromxai.student.masks.channel_masks`; ``image`` uint8 (H, W, 3) RGB is its guide, ``grid`` the
    student's token grid). Binary: category of the trunk's top-1 class, score = its probability times the mean
    foreground probability in the mask; classes: the channel's category, score = its mean probability in the
    mask."""
    found = channel_masks(probs, image, grid=grid, boundary=lab.boundary, params=lab.boundary_params, soft=lab.soft)
    out = []
    for c, mask in enumerate(found, start=1):
        if lab.mode == "binary":
            top = int(class_probs.argmax()) if class_probs.size else -1
            cat, conf = lab.class_category.get(top, lab.fallback), float(class_probs.max()) if class_probs.size else 1.0
        else:
            cat, conf = int(lab.categories[c - 1]["id"]), 1.0
        for m in mask_ops.clean([mask], **lab.mask_params):
            out.append({"category_id": cat, "segmentation": mask_ops.encode(m),
                        "score": conf * float(probs[c][m].mean()), "attributes": dict(lab.provenance)})
    return out


def predict(head: nn.Module, tokens: Tokens, lab: Labeller, *, chunk: int = 16, workers: int | None = None,
            guides: list[np.ndarray] | None = None) -> list[dict]:
    """COCO records (see :mod:`segfromxai.io.coco`) of every image of ``tokens``: image ids 1, 2, ... in order, each
    image written with or without masks, as ``run`` writes them. The boundary stage (unless ``none``) takes each
    image as its guide: ``guides[i]`` (uint8 (H, W, 3), already read) when given, else read from ``tokens.root``.

    ``chunk`` images at a time: their probabilities come from the head in this thread (no gradient), then their
    masks (image read, boundary stage, cleaning) on ``workers`` threads with a one-thread BLAS
    (:func:`segfromxai.run.pipeline.thread_map`, as ``run`` labels a batch); every step is deterministic per image, so
    the records do not depend on ``workers``."""
    from ..run.pipeline import thread_map

    if lab.boundary != "none" and tokens.root is None and guides is None:
        raise ValueError(f"boundary method {lab.boundary!r} needs the images: tokens without a root folder")
    grid = tuple(tokens.grid.shape[2:4])
    records = []
    for s in range(0, len(tokens.names), chunk):
        idx = list(range(s, min(len(tokens.names), s + chunk)))
        with torch.no_grad():
            probs = {i: view_probs(head, tokens.grid[i:i + 1, :1], tuple(tokens.sizes[i]))[0].numpy() for i in idx}

        def masks_of(i: int) -> list[dict]:
            if lab.boundary == "none":
                guide = None
            else:
                guide = guides[i] if guides is not None else load_image(Path(tokens.root) / tokens.names[i])
            return annotations_of(probs[i], tokens.probs[i], lab, image=guide, grid=grid)

        for i, anns in zip(idx, thread_map(masks_of, idx, workers)):
            h, w = tokens.sizes[i]
            image = {"id": i + 1, "file_name": tokens.names[i], "height": int(h), "width": int(w)}
            records.append({"image": image, "annotations": anns})
    return records


def write_labels(path: Path, records: list[dict], lab: Labeller, info: dict[str, Any]) -> dict:
    """Write a student's records as COCO (the run's categories)."""
    return write_coco(path, lambda: iter(records), categories=lab.categories, info=info)
