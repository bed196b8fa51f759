"""Which class each image is explained for, and the labels files that say so.

:class:`Targets` chooses per image: the model's top-1 class, a ``file_name,label`` CSV (:func:`read_labels_csv`)
or ImageFolder-style class folders. :func:`accuracy_table` scores top-1 predictions against such labels.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from ..io.coco import AGNOSTIC_CLASS
from ..models.model import LoadedModel
from ..recipe.checks import is_headless

@dataclass(frozen=True)
class Prediction:
    """The model's top-1 class of one image, with its softmax confidence."""

    rel_path: str
    label: int
    confidence: float


def label_key(file_name: str) -> str:
    """A labels-file name as the run names images: POSIX, relative, ``./`` and doubled slashes removed."""
    return PurePosixPath(file_name.strip()).as_posix()


def read_labels_csv(path: str | Path) -> dict[str, str]:
    """``file_name,label`` rows as a dict (file names relative to the image folder, POSIX separators).

    The file is UTF-8 text (a byte-order mark is accepted) with the header ``file_name,label`` (other columns are
    ignored); names are normalised with :func:`label_key` (``./a.png`` is ``a.png``). A name given twice with the
    same label counts once; with different labels it is an error. Raises ValueError naming the file and, where it
    applies, the line: not UTF-8, empty, no header, a row without a name or label, conflicting rows.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"labels file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise ValueError(f"labels file {path} is empty; expected the header 'file_name,label' and one row per image")
    if not {"file_name", "label"} <= {(n or "").strip() for n in reader.fieldnames}:
        raise ValueError(f"labels file {path} must start with the header 'file_name,label', got "
                         f"{','.join(n or '' for n in reader.fieldnames)!r}")
    reader.fieldnames = [(n or "").strip() for n in reader.fieldnames]
    out: dict[str, tuple[str, int]] = {}
    for r in reader:
        name, label = (r.get("file_name") or "").strip(), (r.get("label") or "").strip()
        if not name or not label:
            raise ValueError(f"labels file {path}, line {reader.line_num}: a row needs a file_name and a label")
        key = label_key(name)
        if key in out and out[key][0] != label:
            raise ValueError(f"labels file {path}: {key} has two labels, {out[key][0]!r} (line {out[key][1]}) and "
                             f"{label!r} (line {reader.line_num}); give one label per image")
        out.setdefault(key, (label, reader.line_num))
    return {k: v for k, (v, _) in out.items()}


def write_predictions_csv(path: str | Path, preds: list[Prediction], classes: list[str]) -> None:
    """Write ``file_name,label,confidence`` rows (the csv module quotes names with commas or quotes), atomically, as
    UTF-8; :func:`read_labels_csv` reads the file back as labels."""
    from ..io.coco import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file_name", "label", "confidence"])
        w.writerows([p.rel_path, classes[p.label], f"{p.confidence:.6f}"] for p in preds)


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

    def without_image(self, rel_paths: list[str]) -> list[str]:
        """The labels-file names that match none of ``rel_paths`` (sorted; empty unless the source is a CSV)."""
        found = set(rel_paths)
        return sorted(k for k in (self.labels or {}) if k not in found)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n_labels": len(self.labels or {})}


def fit_classes(model: LoadedModel, targets: Targets, rel_paths: Sequence[str]) -> LoadedModel:
    """The model with categories for its masks: a headless model (it has none) gets the labels given for
    ``rel_paths`` (sorted), or ``object`` (:data:`~segfromxai.io.coco.AGNOSTIC_CLASS`); a model with a head is
    returned as it is."""
    if not is_headless(model.module):
        return model
    names = sorted({n for n in map(targets.name, rel_paths) if n is not None})
    return replace(model, classes=names or [AGNOSTIC_CLASS])
