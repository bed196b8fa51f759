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

import contextlib
import json
import math
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterable, Iterator

import cv2
import numpy as np

from . import masks

_RESERVED = ("id", "image_id", "area", "bbox", "iscrowd")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success replace ``path`` with it.

    The temporary file is ``<dir>/.<name>.<pid>.<random>.tmp``. On leaving the block normally it is flushed,
    fsynced and moved onto ``path`` with ``os.replace`` (atomic on POSIX and Windows within one filesystem), then
    the folder is fsynced. If the block raises, the temporary file is removed, ``path`` is left as it was, and
    the exception propagates.

    Parameters
    ----------
    path : str or PathLike
        Final file; its folder must exist.
    mode : {"w", "wb"}
        Text (UTF-8, ``\\n`` line endings) or binary.

    Yields
    ------
    file object
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        else:
            f = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
    rle = masks._compressed(seg)
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
        f.write('{"info":' + _dumps(info) + ',"licenses":' + _dumps(licenses or []) + ',"images":[')
        seen: set[int] = set()
        for record in records():
            image = _image(record)
            if image["id"] in seen:
                raise ValueError(f"duplicate image id {image['id']}")
            seen.add(image["id"])
            f.write(("," if image_ids else "") + _dumps(image))
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
                f.write(("," if n_annotations > 1 else "") + _dumps(out))
        if i + 1 != len(image_ids):
            raise ValueError(f"records() gave {len(image_ids)} images on its first call and {i + 1} on its second "
                             "call; it must return a fresh iterable each time")
        f.write('],"categories":' + _dumps(categories) + "}\n")
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
                f.write(("," if n else "") + _dumps(entry))
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


def export_yolo(out_dir: str | os.PathLike, records: Iterable[dict] | Callable[[], Iterable[dict]], *,
                categories: list[dict], tolerance: float = 0.0) -> int:
    """Write YOLO segmentation labels and ``data.yaml``.

    Labels go to ``out_dir/labels/<file_name with its suffix replaced by .txt>``, one line per polygon:
    ``class_index x1 y1 x2 y2 ...`` with ``class_index`` the 0-based position of the category in ``categories``
    and coordinates divided by the image width / height (6 decimals, in [0, 1]). Polygons come from
    :func:`segfromxai.masks.to_polygons` and are lossy: holes are dropped, vertices sit on boundary pixel centres,
    a mask in several parts gives one line per part, and parts thinner than 2 pixels vanish. An image with no
    annotations gets an empty label file. ``out_dir/data.yaml`` lists ``nc`` and ``names``; images are expected
    in ``out_dir/images/`` with the same relative paths. All files are written atomically.

    Parameters
    ----------
    out_dir : str or PathLike
    records : iterable of dict, or a zero-argument callable returning one
        Records as in the module docstring; read once.
    categories : list of dict
        COCO categories (``id``, ``name``); their order defines the class indices.
    tolerance : float
        Polygon simplification distance in pixels (see :func:`segfromxai.masks.to_polygons`).

    Returns
    -------
    int
        Number of label files written (``data.yaml`` not counted).
    """
    out_dir = Path(out_dir)
    index = {int(c["id"]): i for i, c in enumerate(categories)}
    if len(index) != len(categories):
        raise ValueError("category ids must be unique")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: set[Path] = set()
    for record in _iterate(records):
        image = _image(record)
        target = out_dir / "labels" / _relative(image["file_name"]).with_suffix(".txt")
        if target in written:
            raise ValueError(f"two images map to the same label file {target}")
        h, w = image["height"], image["width"]
        lines = []
        for ann in _annotations(record):
            ann, rle = _checked(ann, image)
            if ann["category_id"] not in index:
                raise ValueError(f"image {image['id']}: category_id {ann['category_id']} is not in categories")
            for poly in masks.to_polygons(masks.decode(rle), tolerance=tolerance):
                xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2) / (w, h)
                lines.append(f"{index[ann['category_id']]} " + " ".join(f"{v:.6f}" for v in xy.ravel()))
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        written.add(target)
    yaml = ["# YOLO segmentation dataset written by segfromxai.",
            "# Labels are polygons traced from the COCO RLE masks: lossy (holes and sub-pixel detail are lost,",
            "# a mask in several parts gives one polygon per part). Use the COCO file for exact masks.",
            "# Put images in images/ with the same relative paths as labels/.",
            "path: .",
            "train: images",
            "val: images",
            f"nc: {len(categories)}",
            "names:"]
    yaml += [f"  {i}: {json.dumps(str(c['name']))}" for i, c in enumerate(categories)]
    with atomic_write(out_dir / "data.yaml", "w") as f:
        f.write("\n".join(yaml) + "\n")
    return len(written)
