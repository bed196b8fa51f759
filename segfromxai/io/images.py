"""Find and load images: EXIF orientation, RGB conversion, size limits, clear errors.

This is the only module that reads image files. Every loader returns the same thing, a
C-contiguous ``uint8`` array of shape ``(H, W, 3)`` in RGB order, whatever the file's mode,
bit depth, orientation tag or frame count. Files that cannot be loaded raise
:class:`ImageLoadError` with a short reason; :func:`iter_images` turns those into
:class:`Failure` records so that one bad file never stops a batch.

Policy, in one place:

* **Orientation.** The EXIF ``Orientation`` tag is applied exactly once, so the returned
  height and width are those of the image as a viewer displays it.
* **Transparency.** Images with an alpha channel (``RGBA``, ``LA``, ``PA``) or a
  transparent palette/colour key are composited onto a **white** background. White is
  what most viewers and web pages show behind transparent pixels, and classifiers trained
  on product-style photos expect it; black would invent dark edges around cut-outs.
* **High bit depth.** 16-bit integer grayscale (``I;16*``) is reduced to 8 bits by
  rounding ``v / 257``, which maps 0..65535 onto 0..255 exactly (0 -> 0, 257*k -> k,
  65535 -> 255). 32-bit integer grayscale (``I``) is clipped to 0..65535 first and then
  reduced the same way. 16-bit RGB files are reduced by Pillow itself when it opens them.
* **Float.** Floating-point grayscale (``F``) is read as intensity in [0, 1] when its
  largest finite value is at most 1 (scaled by 255), otherwise as intensity in [0, 255]
  (clipped). NaN becomes 0, +inf the top of the range.
* **Colour.** No colour management: ICC profiles are ignored and values are taken as sRGB.
  ``CMYK``, ``YCbCr``, bilevel ``1`` and the rest go through Pillow's own conversion.
* **Frames.** Multi-frame files (animated GIF, multi-page TIFF) give their first frame.
* **Size.** The pixel count is read from the header and checked against ``max_pixels``
  before any pixel data is decoded.
* **Truncation.** Truncated files are errors. Pillow's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed here (if another library sets it,
  Pillow will pad truncated files instead of failing; that is outside this module's reach).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "Failure",
    "ImageLoadError",
    "LoadedImage",
    "find_images",
    "iter_images",
    "load_image",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""Lower-case file suffixes that :func:`find_images` treats as images (matched case-insensitively)."""

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest ``width * height`` that :func:`load_image` decodes (a decompression-bomb guard)."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# Exception types Pillow's decoders and plugins raise on broken input.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)


class ImageLoadError(Exception):
    """An image file could not be loaded.

    Parameters
    ----------
    path : str or os.PathLike
        The file that failed.
    reason : str
        Short human-readable reason, e.g. ``"empty file"``.

    Attributes
    ----------
    path : str
    reason : str
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the two-argument constructor picklable (multiprocessing)
        return (type(self), (self.path, self.reason))


@dataclasses.dataclass(frozen=True)
class Failure:
    """A file that could not be loaded, as recorded in a batch.

    Attributes
    ----------
    path : str
        The file's path as found by :func:`find_images`.
    reason : str
        Short human-readable reason (the :attr:`ImageLoadError.reason`).
    """

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """Return ``{"path": ..., "reason": ...}`` for JSON reports."""
        return {"path": self.path, "reason": self.reason}


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields
class LoadedImage:
    """One entry of :func:`iter_images`: an image or the reason it failed.

    Attributes
    ----------
    index : int
        0-based position in the sorted list from :func:`find_images`; stable across runs.
    path : pathlib.Path
        The file.
    rel_path : str
        POSIX path relative to the searched root (the file name when the root was a file).
    image : numpy.ndarray or None
        ``uint8 (H, W, 3)`` RGB, set when loading succeeded.
    failure : Failure or None
        Set when loading failed. Exactly one of ``image`` and ``failure`` is set.
    """

    index: int
    path: pathlib.Path
    rel_path: str
    image: np.ndarray | None
    failure: Failure | None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.failure is None):
            raise ValueError("exactly one of image and failure must be set")

    @property
    def ok(self) -> bool:
        """True when the image loaded."""
        return self.failure is None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_images(root: str | os.PathLike[str]) -> list[pathlib.Path]:
    """List the image files under a folder, recursively, in a stable order.

    Parameters
    ----------
    root : str or os.PathLike
        A folder to search, or a single file (returned as is, whatever its suffix).

    Returns
    -------
    list of pathlib.Path
        Regular files whose suffix, lower-cased, is in :data:`IMAGE_EXTENSIONS`, sorted by
        their POSIX path relative to ``root``. Files and folders whose name starts with
        ``'.'`` are skipped (below ``root``; ``root`` itself may be hidden). Symbolic links
        to files are listed, and so are broken ones (their target is missing), so that
        :func:`load_image` records them as failures; symbolic links to folders are not followed.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    """
    root = pathlib.Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder or file not found: {root}")
    if not root.is_dir():
        return [root]
    found: list[tuple[str, pathlib.Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        base = pathlib.Path(dirpath)
        for name in filenames:
            if _is_hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = base / name
            if path.is_file() or (path.is_symlink() and not path.exists()):  # a broken link is recorded as failed
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match and int(match.group(1)) > max_pixels:
        return f"image has {int(match.group(1))} pixels, over the limit of {max_pixels}"
    return f"image is over Pillow's decompression-bomb limit ({exc})"


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _int_to_uint8(values: np.ndarray) -> np.ndarray:
    """Clip to 0..65535 and reduce to 8 bits by rounding ``v / 257``."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    finite = v[np.isfinite(v)]
    scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 1.0
    v = np.nan_to_num(v * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(v, 0.0, 255.0)).astype(np.uint8)


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or img.info.get("transparency") is not None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:4].astype(np.uint32)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to ``uint8 (H, W, 3)`` RGB (see module notes)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _gray_to_rgb(_int_to_uint8(np.asarray(img)))
    if mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(img)))
    if _has_transparency(img):
        return _composite_on_white(np.asarray(img.convert("RGBA")))
    if mode == "RGB":
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))


def load_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load one image file as RGB.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.
    max_pixels : int, optional
        Largest ``width * height`` accepted, checked from the file header before decoding.
        Pillow's own decompression-bomb check (twice ``PIL.Image.MAX_IMAGE_PIXELS``) still
        rejects larger images at open time; its warning is silenced locally, and Pillow's
        globals are never changed.

    Returns
    -------
    numpy.ndarray
        ``uint8``, shape ``(H, W, 3)``, RGB, C-contiguous, owned by the caller. ``H`` and
        ``W`` are those after the EXIF orientation is applied. See the module docstring for
        transparency (composited on white), bit-depth, float and multi-frame handling.

    Raises
    ------
    ImageLoadError
        If the file is missing, a directory, empty, unreadable, not an image, over the pixel
        limit, truncated or corrupt, or in a mode that cannot be converted to RGB.
    ValueError
        If ``max_pixels`` is not positive.

    Notes
    -----
    ``warnings.catch_warnings`` is used to silence Pillow's decompression-bomb warning; it
    touches the process-wide warning filters for the duration of the call, as all uses of it
    do.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    path = pathlib.Path(path)
    try:
        if path.is_dir():
            raise ImageLoadError(path, "is a directory, not a file")
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file")
        handle = open(path, "rb")
    except FileNotFoundError:
        broken = path.is_symlink()
        raise ImageLoadError(path, "broken symbolic link (its target is missing)" if broken else "file not found"
                             ) from None
    except PermissionError:
        raise ImageLoadError(path, "cannot read file (permission denied)") from None
    except ImageLoadError:
        raise
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc.strerror or exc})") from None

    with handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(handle)
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(path, _bomb_reason(exc, max_pixels)) from None
        except UnidentifiedImageError:
            raise ImageLoadError(path, "not an image (unrecognised format)") from None
        except _DECODE_ERRORS as exc:
            raise ImageLoadError(path, f"corrupt image header ({exc})") from None
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    path, f"image has {width * height} pixels, over the limit of {max_pixels}"
                )
            try:
                img.load()  # the first frame; later frames are never decoded
            except Image.DecompressionBombError as exc:
                raise ImageLoadError(path, _bomb_reason(exc, max_pixels)) from None
            except _DECODE_ERRORS as exc:
                raise ImageLoadError(path, f"truncated or corrupt image data ({exc})") from None
            try:
                upright = ImageOps.exif_transpose(img)
            except _DECODE_ERRORS as exc:
                raise ImageLoadError(path, f"unreadable EXIF orientation ({exc})") from None
            try:
                rgb = _to_rgb_array(upright)
            except ValueError as exc:
                raise ImageLoadError(path, f"unsupported image mode {upright.mode!r} ({exc})") from None
    # np.array makes an owned, writable, C-contiguous copy (Pillow's arrays are read-only).
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)


def iter_images(
    root: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[LoadedImage]:
    """Load every image under ``root`` in :func:`find_images` order, recording failures.

    Parameters
    ----------
    root : str or os.PathLike
        A folder (searched recursively) or a single file.
    max_pixels : int, optional
        Passed to :func:`load_image`.

    Yields
    ------
    LoadedImage
        One per file found, in order, with ``index`` counting from 0. A file that cannot be
        loaded gives a record with ``image=None`` and a :class:`Failure` (its ``path`` is the
        file's full path as a string) instead of raising. An unexpected exception type from
        a decoder is recorded too, with its type name in the reason.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist (raised when iteration starts).
    """
    root = pathlib.Path(root)
    paths = find_images(root)
    for index, path in enumerate(paths):
        rel_path = path.name if path == root else path.relative_to(root).as_posix()
        try:
            image = load_image(path, max_pixels=max_pixels)
        except ImageLoadError as exc:
            failure = Failure(path=exc.path, reason=exc.reason)
        except Exception as exc:  # a decoder bug must not stop a batch of thousands of files
            failure = Failure(path=str(path), reason=f"unexpected error ({type(exc).__name__}: {exc})")
        else:
            yield LoadedImage(index=index, path=path, rel_path=rel_path, image=image, failure=None)
            continue
        yield LoadedImage(index=index, path=path, rel_path=rel_path, image=None, failure=failure)
