"""Build the dev benchmark: the 96 photos of ``../shared/realphotos/dev`` plus the 12 of ``work/real_bench``, with
one merged COCO ground truth whose image entries carry a ``subset``.

Build-time only (``make dev-bench``, never in CI)::

    python scripts/build_dev_bench.py --dev ../shared/realphotos/dev --real-bench work/real_bench --out work/dev_bench

writes

* ``<out>/images/``: one symbolic link per photo to its file in the two sets (a copy where a link cannot be made);
  other entries of that folder are removed, so that ``compare --images`` sees exactly these photos;
* ``<out>/annotations.json``: the two COCO files merged. Image and annotation ids are renumbered 1..N in order
  (the dev set's images by id, then the real bench's); categories are matched by name (the dev set's ``object`` and
  COCO names, the real bench's own names; no aliases, so ``sofa`` and ``couch`` stay two) and renumbered in order of
  first appearance; every other key of an image or annotation is kept (``ignore_segmentation``, ``source``,
  ``gt_type``, ...), plus ``subset`` (``grabcut``, ``davis`` or ``coco`` for a dev photo, from its file-name prefix,
  checked against its ``source``; ``real-bench`` for the others) and ``original_id``.

The output depends only on the inputs (no dates, no order from the file system), and two photos with one file name
are an error. Paths default to these places relative to the repository root; a missing real bench is an error that
says to run ``make real-bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEV_SUBSETS = {"grabcut": "grabcut", "davis345": "davis", "davis": "davis", "coco": "coco"}  # prefix -> subset
SOURCE_WORDS = {"grabcut": "grabcut", "davis": "davis", "coco": "coco"}  # subset -> a word its ``source`` holds
REAL_BENCH = "real-bench"


def dev_subset(image: dict[str, Any]) -> str:
    """``grabcut``, ``davis`` or ``coco`` of a dev image, from its file-name prefix (checked against ``source``)."""
    prefix = Path(image["file_name"]).name.split("_", 1)[0].lower()
    if prefix not in DEV_SUBSETS:
        raise ValueError(f"dev image {image['file_name']}: unknown file-name prefix {prefix!r} "
                         f"(expected one of {', '.join(sorted(DEV_SUBSETS))})")
    subset = DEV_SUBSETS[prefix]
    source = str(image.get("source", ""))
    if source and SOURCE_WORDS[subset] not in source.lower():
        raise ValueError(f"dev image {image['file_name']}: its prefix says {subset}, its source {source!r}")
    return subset


def merge(parts: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    """Merge COCO documents into one (see the module docstring). ``parts``: ``(document, subset)`` pairs, where
    ``subset`` is a name or a function of an image entry. Raises ValueError on a file name in two parts."""
    images, annotations, categories = [], [], []
    cat_ids: dict[str, int] = {}
    seen: dict[str, int] = {}
    for k, (doc, subset) in enumerate(parts):
        names = {c["id"]: c["name"] for c in doc.get("categories", [])}
        for c in doc.get("categories", []):
            if c["name"] not in cat_ids:
                cat_ids[c["name"]] = len(cat_ids) + 1
                categories.append({**c, "id": cat_ids[c["name"]]})
        new_ids = {}
        for im in sorted(doc["images"], key=lambda im: im["id"]):
            if im["file_name"] in seen:
                raise ValueError(f"file name clash: {im['file_name']} is in input {seen[im['file_name']] + 1} "
                                 f"and input {k + 1}")
            seen[im["file_name"]] = k
            new_ids[im["id"]] = len(images) + 1
            name = subset(im) if callable(subset) else subset
            images.append({**im, "id": new_ids[im["id"]], "subset": name, "original_id": im["id"]})
        for a in sorted(doc.get("annotations", []), key=lambda a: a["id"]):
            annotations.append({**a, "id": len(annotations) + 1, "image_id": new_ids[a["image_id"]],
                                "category_id": cat_ids[names[a["category_id"]]]})
    return {"images": images, "annotations": annotations, "categories": categories}


def link_images(files: dict[str, Path], folder: Path) -> tuple[int, int]:
    """Make ``folder`` hold exactly ``files`` (name -> source): symbolic links, or copies where a link fails.
    Returns (links, copies)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(folder.iterdir()):
        if old.name not in files:
            old.unlink()
    links = copies = 0
    for name, src in sorted(files.items()):
        dest = folder / name
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        try:
            os.symlink(src.resolve(), dest)
            links += 1
        except OSError:
            shutil.copyfile(src, dest)
            copies += 1
    return links, copies


def _load(folder: Path, what: str, hint: str) -> dict[str, Any]:
    path = folder / "annotations.json"
    if not path.is_file() or not (folder / "images").is_dir():
        raise SystemExit(f"{what} not found: no {path} and {folder / 'images'}; {hint}")
    return json.loads(path.read_text())


def build(dev: Path, real_bench: Path, out: Path) -> dict[str, Any]:
    """Write ``out/images`` and ``out/annotations.json``; returns the merged document."""
    dev_doc = _load(dev, "the dev set", "it is ../shared/realphotos/dev beside the repository (see its README)")
    real_doc = _load(real_bench, "the real bench", "run `make real-bench` first")
    doc = merge([(dev_doc, dev_subset), (real_doc, REAL_BENCH)])
    folders = {im["file_name"]: folder for folder, d in ((dev, dev_doc), (real_bench, real_doc))
               for im in d["images"]}
    files = {name: folder / "images" / name for name, folder in folders.items()}
    missing = sorted(n for n, p in files.items() if not p.is_file())
    if missing:
        raise SystemExit(f"{len(missing)} images named in the annotations are missing: {', '.join(missing[:10])}")
    info = {"description": "segfromxai dev benchmark: ../shared/realphotos/dev and work/real_bench merged "
            "(scripts/build_dev_bench.py); each image's subset is grabcut, davis, coco or real-bench",
            "parts": {"dev": dev_doc.get("info", {}), REAL_BENCH: real_doc.get("info", {})}}
    doc = {"info": info, **doc}
    links, copies = link_images(files, out / "images")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "annotations.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out / "annotations.json")
    subsets = Counter(im["subset"] for im in doc["images"])
    print(f"{len(doc['images'])} images ({', '.join(f'{k} {v}' for k, v in sorted(subsets.items()))}), "
          f"{len(doc['annotations'])} annotations, {len(doc['categories'])} categories -> {out} "
          f"({links} linked, {copies} copied)")
    return doc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dev", type=Path, default=ROOT.parent / "shared" / "realphotos" / "dev")
    p.add_argument("--real-bench", type=Path, default=ROOT / "work" / "real_bench")
    p.add_argument("--out", type=Path, default=ROOT / "work" / "dev_bench")
    args = p.parse_args(argv)
    try:
        build(args.dev, args.real_bench, args.out)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
