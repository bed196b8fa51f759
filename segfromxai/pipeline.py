"""The one place that chains the stages: images -> model -> (explainers -> fusion -> threshold -> refine -> COCO).

For now it holds the classification pass that every later stage starts from: which class each image is, and how
sure the model is.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .images import Failure, LoadedImage, iter_images
from .model import LoadedModel


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
