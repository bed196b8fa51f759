"""Which class each image is explained for, and the labels files that say so.

:class:`Targets` chooses per image: the model's top-1 class, a ``file_name,label`` CSV (:func:`read_labels_csv`)
or ImageFolder-style class folders. :func:`accuracy_table` scores top-1 predictions against such labels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .pipeline import Prediction


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
