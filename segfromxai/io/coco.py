"""Output: COCO instances and results JSON (streamed, atomic); the record checks and file names the exports share.

The exports written from these records live beside this module (:mod:`segfromxai.io.png`,
:mod:`segfromxai.io.yolo`), each registered once in :data:`segfromxai.io.exporters.EXPORTERS`.

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

import math
import os
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np

from ..ops import masks
from ..fileio import atomic_write, dumps_compact

_RESERVED = ("id", "image_id", "area", "bbox", "iscrowd")
AGNOSTIC_CLASS = "object"
"""The one category name of class-agnostic masks (a headless model's, a class-agnostic evaluation's), and the
supercategory of every category a run writes."""


def record_image(record: dict) -> dict:
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


def record_annotations(record: dict) -> list:
    """The record's ``annotations`` list (empty when absent); ValueError when it is not a list."""
    anns = record.get("annotations", [])
    if not isinstance(anns, (list, tuple)):
        raise ValueError(f"'annotations' must be a list, got {type(anns).__name__}")
    return anns


def checked_annotation(ann: dict, image: dict) -> tuple[dict, dict]:
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


def iter_records(records: Iterable[dict] | Callable[[], Iterable[dict]]) -> Iterable[dict]:
    """``records`` itself, or what it returns when it is a zero-argument callable."""
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
            image = record_image(record)
            if image["id"] in seen:
                raise ValueError(f"duplicate image id {image['id']}")
            seen.add(image["id"])
            f.write(("," if image_ids else "") + dumps_compact(image))
            image_ids.append(image["id"])
        f.write('],"annotations":[')
        i = -1
        for i, record in enumerate(records()):
            image = record_image(record)
            if i >= len(image_ids) or image["id"] != image_ids[i]:
                raise ValueError("records() gave a different sequence of images on its second call; it must "
                                 "return a fresh iterable of the same records each time")
            for ann in record_annotations(record):
                clash = [k for k in _RESERVED if isinstance(ann, dict) and k in ann]
                if clash:
                    raise ValueError(f"image {image['id']}: annotation already has {clash}; write_coco assigns them")
                ann, rle = checked_annotation(ann, image)
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
        for record in iter_records(records):
            image = record_image(record)
            for ann in record_annotations(record):
                ann, rle = checked_annotation(ann, image)
                entry = {"image_id": image["id"], "category_id": ann["category_id"], "segmentation": rle,
                         "score": ann["score"]}
                f.write(("," if n else "") + dumps_compact(entry))
                n += 1
        f.write("]\n")
    return n


def relative_path(file_name: str) -> Path:
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
    rel = relative_path(file_name)
    return rel.with_name(rel.name + suffix)


def export_stem(file_name: str) -> str:
    """The image's relative POSIX path without its extension (``sub/a.jpg`` -> ``sub/a``): how tools that pair a
    label with its image by name (YOLO) name the label. Raises ValueError as :func:`export_name`."""
    return str(PurePosixPath(export_name(file_name, "").as_posix()).with_suffix(""))


def named_after(rel: str, suffix: str, names: set[str], stems: set[str]) -> bool:
    """Whether the POSIX path ``rel`` is the ``suffix`` file of one of the images ``names``: :func:`export_name`
    (extension kept), or the name earlier versions wrote (the :func:`export_stem` plus ``suffix``)."""
    stem = rel[:-len(suffix)]
    return rel.endswith(suffix) and (stem in names or stem in stems)


def ignore_mask(ann: dict) -> np.ndarray | None:
    """An annotation's ``ignore_segmentation`` (a compressed RLE of pixels whose label is unknown, as in GrabCut's
    trimap band; non-standard, so pycocotools and COCOeval do not read it) as a bool mask, or None."""
    rle = ann.get("ignore_segmentation")
    if not rle:
        return None
    from pycocotools import mask as mask_utils

    if isinstance(rle.get("counts"), str):
        rle = {**rle, "counts": rle["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)
