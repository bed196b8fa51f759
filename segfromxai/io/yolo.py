"""The YOLO segmentation export: polygons traced from the COCO masks, a stable train/val split, the images
hard-linked beside their labels and a ``data.yaml`` that ultralytics trains on as written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..fileio import atomic_write
from ..ops import masks
from .coco import checked_annotation, export_stem, iter_records, record_annotations, record_image, relative_path

YOLO_SPLITS = ("train", "val")
"""Split folders the export puts under ``labels/`` and ``images/``."""


def yolo_label(file_name: str) -> str:
    """The label file of an image, relative to the export folder and before the split is chosen
    (``sub/a.jpg`` -> ``labels/sub/a.txt``): YOLO pairs a label with its image by the name without its extension,
    so ``a.png`` and ``a.jpg`` share one. ValueError for a name that cannot be exported."""
    return f"labels/{export_stem(file_name)}.txt"


def yolo_written(rel: str, names: set[str], stems: set[str]) -> bool:
    """Whether ``yolo/<rel>`` is a file the export wrote for one of the images ``names`` (``stems``: their names
    without the extension): ``data.yaml``, ``labels/[train|val/]<stem>.txt``, ``images/[train|val/]<name>``."""
    top, _, rest = rel.partition("/")
    split, _, inner = rest.partition("/")
    candidates = [rest, inner] if split in YOLO_SPLITS else [rest]
    return rel == "data.yaml" or (top == "labels" and any(c.endswith(".txt") and c[:-4] in stems
                                                         for c in candidates)) \
        or (top == "images" and any(c in names for c in candidates))


def yolo_split_key(file_name: str) -> float:
    """A stable number in [0, 1) for an image: the first 8 bytes of SHA-1(``"val:" + file_name``) / 2**64.

    It depends only on the name (not on the run, shard or machine), so the same image always lands in the same
    split, also across the shards of a merged run."""
    digest = hashlib.sha1(("val:" + file_name).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Put ``src`` at ``dst`` as a hard link (no bytes duplicated), else a copy; never a symbolic link.

    Ultralytics resolves a symlinked image to its original folder and then looks for its labels there, so a
    symlink would not train. ``dst``'s parents are created; an existing ``dst`` is replaced (atomically: the link
    or copy is made under a temporary name and renamed). Returns ``"link"`` or ``"copy"``."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: image not found (needed for the YOLO export)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(src, tmp)
            how = "link"
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, tmp)
            how = "copy"
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return how


def _yolo_lines(record: dict, index: dict[int, int], tolerance: float) -> list[str]:
    """The YOLO-seg label lines of one record (see :func:`export_yolo`)."""
    image = record_image(record)
    h, w = image["height"], image["width"]
    lines = []
    for ann in record_annotations(record):
        ann, rle = checked_annotation(ann, image)
        if ann["category_id"] not in index:
            raise ValueError(f"image {image['id']}: category_id {ann['category_id']} is not in categories")
        polygons = masks.to_polygons(masks.decode(rle), tolerance=tolerance)
        if polygons:  # one line per instance: its parts joined (ultralytics' merge_multi_segment)
            xy = masks.join_polygons(polygons) / (w, h)
            lines.append(f"{index[ann['category_id']]} " + " ".join(f"{v:.6f}" for v in xy.ravel()))
    return lines


def _move_split(out_dir: Path, rel: Path, src: str, dst: str, with_image: bool) -> None:
    """Move one image's label (and its image, when exported) from split ``src`` to split ``dst``."""
    label = Path("labels") / src / rel.with_suffix(".txt")
    moves = [(label, Path("labels") / dst / rel.with_suffix(".txt"))]
    if with_image:
        moves.append((Path("images") / src / rel, Path("images") / dst / rel))
    for a, b in moves:
        (out_dir / b).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out_dir / a, out_dir / b)


def _prune(out_dir: Path, kept: set[Path]) -> None:
    """Remove label and image files under ``out_dir/{labels,images}/{train,val}`` that this export did not write
    (left by an earlier export of a different set of images), so a split holds exactly this export's images."""
    for top in ("labels", "images"):
        for split in YOLO_SPLITS:
            folder = out_dir / top / split
            if folder.is_dir():
                for f in folder.rglob("*"):
                    if f.is_file() and f.suffix != ".cache" and f.relative_to(out_dir) not in kept:
                        f.unlink()


def _yolo_yaml(out_dir: Path, categories: list[dict], n_val: int, val_fraction: float, with_images: bool) -> str:
    val = "images/val" if n_val else "images/train"
    hint = [] if with_images else ["# No images were linked: put each image in images/train or images/val, where its "
                                   "label file is in labels/."]
    lines = hint + ["# YOLO segmentation dataset written by segfromxai.",
             "# Labels are polygons traced from the COCO RLE masks: lossy (holes and sub-pixel detail are lost,",
             "# the parts of a mask in several parts are joined into one polygon by zero-width links, one line per",
             "# instance, as ultralytics' COCO converter does). Use the COCO file for exact masks.",
             f"# val: a held-out {val_fraction:g} of the images, chosen by a stable hash of the file name"
             + ("" if n_val else " (none here: fewer than 2 images, so val is the training set)") + ".",
             f"path: {json.dumps(str(out_dir.resolve()))}",
             "train: images/train",
             f"val: {val}",
             f"nc: {len(categories)}",
             "names:"]
    return "\n".join(lines + [f"  {i}: {json.dumps(str(c['name']))}" for i, c in enumerate(categories)]) + "\n"


def export_yolo(out_dir: str | os.PathLike, records: Iterable[dict] | Callable[[], Iterable[dict]], *,
                categories: list[dict], tolerance: float = 0.0, images: str | os.PathLike | None = None,
                val_fraction: float = 0.1) -> int:
    """Write a YOLO segmentation dataset that ultralytics trains on as written, from any working directory.

    Layout (ultralytics finds a label by replacing ``/images/`` with ``/labels/`` in the image's path)::

        out_dir/data.yaml                      path: <out_dir, absolute>, train: images/train, val: images/val
        out_dir/images/{train,val}/<file_name>                        hard links to the images (copies if not)
        out_dir/labels/{train,val}/<file_name with suffix .txt>       one line per annotation

    A label line is ``class_index x1 y1 x2 y2 ...`` with ``class_index`` the 0-based position of the category in
    ``categories`` and coordinates divided by the image width / height (6 decimals, in [0, 1]). Polygons come from
    :func:`segfromxai.ops.masks.to_polygons` and are lossy: holes are dropped, vertices sit on boundary pixel centres,
    parts thinner than 2 pixels vanish, and the parts of a mask in several parts are joined into one polygon
    (:func:`segfromxai.ops.masks.join_polygons`, as ultralytics' ``merge_multi_segment``), so there is one line per
    annotation (none for a mask with no polygon left). An image with no
    annotations gets an empty label file (a background image for ultralytics).

    The val split is deterministic: an image goes to ``val`` when :func:`yolo_split_key` of its ``file_name`` is
    below ``val_fraction``. With 2 or more images each split gets at least one (the image with the smallest key
    moves to ``val``, or the largest to ``train``). With one image there is no val folder and ``val:`` names the
    training images. Images are hard-linked from ``images`` (:func:`link_or_copy`: copies across file systems,
    never symlinks); without ``images`` only labels and ``data.yaml`` are written and the images must be put in
    ``images/{train,val}`` by hand. Files of an earlier export that this one did not write are removed. Label
    files and ``data.yaml`` are written atomically.

    Parameters
    ----------
    out_dir : str or PathLike
    records : iterable of dict, or a zero-argument callable returning one
        Records as in :mod:`segfromxai.io.coco`; read once.
    categories : list of dict
        COCO categories (``id``, ``name``); their order defines the class indices.
    tolerance : float
        Polygon simplification distance in pixels (see :func:`segfromxai.ops.masks.to_polygons`).
    images : str or PathLike, optional
        The folder the records' ``file_name`` paths are relative to.
    val_fraction : float
        Expected fraction of images held out for validation, in [0, 1).

    Returns
    -------
    int
        Number of label files written (``data.yaml`` not counted).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    index = {int(c["id"]): i for i, c in enumerate(categories)}
    if len(index) != len(categories):
        raise ValueError("category ids must be unique")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[Path, str] = {}  # label path relative to its split folder -> split
    keys: dict[Path, float] = {}
    for record in iter_records(records):
        rel = relative_path(record_image(record)["file_name"])
        label = rel.with_suffix(".txt")
        if label in written:
            raise ValueError(f"two images map to the same label file {out_dir / 'labels' / label}")
        keys[rel] = yolo_split_key(rel.as_posix())
        split = "val" if keys[rel] < val_fraction else "train"
        target = out_dir / "labels" / split / label
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "w") as f:
            f.write("".join(line + "\n" for line in _yolo_lines(record, index, tolerance)))
        if images is not None:
            link_or_copy(Path(images) / rel, out_dir / "images" / split / rel)
        written[label] = split
    n_val = _balance(out_dir, written, keys, images is not None)
    kept = {Path("labels") / s / label for label, s in written.items()}
    kept |= {Path("images") / written[rel.with_suffix(".txt")] / rel for rel in keys} if images is not None else set()
    _prune(out_dir, kept)
    with atomic_write(out_dir / "data.yaml", "w") as f:
        f.write(_yolo_yaml(out_dir, categories, n_val, val_fraction, images is not None))
    return len(written)


def _balance(out_dir: Path, written: dict[Path, str], keys: dict[Path, float], with_images: bool) -> int:
    """With 2+ images, give each split at least one; with one, put it in train (moving files, updating
    ``written``). Returns the number of images in val."""
    n_val = sum(s == "val" for s in written.values())
    if (len(written) >= 2 and n_val in (0, len(written))) or (len(written) == 1 and n_val == 1):
        rel = (min if n_val == 0 else max)(keys, key=lambda r: (keys[r], r.as_posix()))
        src, dst = ("train", "val") if n_val == 0 else ("val", "train")
        _move_split(out_dir, rel, src, dst, with_images)
        written[rel.with_suffix(".txt")] = dst
        n_val += 1 if n_val == 0 else -1
    return n_val
