"""What a student reads from a ``run`` folder: its image folder, COCO file, categories and recipe sections
(:func:`read_run`), the annotations by image (:func:`read_annotations`), and which images it trains on and which it
predicts (:func:`split`, by a stable hash of each name).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.coco import write_coco
from ..io.images import find_images
from ..models.model import sha256
from ..run.manifest import Manifest
from .config import StudentConfig


@dataclass(frozen=True)
class RunSource:
    """What a ``run`` folder offers a student: its image folder, COCO file, categories and ``[masks]`` section."""

    folder: Path
    images: Path
    coco: Path
    categories: list[dict]
    mask_params: dict[str, Any]
    boundary: dict[str, Any] = field(default_factory=lambda: {"method": "none"})


def read_run(folder: str | Path) -> RunSource:
    """Read a ``run`` output folder: ``pseudo_labels.json`` (with the resolved recipe in its ``info``, as in
    ``run.json``) and the image folder named in its manifest header."""
    folder = Path(folder)
    coco, manifest = folder / "pseudo_labels.json", folder / "manifest.jsonl"
    if not coco.is_file():
        raise FileNotFoundError(f"{folder} is not a finished run folder (no pseudo_labels.json)")
    header = Manifest(manifest).read_header() if manifest.is_file() else None
    if not header or "images" not in header:
        raise ValueError(f"{folder}: its manifest.jsonl does not name the image folder")
    doc = json.loads(coco.read_text())
    recipe = doc.get("info", {}).get("recipe", {})
    return RunSource(folder, Path(header["images"]), coco, list(doc["categories"]), dict(recipe.get("masks", {})),
                     dict(recipe.get("boundary", {"method": "none"})))


def content_key(src: RunSource, names: list[str], head_weights: str | None) -> dict[str, Any]:
    """What a trained round learnt from, by content: the training run's pseudo-labels, the bytes of each training
    image ``names`` (under ``src.images``) and the ``head_weights`` file (None: none), each a SHA-256; part of the
    key that decides whether a finished round is reused."""
    return {"pseudo_labels": sha256(src.coco),
            "images": [(n, sha256(src.images / n)) for n in names],
            "head_weights": sha256(head_weights) if head_weights else None}


def check_labelled(src: RunSource, names: list[str]) -> None:
    """Raise ValueError naming the training run when its COCO file lists no image (``names`` empty): every image
    was skipped or failed (counts from its ``run.json``), or it found none."""
    if names:
        return
    counts: dict[str, Any] = {}
    try:
        counts = dict(json.loads((src.folder / "run.json").read_text()).get("counts") or {})
    except (OSError, ValueError, AttributeError):
        pass
    said = ", ".join(f"{counts[k]} {k}" for k in ("skipped", "failed") if counts.get(k))
    raise ValueError(f"the training run {src.folder} labelled no image ({said or 'none found'}"
                     f"{'; see its run.json' if said else ''}): nothing to train on")


def held_out(name: str, fraction: float) -> bool:
    """Whether image ``name`` (relative path) is in the held-out share ``fraction``: a stable hash (SHA-1) of the
    name, so the split is the same on every machine and does not move when images are added."""
    h = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < fraction


def image_names(root: str | Path) -> list[str]:
    """Relative paths (POSIX) of the images under ``root``, in :func:`segfromxai.io.images.find_images` order."""
    root = Path(root)
    return [p.name if p == root else p.relative_to(root).as_posix() for p in find_images(root)]


def read_annotations(coco: str | Path) -> tuple[dict[str, list[dict]], dict[str, tuple[int, int]], dict]:
    """A COCO file's annotations and (H, W) by image file name, and the whole document."""
    doc = json.loads(Path(coco).read_text())
    by_id = {img["id"]: img["file_name"] for img in doc["images"]}
    anns: dict[str, list[dict]] = {img["file_name"]: [] for img in doc["images"]}
    for a in doc["annotations"]:
        anns[by_id[a["image_id"]]].append(a)
    sizes = {img["file_name"]: (int(img["height"]), int(img["width"])) for img in doc["images"]}
    return anns, sizes, doc


@dataclass(frozen=True)
class Split:
    """Images to train on (from the training run) and to predict (under ``--images``), by relative name."""

    train: list[str]
    test: list[str]
    held_out: bool


def split(train_names: list[str], train_root: Path, images: Path, config: StudentConfig) -> Split:
    """The student never predicts (for scoring) images it trained on unless asked: when ``images`` is the training
    run's image folder and ``config.holdout``, the images with :func:`held_out` (``val_fraction``) are left out of
    training and are the only ones predicted; otherwise it trains on every image and predicts every image."""
    test = image_names(images)
    same = Path(images).resolve() == Path(train_root).resolve()
    if not (same and config.holdout):
        return Split(sorted(train_names), test, False)
    f = config.val_fraction
    out = Split(sorted(n for n in train_names if not held_out(n, f)), [n for n in test if held_out(n, f)], True)
    if not out.test or not out.train:
        raise ValueError(f"holding out {f:.0%} of {len(test)} images leaves {len(out.train)} to train on and "
                         f"{len(out.test)} to score; change --val-fraction")
    return out


def subset_coco(src: str | Path, names: list[str], path: Path) -> Path:
    """Write the images ``names`` of a COCO file (and their annotations) to ``path``: pseudo-labels scored on the
    same images as the student."""
    anns, sizes, doc = read_annotations(src)
    reserved = ("id", "image_id", "area", "bbox", "iscrowd")
    wanted = [n for n in names if n in sizes]
    images = {img["file_name"]: img for img in doc["images"]}
    records = [{"image": images[n], "annotations": [{k: v for k, v in a.items() if k not in reserved}
                                                    for a in anns[n]]} for n in wanted]
    write_coco(path, lambda: iter(records), categories=doc["categories"], info=doc.get("info", {}))
    return path
