"""Per-image artefacts of a run, on request: the explanation maps (``maps/<file>.npz``) and overlay PNGs.

Both are written atomically (temp file + rename), under the image's relative path with a suffix appended
(:func:`segfromxai.io.coco.export_name`: ``maps/sub/a.jpg.npz``, ``overlays/sub/a.jpg.png``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io.coco import export_name
from ..fileio import atomic_write


def overlay(image: np.ndarray, masks: list[np.ndarray], *, alpha: float = 0.45) -> np.ndarray:
    """The image (H, W, 3) uint8 with each mask tinted in its own colour and its border drawn solid."""
    import cv2

    out = image.astype(np.float32).copy()
    palette = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                        [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.float32)
    for k, m in enumerate(masks):
        colour = palette[k % len(palette)]
        out[m] = (1 - alpha) * out[m] + alpha * colour
    out = out.round().clip(0, 255).astype(np.uint8)
    for k, m in enumerate(masks):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in palette[k % len(palette)]), 1)
    return out


def save_artifacts(out: Path, art: dict[str, Any], *, maps: bool, overlays: bool) -> None:
    """Write ``art`` (keys ``rel``, ``maps``, ``fused``, ``image``, ``masks``) as requested."""
    if maps:
        path = out / "maps" / export_name(art["rel"], ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, fused=art["fused"], **{f"map_{k}": v for k, v in art["maps"].items()})
        with atomic_write(path, "wb") as f:
            f.write(buf.getvalue())
    if overlays:
        path = out / "overlays" / export_name(art["rel"], ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(overlay(art["image"], art["masks"])).save(buf, format="PNG")
        with atomic_write(path, "wb") as f:
            f.write(buf.getvalue())
