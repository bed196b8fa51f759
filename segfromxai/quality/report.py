"""A static, offline HTML quality report: summary tables, best/worst contact sheets, settings, every image.

``write_report`` fills a folder with ``report.html`` and ``sheets/*.png``. Every link is relative, nothing is
fetched from the network and no script runs, so the folder can be moved, zipped or opened from disk. Every file
is written atomically and depends only on the inputs (no timestamps, no paths), so writing the same report twice,
in the same folder or another, gives byte-identical files.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
from PIL import Image

from ..fileio import atomic_write
from ..ops.resize import resize_bilinear

_GAP = 4  # px between tiles
_LABEL_H = 16  # px of the label band above the tiles
_PAD = (255, 255, 255)  # letterbox padding, the page's background
_BLANK = (200, 200, 200)  # "no map" / "no ground truth" tiles
_LABELS = ("image", "explanation", "pseudo mask", "ground truth", "student mask")
_SOLID = {2: (230, 25, 75), 3: (60, 180, 75), 4: (0, 130, 200)}  # pseudo red, GT green, student blue

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;background:#fff}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:2px 8px}
th{background:#f0f0f0;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:0 0 1.5em}img{max-width:100%;height:auto}figcaption{font-size:.9em}
pre{background:#f6f6f6;padding:1em;overflow:auto}"""


@dataclass(frozen=True, eq=False)
class Sheet:
    """One image of the report, drawn as a contact sheet (image | explanation | pseudo mask | ground truth).

    Attributes
    ----------
    file_name : str
        The image's relative POSIX path, as in the COCO file.
    image : ndarray, uint8 (H, W, 3)
        RGB.
    pred : ndarray, bool (H, W)
        Union of the pseudo-label masks.
    gt : ndarray, bool (H, W), or None
        Union of the ground truth masks; None when there is none.
    heatmap : ndarray, float (h, w) in [0, 1], or None
        Fused explanation on any grid; resized bilinearly to the image.
    caption : str
        Shown under the sheet, after the file name, e.g. ``"IoU 0.734 · circle"`` (do not repeat the name).
    student : ndarray, bool (H, W), or None
        Union of a student segmenter's masks: drawn as a fifth tile when given.
    """

    file_name: str
    image: np.ndarray
    pred: np.ndarray
    gt: np.ndarray | None
    heatmap: np.ndarray | None
    caption: str
    student: np.ndarray | None = None


def _text(canvas: np.ndarray, text: str, y: int) -> None:
    """Draw black ASCII ``text`` centred on row ``y`` of the contiguous ``canvas`` (in place), shrunk to fit."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (w, h), _ = cv2.getTextSize(text, font, scale, 1)
    if w > canvas.shape[1] - 4:
        scale = max(0.1, scale * (canvas.shape[1] - 4) / w)
        (w, h), _ = cv2.getTextSize(text, font, scale, 1)
    cv2.putText(canvas, text, ((canvas.shape[1] - w) // 2, y + h // 2), font, scale, (0, 0, 0), 1, cv2.LINE_AA)


def _letterbox(content: np.ndarray, tile: int) -> np.ndarray:
    """``content`` (h, w, 3), h and w <= tile, centred on a (tile, tile, 3) padded square."""
    out = np.full((tile, tile, 3), _PAD, np.uint8)
    h, w = content.shape[:2]
    y, x = (tile - h) // 2, (tile - w) // 2
    out[y:y + h, x:x + w] = content
    return out


def solid(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` with ``mask`` filled opaque in ``colour`` and its outer border drawn 1 px dark grey: unlike a
    tint, it stays visible on any image colour."""
    out = image.copy()
    out[mask] = colour
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (40, 40, 40), 1)
    return out


def contact_sheet(sheet: Sheet, *, tile: int = 160) -> np.ndarray:
    """Draw ``sheet`` as a strip of tiles: image | heatmap | pseudo mask | ground truth [| student mask].

    The heatmap is JET-coloured and blended 50/50 with the image ("no map" tile when None); the pseudo mask (red),
    the ground truth (green) and the student's mask (blue, a fifth tile only when ``sheet.student`` is given) are
    drawn with :func:`solid`, opaque, so that they show on any image ("no ground truth" tile when ``sheet.gt`` is
    None). Each tile holds the image scaled to fit ``tile`` x ``tile`` with its
    aspect ratio kept, centred on white (letterboxed); masks are scaled with nearest neighbour, the heatmap
    bilinearly. A label band of 16 px sits above the tiles, 4 px between them.

    Parameters
    ----------
    sheet : Sheet
    tile : int
        Side of a square tile in pixels (>= 8).

    Returns
    -------
    ndarray, uint8 (16 + tile, k * tile + 4 * (k - 1), 3)
        RGB; k = 4 tiles, 5 with a student mask.
    """
    image = np.asarray(sheet.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if tile < 8:
        raise ValueError(f"tile must be >= 8, got {tile}")
    H, W = image.shape[:2]
    for name in ("pred", "gt", "student"):
        m = getattr(sheet, name)
        if m is not None and np.shape(m) != (H, W):
            raise ValueError(f"{name} must have the image's shape {(H, W)}, got {np.shape(m)}")
    s = min(tile / H, tile / W)
    h, w = max(1, round(H * s)), max(1, round(W * s))
    img = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)

    def mask(m: np.ndarray) -> np.ndarray:
        return cv2.resize(np.asarray(m, np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)

    tiles: list[np.ndarray | None] = [img, None, solid(img, mask(sheet.pred), _SOLID[2]), None]
    if sheet.heatmap is not None:
        heat = np.clip(resize_bilinear(np.nan_to_num(np.asarray(sheet.heatmap, np.float64)), (h, w)), 0.0, 1.0)
        colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        tiles[1] = ((img.astype(np.uint16) + colour + 1) // 2).astype(np.uint8)
    if sheet.gt is not None:
        tiles[3] = solid(img, mask(sheet.gt), _SOLID[3])
    if sheet.student is not None:
        tiles.append(solid(img, mask(sheet.student), _SOLID[4]))
    strip = np.full((_LABEL_H + tile, len(tiles) * tile + (len(tiles) - 1) * _GAP, 3), 255, np.uint8)
    for k, content in enumerate(tiles):
        label = np.full((_LABEL_H, tile, 3), 255, np.uint8)
        _text(label, _LABELS[k], _LABEL_H // 2)
        if content is None:
            cell = np.full((tile, tile, 3), _BLANK, np.uint8)
            _text(cell, "no map" if k == 1 else "no ground truth", tile // 2)
        else:
            cell = _letterbox(content, tile)
        x = k * (tile + _GAP)
        strip[:_LABEL_H, x:x + tile] = label
        strip[_LABEL_H:, x:x + tile] = cell
    return strip


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> tuple[str, bool]:
    """A table cell's text and whether it is a number: floats to 3 decimals, NaN and None as "n/a"."""
    if value is None:
        return "n/a", False
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, (float, np.floating)):
        return ("n/a" if math.isnan(value) else f"{float(value):.3f}"), True
    return str(value), isinstance(value, (int, np.integer))


def _table(rows: list[dict]) -> str:
    """An HTML table of flat dicts, headed by the first row's keys in order; a missing key gives an empty cell."""
    if not rows:
        return "<p>No rows.</p>\n"
    keys = list(rows[0])
    out = ["<table>\n<thead><tr>", *(f"<th>{_e(k)}</th>" for k in keys), "</tr></thead>\n<tbody>\n"]
    for row in rows:
        out.append("<tr>")
        for k in keys:
            text, num = _cell(row[k]) if k in row else ("", False)
            out.append(f'<td class="num">{_e(text)}</td>' if num else f"<td>{_e(text)}</td>")
        out.append("</tr>\n")
    out.append("</tbody>\n</table>\n")
    return "".join(out)


def _sanitise(file_name: str, *, max_len: int = 100) -> str:
    """``file_name`` without its suffix, every character outside [A-Za-z0-9._-] replaced by ``_``, truncated."""
    stem = posixpath.splitext(file_name)[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:max_len]


def _write_png(path: Path, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def _figures(out: Path, figures: Iterable[tuple[str, str, str]]) -> list[str]:
    """Write each SVG to ``out/figures/`` and return the "Figures" section's HTML (empty without figures)."""
    body = []
    for name, caption, svg in figures:
        file = f"{_sanitise(name)}.svg"
        (out / "figures").mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "figures" / file, "w") as f:
            f.write(svg)
        body.append(f'<figure><img src="figures/{_e(file)}" alt="{_e(caption)}">\n'
                    f"<figcaption>{_e(caption)}</figcaption></figure>\n")
    return ["<h2>Figures</h2>\n", *body] if body else []


def write_report(out: str | os.PathLike, *, title: str, summary: list[dict], per_category: list[dict] | None,
                 per_image: list[dict], best: list[Sheet], worst: list[Sheet], settings: dict,
                 notes: Iterable[str] = (), figures: Iterable[tuple[str, str, str]] = ()) -> Path:
    """Write ``out/report.html``, its contact sheets ``out/sheets/<index>_<name>.png`` and its figures
    ``out/figures/<name>.svg``.

    Sections, in order: title, notes, Summary, Figures (when given), Per category (left out when None), Best,
    Worst, Settings (``settings``
    as indented JSON), Per image (every row of ``per_image``, in a ``<details>`` element). Tables are headed by the
    first row's keys; floats show 3 decimals, NaN and None show "n/a". Sheets are numbered in order through Best
    then Worst, so names never collide; files in ``sheets/`` from an earlier report are left in place.

    Parameters
    ----------
    out : str or PathLike
        Output folder; created if missing.
    title : str
    summary, per_category, per_image : list of dict
        Flat rows; ``per_image`` rows should hold ``file_name``.
    best, worst : list of Sheet
    settings : dict
        JSON-serialisable (other values are shown with ``str``), e.g. the resolved recipe, versions, command.
    notes : iterable of str
        Shown as a list under the title.
    figures : iterable of (name, caption, svg text)
        Charts (e.g. from :mod:`segfromxai.quality.plots`); ``name`` is sanitised like a sheet's.

    Returns
    -------
    Path
        ``out/report.html``.
    """
    out = Path(out)
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    body = [f"<h1>{_e(title)}</h1>\n"]
    notes = list(notes)
    if notes:
        body.append("<ul>\n" + "".join(f"<li>{_e(n)}</li>\n" for n in notes) + "</ul>\n")
    body.append("<h2>Summary</h2>\n" + _table(summary))
    body += _figures(out, figures)
    if per_category is not None:
        body.append("<h2>Per category</h2>\n" + _table(per_category))
    index = 0
    for heading, sheets in (("Best", best), ("Worst", worst)):
        body.append(f"<h2>{heading}</h2>\n")
        for sheet in sheets:
            name = f"{index:03d}_{_sanitise(sheet.file_name)}.png"
            index += 1
            _write_png(out / "sheets" / name, contact_sheet(sheet))
            body.append(f'<figure><img src="sheets/{_e(name)}" alt="{_e(sheet.file_name)}">\n'
                        f"<figcaption>{_e(sheet.file_name)}<br>{_e(sheet.caption)}</figcaption></figure>\n")
        if not sheets:
            body.append("<p>None.</p>\n")
    settings_json = json.dumps(settings, indent=2, ensure_ascii=False, default=str)
    body.append(f"<h2>Settings</h2>\n<pre>{_e(settings_json)}</pre>\n")
    body.append(f"<h2>Per image</h2>\n<details>\n<summary>All {len(per_image)} evaluated images</summary>\n"
                + _table(per_image) + "</details>\n")
    page = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_e(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            + "".join(body) + "</body>\n</html>\n")
    path = out / "report.html"
    with atomic_write(path, "w") as f:
        f.write(page)
    return path
