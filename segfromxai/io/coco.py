"""Output: COCO instances and results JSON (streamed, atomic), PNG label maps, YOLO polygons.

A *record* is one finished image, a plain JSON-serialisable dict::

    {"image": {"id": int, "file_name": str, "height": int, "width": int, ...extra keys},
     "annotations": [{"category_id": int,
                      "segmentation": {"size": [H, W], "counts": str},   # compressed RLE, see masks.encode
                      "score": float,
                      "attributes": dict,                                # provenance, optional
                      ...extra keys}]}

Annotations carry no ``id``, ``image_id``, ``area``, ``bbox`` or ``iscrowd``: the writers add them. Every file is
written atomically (temporary file in the same folder, fsync, ``os.replace``), so a reader never sees a
half-written file and an interrupted run leaves the previous file, if any, untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import cv2
import numpy as np

from ..ops import masks
from ..fileio import atomic_write, dumps_compact

_RESERVED = ("id", "image_id", "area", "bbox", "iscrowd")


def _image(record: dict) -> dict:
    """The record's image dict with ``id``, ``height``, ``width`` as Python ints, validated."""
    if not isinstance(record, dict) or not isinstance(record.get("image"), dict):
        raise ValueError("a record must be a dict with an 'image' dict and an 'annotations' list")
    image = record["image"]
    for key in ("id", "file_name", "height", "width"):
        if key not in image:
            raise ValueError(f"image record lacks {key!r}: {image!r}")
    out = dict(image)
    for key in ("id", "height", "width"):
        value = image[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"image {key!r} must be an int, got {value!r}")
        out[key] = int(value)
    if out["height"] <= 0 or out["width"] <= 0:
        raise ValueError(f"image {out['id']}: height and width must be positive, got {out['height']}x{out['width']}")
    if not isinstance(out["file_name"], str) or not out["file_name"]:
        raise ValueError(f"image {out['id']}: file_name must be a non-empty str")
    return out


def _annotations(record: dict) -> list:
    anns = record.get("annotations", [])
    if not isinstance(anns, (list, tuple)):
        raise ValueError(f"'annotations' must be a list, got {type(anns).__name__}")
    return anns


def _checked(ann: dict, image: dict) -> tuple[dict, dict]:
    """Validate an annotation against its image: (normalised annotation, compressed RLE with str counts).

    Raises ValueError for a missing field, a size that differs from the image's, or an empty mask.
    """
    if not isinstance(ann, dict):
        raise ValueError(f"image {image['id']}: an annotation must be a dict, got {type(ann).__name__}")
    for key in ("category_id", "segmentation", "score"):
        if key not in ann:
            raise ValueError(f"image {image['id']}: annotation lacks {key!r}")
    seg = ann["segmentation"]
    if not isinstance(seg, dict):
        raise ValueError(f"image {image['id']}: segmentation must be an RLE dict (polygons are not accepted)")
    size = [int(s) for s in seg.get("size", ())]
    if size != [image["height"], image["width"]]:
        raise ValueError(f"image {image['id']}: segmentation size {size} differs from the image's "
                         f"[height, width] = {[image['height'], image['width']]}")
    rle = masks.pycoco_rle(seg)
    rle = {"size": size, "counts": rle["counts"].decode("ascii")}
    score = float(ann["score"])
    if not math.isfinite(score):
        raise ValueError(f"image {image['id']}: score must be finite, got {score}")
    out = dict(ann)
    out["category_id"] = int(ann["category_id"])
    out["segmentation"] = rle
    out["score"] = score
    if masks.area(rle) == 0:
        raise ValueError(f"image {image['id']}: empty mask (area 0) for category {out['category_id']}; "
                         "empty masks are not written")
    return out, rle


def _iterate(records: Iterable[dict] | Callable[[], Iterable[dict]]) -> Iterable[dict]:
    return records() if callable(records) else records


def write_coco(path: str | os.PathLike, records: Callable[[], Iterable[dict]], *, categories: list[dict],
               info: dict, licenses: list | None = None) -> dict:
    """Stream a COCO instances JSON to ``path`` (atomically) without holding the records in memory.

    ``records()`` is called twice, once for the ``images`` array and once for the ``annotations`` array; each call
    must return a fresh iterable giving the same records in the same order (checked: a different sequence of
    image ids raises ``ValueError``). Each annotation gets ``id`` (1, 2, ... in record order), ``image_id``,
    ``iscrowd: 0``, and ``area`` (int) and ``bbox`` (``[x, y, w, h]`` floats) from pycocotools; ``segmentation``
    is written as compressed RLE with ``counts`` a str. The file has the keys ``info, licenses, images,
    annotations, categories`` and loads with ``pycocotools.coco.COCO``.

    Parameters
    ----------
    path : str or PathLike
        Output file; its folder must exist. Left untouched if anything fails.
    records : callable
        Zero-argument callable returning an iterable of records (see the module docstring).
    categories : list of dict
        COCO categories, each with at least ``id`` (int) and ``name``.
    info : dict
        COCO ``info`` (put the resolved recipe and versions here).
    licenses : list, optional
        COCO ``licenses``; ``[]`` when omitted.

    Returns
    -------
    dict
        ``{"images": n_images, "annotations": n_annotations}``.

    Raises
    ------
    ValueError
        On an empty mask, a segmentation whose size differs from its image's ``(height, width)``, an unknown
        ``category_id``, a duplicate image id, an annotation that already has one of the keys the writer assigns
        (``id``, ``image_id``, ``area``, ``bbox``, ``iscrowd``), or records that differ between the two calls.
    """
    if not callable(records):
        raise TypeError("records must be a zero-argument callable returning a fresh iterable of records "
                        "(it is called twice), e.g. `lambda: iter(my_list)`")
    category_ids = {int(c["id"]) for c in categories}
    if len(category_ids) != len(categories):
        raise ValueError("category ids must be unique")
    image_ids: list[int] = []
    n_annotations = 0
    with atomic_write(path, "w") as f:
        f.write('{"info":' + dumps_compact(info) + ',"licenses":' + dumps_compact(licenses or []) + ',"images":[')
        seen: set[int] = set()
        for record in records():
            image = _image(record)
            if image["id"] in seen:
                raise ValueError(f"duplicate image id {image['id']}")
            seen.add(image["id"])
            f.write(("," if image_ids else "") + dumps_compact(image))
            image_ids.append(image["id"])
        f.write('],"annotations":[')
        i = -1
        for i, record in enumerate(records()):
            image = _image(record)
            if i >= len(image_ids) or image["id"] != image_ids[i]:
                raise ValueError("records() gave a different sequence of images on its second call; it must "
                                 "return a fresh iterable of the same records each time")
            for ann in _annotations(record):
                clash = [k for k in _RESERVED if isinstance(ann, dict) and k in ann]
                if clash:
                    raise ValueError(f"image {image['id']}: annotation already has {clash}; write_coco assigns them")
                ann, rle = _checked(ann, image)
                if ann["category_id"] not in category_ids:
                    raise ValueError(f"image {image['id']}: category_id {ann['category_id']} is not in "
                                     f"categories {sorted(category_ids)}")
                n_annotations += 1
                out = {"id": n_annotations, "image_id": image["id"], "category_id": ann["category_id"],
                       "segmentation": rle, "area": masks.area(rle), "bbox": masks.bbox(rle), "iscrowd": 0,
                       "score": ann["score"]}
                out.update((k, v) for k, v in ann.items() if k not in out)
                f.write(("," if n_annotations > 1 else "") + dumps_compact(out))
        if i + 1 != len(image_ids):
            raise ValueError(f"records() gave {len(image_ids)} images on its first call and {i + 1} on its second "
                             "call; it must return a fresh iterable each time")
        f.write('],"categories":' + dumps_compact(categories) + "}\n")
    return {"images": len(image_ids), "annotations": n_annotations}


def write_results(path: str | os.PathLike, records: Iterable[dict] | Callable[[], Iterable[dict]]) -> int:
    """Stream a COCO results JSON (a list) to ``path`` atomically, for ``COCO.loadRes`` and ``COCOeval``.

    Each annotation becomes ``{"image_id", "category_id", "segmentation", "score"}`` (other keys dropped), with
    the segmentation as compressed RLE with str counts. Validation as in :func:`write_coco` (empty masks and size
    mismatches raise ``ValueError``).

    Parameters
    ----------
    path : str or PathLike
    records : iterable of dict, or a zero-argument callable returning one
        Records as in the module docstring; read once.

    Returns
    -------
    int
        Number of results written.
    """
    n = 0
    with atomic_write(path, "w") as f:
        f.write("[")
        for record in _iterate(records):
            image = _image(record)
            for ann in _annotations(record):
                ann, rle = _checked(ann, image)
                entry = {"image_id": image["id"], "category_id": ann["category_id"], "segmentation": rle,
                         "score": ann["score"]}
                f.write(("," if n else "") + dumps_compact(entry))
                n += 1
        f.write("]\n")
    return n


def _relative(file_name: str) -> Path:
    """``file_name`` as a relative path that stays inside the output folder. A backslash separates folders only
    where the OS says so (Windows); on POSIX it is a character of the name, so ``sub\\b.png`` and ``sub/b.png``
    stay two files."""
    p = PurePosixPath(file_name.replace("\\", "/") if os.sep == "\\" else file_name)
    if p.is_absolute() or ".." in p.parts or not p.parts or Path(file_name).is_absolute():
        raise ValueError(f"file_name must be a relative path without '..', got {file_name!r}")
    return Path(*p.parts)


def export_name(file_name: str, suffix: str) -> Path:
    """The relative path of an image's exported file: its whole name, extension kept, with ``suffix`` appended
    (``sub/a.jpg`` -> ``sub/a.jpg.png``), so distinct images never share one (``a.png`` and ``a.jpg`` give
    ``a.png.png`` and ``a.jpg.png``). Raises ValueError for an absolute name or one with ``..``."""
    rel = _relative(file_name)
    return rel.with_name(rel.name + suffix)


def export_png(out_dir: str | os.PathLike, records: Iterable[dict] | Callable[[], Iterable[dict]], *,
               ignore_overlap: bool = True) -> int:
    """Write one uint8 label PNG per image: 0 background, ``k`` = category id, 255 = ignore.

    The file is ``out_dir/<file_name>.png`` (:func:`export_name`: the image's extension is kept, so ``a.jpg``
    gives ``a.jpg.png`` and no two images share a file; subfolders of ``file_name`` kept, parents created),
    ``height x width`` pixels, written atomically. Category ids are class index + 1, so they
    must lie in 1..254.

    Parameters
    ----------
    out_dir : str or PathLike
    records : iterable of dict, or a zero-argument callable returning one
        Records as in the module docstring; read once.
    ignore_overlap : bool
        True: pixels covered by annotations of *different* categories get 255 (ignore); overlaps within one
        category keep that category. False: the annotation with the highest score wins (ties: the later one).

    Returns
    -------
    int
        Number of PNG files written.

    Raises
    ------
    ValueError
        On a category id outside 1..254, two images mapping to the same PNG, an unsafe ``file_name``, or an
        invalid annotation (see :func:`write_coco`).
    """
    out_dir = Path(out_dir)
    written: set[Path] = set()
    for record in _iterate(records):
        image = _image(record)
        target = out_dir / export_name(image["file_name"], ".png")
        if target in written:
            raise ValueError(f"two images map to the same label file {target}")
        label = np.zeros((image["height"], image["width"]), dtype=np.uint8)
        anns = [_checked(a, image)[0] for a in _annotations(record)]
        for ann in anns:
            if not 1 <= ann["category_id"] <= 254:
                raise ValueError(f"image {image['id']}: category_id {ann['category_id']} does not fit a label PNG "
                                 "(1..254; 0 is background, 255 ignore)")
        if ignore_overlap:
            conflict = np.zeros_like(label, dtype=bool)
            for ann in anns:
                m = masks.decode(ann["segmentation"])
                k = ann["category_id"]
                conflict |= m & (label != 0) & (label != k)
                label[m] = k
            label[conflict] = 255
        else:
            for ann in sorted(anns, key=lambda a: a["score"]):
                label[masks.decode(ann["segmentation"])] = ann["category_id"]
        ok, buf = cv2.imencode(".png", label)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "wb") as f:
            f.write(buf.tobytes())
        written.add(target)
    return len(written)


YOLO_SPLITS = ("train", "val")


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
    image = _image(record)
    h, w = image["height"], image["width"]
    lines = []
    for ann in _annotations(record):
        ann, rle = _checked(ann, image)
        if ann["category_id"] not in index:
            raise ValueError(f"image {image['id']}: category_id {ann['category_id']} is not in categories")
        for poly in masks.to_polygons(masks.decode(rle), tolerance=tolerance):
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2) / (w, h)
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
             "# a mask in several parts gives one polygon per part). Use the COCO file for exact masks.",
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
        out_dir/labels/{train,val}/<file_name with suffix .txt>       one line per polygon

    A label line is ``class_index x1 y1 x2 y2 ...`` with ``class_index`` the 0-based position of the category in
    ``categories`` and coordinates divided by the image width / height (6 decimals, in [0, 1]). Polygons come from
    :func:`segfromxai.ops.masks.to_polygons` and are lossy: holes are dropped, vertices sit on boundary pixel centres,
    a mask in several parts gives one line per part, and parts thinner than 2 pixels vanish. An image with no
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
        Records as in the module docstring; read once.
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
    for record in _iterate(records):
        rel = _relative(_image(record)["file_name"])
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
