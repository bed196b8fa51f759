"""Synthetic scenes with exact ground truth: shape classes on cluttered, textured backgrounds.

Each image holds one object (``mode="single"``) or two objects of different classes (``mode="multi"``). A class is
defined by shape only: colours and textures of objects and backgrounds are drawn at random, so a classifier must
look at the outline. Backgrounds mix noise, stripes, checkers and gradients, with non-class distractor fragments
(irregular blobs, thick lines, arcs). Objects cover about 5% to 60% of the image (the largest a shape can be while
it stays inside the frame bounds its upper end: a star reaches about 33%), and may be partly occluded by a fragment
drawn over them. The ground-truth mask of an object is its *visible* part.

Everything is drawn from ``numpy.random.default_rng([seed, index])``, so an image depends only on the seed and its
index, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..fileio import atomic_write

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")
MODES = ("single", "multi")

_MIN_AREA, _MAX_AREA = 0.05, 0.60
_MULTI_MAX_AREA = 0.30
_MIN_VISIBLE = 0.6  # occluders hide at most 40% of an object's area, all together


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its class index, its visible mask (bool, H x W) and the hidden share of its area."""

    label: int
    mask: np.ndarray
    occluded_fraction: float = 0.0


def _regular(n: int, r: float, theta: float, phase: float = 0.0) -> np.ndarray:
    a = theta + phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _rotate(pts: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]])


def _fill(size: int, polys: list[np.ndarray], centre: np.ndarray) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    # 4 fractional bits: sub-pixel vertex positions keep small shapes faithful
    pts = [np.round((p + centre) * 16).astype(np.int32) for p in polys]
    cv2.fillPoly(m, pts, 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def _disc(size: int, centre: np.ndarray, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2 <= r * r


def shape_mask(name: str, size: int, centre: np.ndarray, r: float, theta: float) -> np.ndarray:
    """Rasterise shape ``name`` of bounding radius ``r`` (pixels) centred at ``centre`` (x, y), rotated by ``theta``.

    Every shape lies inside the disc of radius ``r``. Returns a bool mask of shape (size, size).
    """
    if name == "circle":
        return _disc(size, centre, r)
    if name == "square":
        return _fill(size, [_regular(4, r, theta, np.pi / 4)], centre)
    if name == "triangle":
        return _fill(size, [_regular(3, r, theta, -np.pi / 2)], centre)
    if name == "star":
        outer, inner = _regular(5, r, theta, -np.pi / 2), _regular(5, 0.42 * r, theta, -np.pi / 2 + np.pi / 5)
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
        return _fill(size, [pts], centre)
    if name == "cross":
        a, b = 0.7 * r, 0.25 * r  # arm half-length and half-width; corners at radius < r
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                        [-a, -b], [-b, -b]])
        return _fill(size, [_rotate(pts, theta)], centre)
    if name == "ring":
        return _disc(size, centre, r) & ~_disc(size, centre, 0.55 * r)
    if name == "crescent":
        off = 0.45 * r * np.array([math.cos(theta), math.sin(theta)])
        return _disc(size, centre, r) & ~_disc(size, centre + off, 0.85 * r)
    if name == "arrow":
        pts = np.array([[-0.95, -0.18], [0.25, -0.18], [0.25, -0.5], [0.95, 0.0], [0.25, 0.5], [0.25, 0.18],
                        [-0.95, 0.18]]) * r
        return _fill(size, [_rotate(pts, theta)], centre)
    raise ValueError(f"unknown shape {name!r}; valid shapes: {', '.join(CLASSES)}")


def _area_factors(res: int = 512) -> dict[str, float]:
    """Area of each shape per r**2, measured on a fine raster (rotation-invariant up to rasterisation)."""
    r = res / 2 - 1
    c = np.array([res / 2, res / 2])
    return {n: float(shape_mask(n, res, c, r, 0.3).sum()) / r**2 for n in CLASSES}


_AREA_K = _area_factors()


# ----------------------------------------------------------------------------------------------------- textures
def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    low = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random float32 (size, size, 3) texture in [0, 255]: solid, stripes, checker, gradient or smooth noise."""
    c1, c2 = _colour(rng), _colour(rng)
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:
        t = np.zeros((size, size), np.float32)
    elif kind == 1:
        ang, period = rng.uniform(0, np.pi), rng.uniform(4, size / 4)
        t = (np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        p = rng.uniform(4, size / 6)
        t = ((np.floor(xx / p) + np.floor(yy / p)) % 2).astype(np.float32)
    elif kind == 3:
        ang = rng.uniform(0, 2 * np.pi)
        t = (xx * math.cos(ang) + yy * math.sin(ang))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        t = _smooth_noise(rng, size, int(rng.integers(3, 12)))
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    img += rng.normal(0, rng.uniform(0, 18), img.shape)
    return np.clip(img, 0, 255).astype(np.float32)


def _fragment(rng: np.random.Generator, size: int, centre: np.ndarray | None = None,
              area: tuple[float, float] = (0.005, 0.04)) -> np.ndarray:
    """A non-class distractor: an irregular blob, a thick line or an arc."""
    target = rng.uniform(*area) * size * size
    if centre is None:
        centre = rng.uniform(0, size, 2)
    kind = rng.integers(3)
    m = np.zeros((size, size), np.uint8)
    if kind == 0:
        n = int(rng.integers(5, 10))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.4, 1.0, n)
        base = math.sqrt(target / (0.5 * np.pi * 0.6))
        pts = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1) * base + centre
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    elif kind == 1:
        thick = int(rng.integers(2, max(3, size // 25)))
        length = target / thick
        a = rng.uniform(0, np.pi)
        d = 0.5 * length * np.array([math.cos(a), math.sin(a)])
        cv2.line(m, tuple(np.round(centre - d).astype(int)), tuple(np.round(centre + d).astype(int)), 1, thick)
    else:
        thick = int(rng.integers(2, max(3, size // 25)))
        rad = rng.uniform(0.08, 0.25) * size
        start = rng.uniform(0, 360)
        span = float(np.clip(target / (thick * rad) * 180 / np.pi, 30, 200))
        cv2.ellipse(m, tuple(np.round(centre).astype(int)), (int(rad), int(rad)), 0, start, start + span, 1, thick)
    return m.astype(bool)


def _paint(img: np.ndarray, mask: np.ndarray, tex: np.ndarray) -> None:
    img[mask] = tex[mask]


def _contrasting_texture(rng: np.random.Generator, size: int, under: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A texture whose mean colour inside ``mask`` differs from what lies beneath, so the object stays visible."""
    below = under[mask].mean(0)
    tex = texture(rng, size)
    for _ in range(20):
        if np.linalg.norm(tex[mask].mean(0) - below) >= 70:
            break
        tex = texture(rng, size)
    return tex


def _place(rng: np.random.Generator, name: str, size: int, max_area: float) -> np.ndarray:
    k = _AREA_K[name]
    fit = k * (size / 2) ** 2 / size**2  # largest area fraction that keeps the shape in the frame
    lo, hi = _MIN_AREA, min(max_area, 0.97 * fit)
    frac = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    r = math.sqrt(frac * size * size / k)
    centre = rng.uniform(r, size - r, 2)
    return shape_mask(name, size, centre, r, rng.uniform(0, 2 * np.pi))


def make_scene(seed: int, index: int, size: int = 224, mode: str = "single") -> tuple[np.ndarray, list[SceneObject]]:
    """Draw scene ``index`` of the set with ``seed``.

    Returns
    -------
    image : uint8 array (size, size, 3), RGB
    objects : list of SceneObject, one per visible object (one in ``single`` mode, two in ``multi`` mode), each with
        a non-empty visible mask; two objects never share a pixel.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    rng = np.random.default_rng([seed, index])
    img = texture(rng, size)
    for _ in range(int(rng.integers(2, 7))):  # background clutter
        frag = _fragment(rng, size)
        if frag.any():
            _paint(img, frag, texture(rng, size))

    n_obj = 1 if mode == "single" else 2
    labels = rng.choice(len(CLASSES), n_obj, replace=False)
    max_area = _MAX_AREA if n_obj == 1 else _MULTI_MAX_AREA
    visible: list[np.ndarray] = []
    full: list[np.ndarray] = []
    for lab in labels:
        for _ in range(50):  # in multi mode the new object may hide at most 40% of the one before
            m = _place(rng, CLASSES[lab], size, max_area)
            if all((v & ~m).sum() >= _MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
                break
        _paint(img, m, _contrasting_texture(rng, size, img, m))
        visible = [v & ~m for v in visible] + [m]
        full.append(m)

    if rng.uniform() < 0.4:  # an occluding fragment over part of one object
        target = visible[int(rng.integers(n_obj))]
        ys, xs = np.nonzero(target)
        i = int(rng.integers(len(xs)))
        for _ in range(10):
            occ = _fragment(rng, size, centre=np.array([xs[i], ys[i]], float), area=(0.01, 0.05))
            if all((v & ~occ).sum() >= _MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
                _paint(img, occ, _contrasting_texture(rng, size, img, occ))
                visible = [v & ~occ for v in visible]
                break

    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out, [SceneObject(int(lab), v, 1.0 - v.sum() / f.sum()) for lab, v, f in zip(labels, visible, full)]


def write_synth(out: str | Path, n: int, seed: int = 0, *, size: int = 224, mode: str = "single",
                start: int = 0) -> Path:
    """Write ``n`` scenes to ``out``: ``images/*.png``, ``annotations.json`` (COCO, RLE masks) and ``labels.csv``.

    ``labels.csv`` has one ``file_name,label`` row per object (two rows per image in ``multi`` mode). Image ids are
    ``start + i + 1``; ``start`` lets two calls with the same seed write disjoint splits.
    """
    from pycocotools import mask as mask_utils

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, rows = [], [], []
    for i in range(start, start + n):
        img, objects = make_scene(seed, i, size, mode)
        name = f"{i:06d}.png"
        if not cv2.imwrite(str(out / "images" / name), img[..., ::-1]):
            raise OSError(f"could not write {out / 'images' / name}")
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for obj in objects:
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": obj.label + 1,
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })
            rows.append((name, CLASSES[obj.label]))
    coco = {
        "info": {"description": "segfromxai synthetic shapes", "seed": seed, "mode": mode, "size": size,
                 "start": start, "n": n},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES)],
    }
    _write_text(out / "annotations.json", json.dumps(coco, separators=(",", ":")))
    with atomic_write(out / "labels.csv") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file_name", "label"])
        w.writerows(rows)
    return out


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)
