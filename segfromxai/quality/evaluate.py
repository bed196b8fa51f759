"""Evaluation: predicted masks against reference masks (ground truth, or a student segmenter's masks).

A *mask source* is a COCO instances file, or a folder of PNG label maps (uint8: 0 background, k = category id,
255 = ignore, as ``segfromxai run --format png`` writes them). Images are matched by file name: the same relative
path; else one side's path with its last suffix removed equal to the other's whole path (``run --format png``
writes ``a.jpg.png`` for ``a.jpg``); else the relative paths without their suffixes (one or, for such an export
name, two); else the bare file name when that is unique in the reference; a predicted image with no match is an
error that lists the unmatched names. Reference images with no prediction entry are listed in the result
(``missing_in_pred``) and left out of the numbers: ``run`` writes every image it labelled, with or without a mask,
so these are the images it failed on or skipped.

Class-agnostic numbers compare the union of all masks of an image; per-category numbers compare, per image, the
union of the masks of one category (categories matched by name when both sides name them, else by id). Each
metric is given as the mean over images (``per_image_mean``, NaN images skipped, ``n`` counted) and pooled over
all pixels of the dataset (``pooled``); see :mod:`segfromxai.quality.metrics`. Pixels a PNG reference marks 255 are
ignored, and so are the pixels of a COCO reference annotation's ``ignore_segmentation`` (a compressed RLE of pixels
whose label is unknown, e.g. GrabCut's unlabelled band): they count for neither the object nor the background (no
TP, FP, FN or TN), in the class-agnostic and the per-category numbers alike; so are the pixels of a reference
annotation marked ``iscrowd = 1`` (a crowd region), as COCOeval ignores crowd regions in AP. ``ap`` is COCOeval's segm
AP@[.5:.95] with categories (matched by name), ``ap_agnostic`` the same with every category of both sides mapped
to one; both need COCO files on both sides (instances and scores) and are NaN otherwise (COCOeval does not read
``ignore_segmentation``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..io.coco import AGNOSTIC_CLASS, export_name, ignore_mask
from ..fileio import atomic_write
from ..io.png import IGNORE
from .agreement import AGREEMENT, FLAG, per_image_rows
from .metrics import METRICS, Counts, confusion, summarise


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


@dataclass
class MaskSource:
    """Masks per image from a COCO file or a PNG label folder, decoded on demand (never all in memory)."""

    path: Path
    kind: str  # "coco" or "png"
    files: dict[str, Any]  # file_name -> COCO image id, or the PNG's path
    names: dict[int, str] = field(default_factory=dict)  # category id -> name (COCO only)
    coco: Any = None

    def masks(self, file_name: str) -> tuple[dict[int, np.ndarray], np.ndarray | None, tuple[int, int]]:
        """({category id: bool union mask}, ignore mask or None, (H, W)) of one image."""
        if self.kind == "png":
            from PIL import Image

            with Image.open(self.files[file_name]) as im:
                label = np.asarray(im)
            if label.ndim != 2:
                raise ValueError(f"{self.files[file_name]}: a PNG label map must be single-channel, got {label.shape}")
            ignore = label == IGNORE
            ids = [int(k) for k in np.unique(label) if 0 < k < IGNORE]
            return {k: label == k for k in ids}, (ignore if ignore.any() else None), label.shape
        img = self.coco.imgs[self.files[file_name]]
        size = (int(img["height"]), int(img["width"]))
        out: dict[int, np.ndarray] = {}
        ignore = np.zeros(size, bool)
        for ann in self.coco.imgToAnns.get(img["id"], []):
            m = self.coco.annToMask(ann).astype(bool)
            extra = ignore_mask(ann)
            for x in (m, extra):
                if x is not None and x.shape != size:
                    raise ValueError(f"{self.path}: an annotation of {file_name} is {x.shape}, its image {size}")
            if ann.get("iscrowd"):  # a crowd region is ignored, as COCOeval ignores it in AP
                ignore |= m
            else:
                out[ann["category_id"]] = out.get(ann["category_id"], np.zeros(size, bool)) | m
            if extra is not None:
                ignore |= extra
        return out, (ignore if ignore.any() else None), size

    def score(self, file_name: str) -> float:
        """The highest ``score`` of an image's annotations (the pseudo-labels' quality score); NaN for a PNG
        source or an image without a scored annotation."""
        if self.kind == "png":
            return math.nan
        anns = self.coco.imgToAnns.get(self.files[file_name], [])
        return max((float(a["score"]) for a in anns if "score" in a), default=math.nan)

    def image_entry(self, file_name: str) -> dict[str, Any]:
        """The COCO ``images`` entry of a file (an empty dict for a PNG source)."""
        return dict(self.coco.imgs[self.files[file_name]]) if self.kind == "coco" else {}


def load_source(path: str | Path) -> MaskSource:
    """A COCO instances file (``.json``) or a folder of PNG label maps (searched recursively)."""
    path = Path(path)
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*.png"))}
        if not files:
            raise ValueError(f"{path}: no PNG label maps found")
        return MaskSource(path, "png", files)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such COCO file or PNG folder")
    from pycocotools.coco import COCO

    try:
        coco = _quiet(COCO, str(path))
    except AssertionError as e:  # pycocotools asserts that the file holds a dict
        sibling = path.with_name("pseudo_labels.json")
        hint = f" (use {sibling})" if sibling.is_file() and sibling != path else ""
        raise ValueError(f"{path}: a JSON list (e.g. a COCO results file), not a COCO instances file with images "
                         f"and annotations{hint}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({e})") from e
    files = {img["file_name"]: img["id"] for img in coco.dataset.get("images", [])}
    names = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    return MaskSource(path, "coco", files, names, coco)


def _key(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(""))


def match_names(names: list[str] | Any, ref: MaskSource) -> tuple[list[tuple[str, str]], list[str]]:
    """Pairs (predicted file name, reference file) and the reference files no name matches (see the module
    docstring for the rule). Raises ValueError listing the names with no reference."""
    by_key: dict[str, list[str]] = {}
    by_base: dict[str, list[str]] = {}
    for f in ref.files:
        by_key.setdefault(_key(f), []).append(f)
        by_base.setdefault(PurePosixPath(_key(f)).name, []).append(f)
    pairs, unmatched = [], []
    for f in sorted(names):
        bare = _key(_key(f))  # an export name without both suffixes: png/a.jpg.png -> a
        tries = ([f], [_key(f)], by_key.get(f, []), by_key.get(_key(f), []), by_key.get(bare, []),
                 by_base.get(PurePosixPath(_key(f)).name, []), by_base.get(PurePosixPath(bare).name, []))
        hit = next((c[0] for c in tries if len(c) == 1 and c[0] in ref.files), None)
        (pairs.append((f, hit)) if hit is not None else unmatched.append(f))
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        raise ValueError(f"{len(unmatched)} predicted images have no match in {ref.path}: {shown}")
    used = {r for _, r in pairs}
    return pairs, sorted(f for f in ref.files if f not in used)


def match(pred: MaskSource, ref: MaskSource) -> tuple[list[tuple[str, str]], list[str]]:
    """:func:`match_names` of the predicted source's files."""
    return match_names(pred.files, ref)


def _namer(source: MaskSource, other: MaskSource):
    names = source.names or other.names
    return lambda k: names.get(k, str(k))


def union(masks: dict[int, np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """The union of an image's masks (all categories), bool (H, W)."""
    out = np.zeros(size, bool)
    for m in masks.values():
        out |= m
    return out


def one_category(coco: Any) -> Any:
    """A copy of a COCO ground truth with every annotation in one category (id 1), for class-agnostic AP."""
    from pycocotools.coco import COCO

    agnostic = COCO()
    agnostic.dataset = {**coco.dataset, "categories": [{"id": 1, "name": AGNOSTIC_CLASS}],
                        "annotations": [{**a, "category_id": 1} for a in coco.dataset.get("annotations", [])]}
    _quiet(agnostic.createIndex)
    return agnostic


def _coco_ap(gt: Any, results: list[dict], img_ids: list[int]) -> float:
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(gt, _quiet(gt.loadRes, [dict(r) for r in results]), "segm")  # loadRes adds keys to each dict
    ev.params.imgIds = img_ids
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return float(ev.stats[0]) if ev.stats[0] >= 0 else math.nan


def average_precision(pred: MaskSource, ref: MaskSource, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """COCOeval segm AP@[.5:.95] with categories (``ap``; predicted categories matched to the reference's by name)
    and class-agnostic (``ap_agnostic``: every category of both sides mapped to one, so it does not depend on the
    names agreeing); NaN unless both sources are COCO."""
    nan = {"ap": math.nan, "ap_agnostic": math.nan}
    if pred.kind != "coco" or ref.kind != "coco" or not ref.coco.dataset.get("annotations"):
        return nan
    by_name = {n: k for k, n in ref.names.items()}
    results = []
    for p, r in pairs:
        for ann in pred.coco.imgToAnns.get(pred.files[p], []):
            cat = by_name.get(pred.names.get(ann["category_id"]), -1)
            results.append({"image_id": ref.files[r], "category_id": cat, "segmentation": ann["segmentation"],
                            "score": float(ann.get("score", 1.0))})
    if not results:
        return {"ap": 0.0, "ap_agnostic": 0.0}
    img_ids = sorted(ref.files[r] for _, r in pairs)
    return {"ap": _coco_ap(ref.coco, results, img_ids),
            "ap_agnostic": _coco_ap(one_category(ref.coco), [{**d, "category_id": 1} for d in results], img_ids)}


def _agnostic(masks: dict[int, np.ndarray], size: tuple[int, int]) -> dict[int, np.ndarray]:
    """All of an image's masks as one category (id 0, named :data:`AGNOSTIC_CLASS`); no entry when there are none."""
    return {0: union(masks, size)} if masks else {}


def binary_png_warning(pred: MaskSource, ref: MaskSource, pred_ids: set[int], ref_ids: set[int]) -> str | None:
    """A warning when one side is a PNG folder holding only 0/1 and the other has categories other than 1: a
    class-agnostic mask read as category 1 makes the per-category numbers blame every other class."""
    for png, ids, other, other_ids in ((pred, pred_ids, ref, ref_ids), (ref, ref_ids, pred, pred_ids)):
        if png.kind == "png" and ids <= {1} and other_ids - {1}:
            name = _namer(other, png)
            return (f"{png.path} holds only 0/1 (read as category 1, {name(1)!r}) while {other.path} has "
                    f"{len(other_ids)} categories ({', '.join(sorted(map(name, other_ids)))}): if it is a "
                    "class-agnostic mask, evaluate with --class-agnostic; per-category numbers are wrong otherwise")
    return None


def evaluate(pred: str | Path | MaskSource, ref: str | Path | MaskSource, *, class_agnostic: bool = False
             ) -> dict[str, Any]:
    """Every metric of ``pred`` against ``ref`` (see the module docstring).

    Returns a JSON-ready dict: ``{metric: {"per_image_mean", "pooled", "n"}}`` for each of ``METRICS``, ``ap``,
    ``ap_agnostic``, ``n_images``, ``missing_in_pred``, ``per_category`` (``{name: {metric: {...}}}``),
    ``per_image`` (rows with ``file_name``, the reference's categories, each metric and the four counts) and
    ``warnings`` (see :func:`binary_png_warning`).

    ``class_agnostic``: every mask of an image is one category, :data:`AGNOSTIC_CLASS`, on both sides (for masks that
    carry no class, e.g. a 0/1 PNG student): ``per_category`` has that one entry and ``ap`` is ``ap_agnostic``.
    The class-agnostic metrics (``iou`` ...) are the same in both modes.
    """
    pred = pred if isinstance(pred, MaskSource) else load_source(pred)
    ref = ref if isinstance(ref, MaskSource) else load_source(ref)
    pairs, missing = match(pred, ref)
    pred_name, ref_name = _namer(pred, ref), _namer(ref, pred)
    if class_agnostic:
        pred_name = ref_name = lambda k: AGNOSTIC_CLASS  # noqa: E731
    agnostic: list[Counts] = []
    per_cat: dict[str, list[Counts]] = {}
    rows = []
    seen: tuple[set[int], set[int]] = (set(), set())
    for p, r in pairs:
        pm, _, psize = pred.masks(p)
        rm, ignore, rsize = ref.masks(r)
        if psize != rsize:
            raise ValueError(f"{p} is {psize[1]}x{psize[0]} in {pred.path} and {rsize[1]}x{rsize[0]} in {ref.path}: "
                             "the images changed since one of them was made (e.g. replaced after the run)")
        seen[0].update(pm)
        seen[1].update(rm)
        if class_agnostic:
            pm, rm = _agnostic(pm, psize), _agnostic(rm, rsize)
        counts = confusion(union(pm, psize), union(rm, rsize), ignore)
        agnostic.append(counts)
        pn = {pred_name(k): m for k, m in pm.items()}
        rn = {ref_name(k): m for k, m in rm.items()}
        for name in sorted(set(pn) | set(rn)):
            empty = np.zeros(rsize, bool)
            per_cat.setdefault(name, []).append(confusion(pn.get(name, empty), rn.get(name, empty), ignore))
        rows.append({"file_name": p, "reference": r, "categories": " ".join(sorted(rn)),
                     "predicted": " ".join(sorted(pn)), "score": pred.score(p),
                     **{k: m.from_counts(*counts) for k, m in METRICS.items()},
                     **dict(zip(("tp", "fp", "fn", "tn"), counts))})
    result: dict[str, Any] = summarise(agnostic)
    result.update(average_precision(pred, ref, pairs))
    if class_agnostic:
        result["ap"] = result["ap_agnostic"]
    warning = None if class_agnostic else binary_png_warning(pred, ref, *seen)
    if warning:
        warnings.warn(warning, stacklevel=2)
    result.update({"class_agnostic": class_agnostic, "warnings": [warning] if warning else []})
    result.update({"n_images": len(pairs), "missing_in_pred": missing,
                   "per_category": {name: summarise(c) for name, c in sorted(per_cat.items())},
                   "per_image": rows, "pred": str(pred.path), "reference": str(ref.path)})
    return result


def worst(result: dict[str, Any], n: int = 20, key: str = "iou") -> list[dict]:
    """The ``n`` images with the lowest ``key`` (images where it is NaN come last)."""
    return sorted(result["per_image"], key=lambda r: (math.isnan(r[key]), r[key], r["file_name"]))[:n]


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a table column: each metric per image and pooled, then AP."""
    row = {}
    for name in METRICS:
        row[f"{name} (per image)"] = result[name]["per_image_mean"]
        row[f"{name} (pooled)"] = result[name]["pooled"]
    row["AP segm"], row["AP class-agnostic"] = result["ap"], result["ap_agnostic"]
    return row


def table(columns: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per comparison; NaN shown as n/a."""
    names = list(next(iter(columns.values())))
    width = max(len(n) for n in names)
    head = f"{'':<{width}}  " + "  ".join(f"{c:>18}" for c in columns)
    lines = [head, "-" * len(head)]
    for n in names:
        cells = (columns[c][n] for c in columns)
        lines.append(f"{n:<{width}}  " + "  ".join(f"{'n/a' if math.isnan(v) else f'{v:.3f}':>18}" for v in cells))
    return "\n".join(lines)


def json_safe(v: Any) -> Any:
    """NaN as null (JSON has no NaN), recursively."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def write_evaluation(out: str | Path, results: dict[str, dict[str, Any]], *, worst_n: int = 20) -> None:
    """Write ``metrics.json`` (one entry per comparison; the first is also at the top level) and ``per_image.csv``
    (one row per comparison and image, the comparison named in the first column) to ``out``, atomically. NaN is
    written as null in JSON and as ``nan`` in the CSV."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slim = {name: {k: v for k, v in r.items() if k != "per_image"} | {"worst": worst(r, worst_n)}
            for name, r in results.items()}
    doc = {**slim[next(iter(slim))], "comparisons": slim} if len(slim) > 1 else slim[next(iter(slim))]
    with atomic_write(out / "metrics.json") as f:
        json.dump(json_safe(doc), f, indent=2, allow_nan=False)
    with atomic_write(out / "per_image.csv") as f:
        rows = per_image_rows(results)
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def comparisons(pred: str | Path, *, gt: str | Path | None = None, student: str | Path | None = None,
                class_agnostic: bool = False) -> dict[str, dict[str, Any]]:
    """The seed paper's table: pseudo vs ground truth, student vs ground truth, pseudo vs student agreement.

    Each comparison is present when its two sources are given (at least ``gt`` or ``student`` must be); the
    first one is the main result. Keys: ``"pseudo vs GT"``, ``"student vs GT"``, ``"pseudo vs student"``.
    ``class_agnostic`` is passed to every :func:`evaluate`.
    """
    if gt is None and student is None:
        raise ValueError("give a ground truth (--gt), a student's masks (--student), or both")
    p = load_source(pred)
    g = load_source(gt) if gt is not None else None
    s = load_source(student) if student is not None else None
    out = {}
    if g is not None:
        out["pseudo vs GT"] = evaluate(p, g, class_agnostic=class_agnostic)
        if s is not None:
            out["student vs GT"] = evaluate(s, g, class_agnostic=class_agnostic)
    if s is not None:
        out["pseudo vs student"] = evaluate(p, s, class_agnostic=class_agnostic)
    return out


def _by_pseudo(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """Per-image rows of every comparison keyed by the pseudo-label file name: ``{file: {comparison: row}}``.
    Rows of "student vs GT" are mapped through "pseudo vs student" when it is there (else: their own name)."""
    agreement = results.get("pseudo vs student", {}).get("per_image", [])
    to_pseudo = {row["reference"]: row["file_name"] for row in agreement}
    out: dict[str, dict[str, dict]] = {}
    for name, r in results.items():
        for row in r["per_image"]:
            key = to_pseudo.get(row["file_name"]) if name == "student vs GT" and agreement else row["file_name"]
            if key is not None:
                out.setdefault(key, {})[name] = row
    return out


def _iou_text(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def _sheet(rows: dict[str, dict], sources: dict[str, MaskSource | None], images: Path | None, maps: Path | None):
    """The contact sheet of one pseudo-labelled image: its masks, the ground truth and the student's masks when
    given, and a caption with the IoU of every comparison (the file name is shown by the report, not here)."""
    from ..io.images import ImageLoadError, load_image
    from .report import Sheet

    first = next(iter(rows.values()))
    name = first["file_name"]
    pm, _, size = sources["pseudo"].masks(name)
    other = {}
    for key, comparison in (("gt", "pseudo vs GT"), ("student", "pseudo vs student")):
        if sources[key] is not None and comparison in rows:
            other[key] = union(sources[key].masks(rows[comparison]["reference"])[0], size)
    image = np.full((*size, 3), 128, np.uint8)
    if images is not None:
        with contextlib.suppress(ImageLoadError, FileNotFoundError):
            image = load_image(images / name)
    heat = None
    npz = maps / export_name(name, ".npz") if maps is not None else None
    if npz is not None and npz.exists():
        with np.load(npz) as z:
            heat = z["fused"]
    caption = " · ".join(f"{c} IoU {_iou_text(r['iou'])}" for c, r in rows.items())
    caption += f" · predicted: {first['predicted'] or '-'}"
    return Sheet(name, image, union(pm, size), other.get("gt"), heat, caption, other.get("student"))


def _sources(results: dict[str, dict[str, Any]]) -> dict[str, MaskSource | None]:
    """The pseudo-labels, the ground truth and the student's masks the comparisons read (None when absent)."""
    first = next(iter(results.values()))
    gt = results.get("pseudo vs GT", {}).get("reference")
    student = results.get("pseudo vs student", {}).get("reference")
    return {"pseudo": load_source(first["pred"]), "gt": load_source(gt) if gt else None,
            "student": load_source(student) if student else None}


def write_evaluation_report(out: str | Path, results: dict[str, dict[str, Any]], *, settings: dict[str, Any],
                            images: str | Path | None = None, maps: str | Path | None = None, n_sheets: int = 6,
                            title: str = "segfromxai quality report") -> Path:
    """``out/report.html`` for these comparisons: the summary table, a histogram of per-image IoU (one colour per
    comparison), the per-category table, every evaluated image of every comparison (lowest
    :data:`segfromxai.quality.agreement.FLAG` first when the student is compared, else the lowest pseudo-label quality
    score first), and sheets of the ``n_sheets`` best and worst images by the first comparison's IoU. A sheet shows
    the image, the fused heatmap, the pseudo mask, the ground truth and the student's mask (when given); its caption
    gives each comparison's IoU.

    ``images``: the image folder (for the sheets; grey tiles without it); ``maps``: a run's ``maps/`` folder
    (``--maps``) for the fused heatmaps.
    """
    from .plots import histogram_svg
    from .report import write_report

    first = next(iter(results.values()))
    sources, by_pseudo = _sources(results), _by_pseudo(results)
    images = Path(images) if images is not None else None
    maps = Path(maps) if maps is not None else None
    columns = {name: headline(r) for name, r in results.items()}
    summary = [{"metric": m, **{name: columns[name][m] for name in columns}} for m in next(iter(columns.values()))]
    per_category = [{"comparison": name, "category": c, "images": v["iou"]["n"],
                     **{f"{m} (pooled)": v[m]["pooled"] for m in METRICS}}
                    for name, r in results.items() for c, v in r["per_category"].items()]
    ranked = [r for r in worst(first, len(first["per_image"])) if not math.isnan(r["iou"])]
    best = [_sheet(by_pseudo[r["file_name"]], sources, images, maps) for r in ranked[::-1][:n_sheets]]
    bad = [_sheet(by_pseudo[r["file_name"]], sources, images, maps) for r in ranked[:n_sheets]]
    keep = ("comparison", "file_name", "categories", "predicted", "score", *METRICS, AGREEMENT, FLAG)
    rows = [{k: row[k] for k in keep if k in row} for row in per_image_rows(results)]
    # the pseudo-labels to look at first: the lowest of quality score and agreement with the student (FLAG), else
    # the lowest quality score
    order = FLAG if FLAG in (rows[0] if rows else {}) else "score"
    rows.sort(key=lambda row: (math.isnan(row.get(order, math.nan)), row.get(order, math.nan), row["file_name"]))
    notes = [w for r in results.values() for w in r.get("warnings", [])]
    if first["missing_in_pred"]:
        notes.append(f"{len(first['missing_in_pred'])} reference images have no prediction (failed or skipped): "
                     + ", ".join(first["missing_in_pred"][:50]))
    hist = histogram_svg({name: [row["iou"] for row in r["per_image"]] for name, r in results.items()})
    figures = [("iou_histogram", "Per-image IoU, one colour per comparison (images where IoU is undefined left out)",
                hist)]
    return write_report(out, title=title, summary=summary, per_category=per_category, per_image=rows, best=best,
                        worst=bad, settings=settings, notes=notes, figures=figures)
