"""The output formats, one registry: ``EXPORTERS`` maps each ``--format`` name to an :class:`Exporter`.

A run always writes its COCO files (``pseudo_labels.json``, ``pseudo_labels_results.json``); every other format
is an export written after them from the same records, into its own folder of the run folder. The CLI's
``--format`` choices, :func:`segfromxai.run.outdir.finish` (what to write), its name checks before labelling and
``--overwrite`` (which files a run wrote) all read this dict, so adding a format is one module beside this one
(the writer, its file names) and one entry here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..registry import Entry
from .png import export_png, png_file, png_written
from .yolo import export_yolo, yolo_label, yolo_written


def _nothing(rel: str, names: set[str], stems: set[str]) -> bool:
    return False


@dataclass(frozen=True, kw_only=True)
class Exporter(Entry):
    """An output format.

    fn : ``fn(folder, records, *, categories, images) -> int`` writes the export into ``folder`` (created as
        needed) from ``records``, the records of the finished COCO dataset (:mod:`segfromxai.io.coco`: every
        labelled image, with or without masks, by image id; read once); ``categories`` are its COCO categories,
        ``images`` the folder the records' file names are relative to (None where it cannot be read, e.g. a merge
        on another machine). Returns the number of files written.
    folder : the folder of the run folder it writes in; ``""`` for ``coco``, whose files sit at the top.
    target : ``target(file_name) -> str``, the file of one image under ``folder`` that no two images may share,
        checked before any labelling; raises ValueError for a name that cannot be exported. None: nothing to check.
    clash : what the refusal of two images sharing a ``target`` adds after "rename one".
    written : ``written(rel, names, stems) -> bool``, whether ``<folder>/<rel>`` (a POSIX path) is a file the export
        wrote for one of the images ``names`` (``stems``: their names without the extension), so that
        ``--overwrite`` removes it and nothing else.
    """

    folder: str
    target: Callable[[str], str] | None = None
    clash: str = ""
    written: Callable[[str, set[str], set[str]], bool] = _nothing


def _coco(folder: str | os.PathLike, records: Iterable[dict], *, categories: list[dict],
          images: Path | None) -> int:
    """Nothing more: the COCO files are written for every run, before any export."""
    return 0


def _png(folder: str | os.PathLike, records: Iterable[dict], *, categories: list[dict],
         images: Path | None) -> int:
    """:func:`segfromxai.io.png.export_png` (the label maps need neither the categories nor the images)."""
    return export_png(folder, records)


def _yolo(folder: str | os.PathLike, records: Iterable[dict], *, categories: list[dict],
          images: Path | None) -> int:
    """:func:`segfromxai.io.yolo.export_yolo`, the images linked beside their labels when ``images`` is given."""
    return export_yolo(folder, records, categories=categories, images=images)


EXPORTERS: dict[str, Exporter] = {
    "coco": Exporter(_coco, "COCO instances (pseudo_labels.json) and results JSON; always written", folder=""),
    "png": Exporter(_png, "one uint8 label PNG per image in png/ (0 background, k the category id, 255 ignore)",
                    folder="png", target=png_file, written=png_written),
    "yolo": Exporter(_yolo, "YOLO segmentation dataset in yolo/ (polygons, a stable train/val split, data.yaml)",
                     folder="yolo", target=yolo_label, written=yolo_written,
                     clash=" (YOLO pairs labels with images by the name without its extension), or leave out "
                           "--format yolo"),
}
