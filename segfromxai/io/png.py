"""The PNG export: one uint8 label map per image (0 background, ``k`` the category id, :data:`IGNORE` where
categories overlap), named after the image with its extension kept (``png/sub/a.jpg.png``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from ..fileio import atomic_write
from ..ops import masks
from .coco import checked_annotation, export_name, iter_records, named_after, record_annotations, record_image

IGNORE = 255
"""The label of pixels to leave out (of a label PNG, of a student's training targets, of an evaluation)."""


def png_file(file_name: str) -> str:
    """The label PNG of an image, relative to the export folder (``sub/a.jpg`` -> ``sub/a.jpg.png``); ValueError
    for a name that cannot be exported (see :func:`~segfromxai.io.coco.export_name`)."""
    return export_name(file_name, ".png").as_posix()


def png_written(rel: str, names: set[str], stems: set[str]) -> bool:
    """Whether ``png/<rel>`` is the label PNG of one of the images ``names`` (``stems``: their names without the
    extension, as earlier versions named the file)."""
    return named_after(rel, ".png", names, stems)


def export_png(out_dir: str | os.PathLike, records: Iterable[dict] | Callable[[], Iterable[dict]], *,
               ignore_overlap: bool = True) -> int:
    """Write one uint8 label PNG per image: 0 background, ``k`` = category id, 255 = ignore (:data:`IGNORE`).

    The file is ``out_dir/<file_name>.png`` (:func:`png_file`: the image's extension is kept, so ``a.jpg`` gives
    ``a.jpg.png`` and no two images share a file; subfolders of ``file_name`` kept, parents created),
    ``height x width`` pixels, written atomically. Category ids are class index + 1, so they must lie in 1..254.

    Parameters
    ----------
    out_dir : str or PathLike
    records : iterable of dict, or a zero-argument callable returning one
        Records as in :mod:`segfromxai.io.coco`; read once.
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
        invalid annotation (see :func:`segfromxai.io.coco.write_coco`).
    """
    out_dir = Path(out_dir)
    written: set[Path] = set()
    for record in iter_records(records):
        image = record_image(record)
        target = out_dir / export_name(image["file_name"], ".png")
        if target in written:
            raise ValueError(f"two images map to the same label file {target}")
        label = np.zeros((image["height"], image["width"]), dtype=np.uint8)
        anns = [checked_annotation(a, image)[0] for a in record_annotations(record)]
        for ann in anns:
            if not 1 <= ann["category_id"] < IGNORE:
                raise ValueError(f"image {image['id']}: category_id {ann['category_id']} does not fit a label PNG "
                                 "(1..254; 0 is background, 255 ignore)")
        if ignore_overlap:
            conflict = np.zeros_like(label, dtype=bool)
            for ann in anns:
                m = masks.decode(ann["segmentation"])
                k = ann["category_id"]
                conflict |= m & (label != 0) & (label != k)
                label[m] = k
            label[conflict] = IGNORE
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
