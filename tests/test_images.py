"""Tests for segfromxai.io.images: every fixture is built in tmp_path with Pillow, NumPy or OpenCV."""

from __future__ import annotations

import pathlib
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from segfromxai.io.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Failure,
    ImageLoadError,
    LoadedImage,
    find_images,
    iter_images,
    load_image,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _save(img: Image.Image, path: pathlib.Path, **kwargs) -> pathlib.Path:
    img.save(path, **kwargs)
    return path


def _check_rgb(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (*shape, 3)
    assert arr.flags.c_contiguous and arr.flags.writeable


def _noise_bytes(tmp_path: pathlib.Path, fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    path = tmp_path / f"noise.{fmt}"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- constants and records


def test_constants():
    assert DEFAULT_MAX_PIXELS == 64_000_000
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"} == IMAGE_EXTENSIONS
    assert all(ext == ext.lower() for ext in IMAGE_EXTENSIONS)


def test_image_load_error_str_and_failure_dict():
    err = ImageLoadError(pathlib.Path("a/b.png"), "empty file")
    assert (err.path, err.reason, str(err)) == ("a/b.png", "empty file", "a/b.png: empty file")
    assert Failure(path="a/b.png", reason="empty file").to_dict() == {"path": "a/b.png", "reason": "empty file"}


def test_loaded_image_requires_exactly_one_of_image_and_failure():
    with pytest.raises(ValueError):
        LoadedImage(index=0, path=pathlib.Path("x.png"), rel_path="x.png", image=None, failure=None)


# ---------------------------------------------------------------- modes


def test_rgb_png_exact(tmp_path):
    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    out = load_image(_save(Image.fromarray(arr), tmp_path / "rgb.png"))
    _check_rgb(out, (4, 5))
    np.testing.assert_array_equal(out, arr)


def test_grayscale_L(tmp_path):
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = load_image(_save(Image.fromarray(gray, mode="L"), tmp_path / "l.png"))
    _check_rgb(out, (2, 2))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_LA_composited_on_white(tmp_path):
    la = np.array([[[100, 255], [100, 0], [0, 128]]], dtype=np.uint8)  # opaque, transparent, half
    out = load_image(_save(Image.fromarray(la, mode="LA"), tmp_path / "la.png"))
    _check_rgb(out, (1, 3))
    np.testing.assert_array_equal(out[0, :, 0], [100, 255, 127])
    assert (out == out[:, :, :1]).all()  # still gray


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    out = load_image(_save(img, tmp_path / "p.png", transparency=0))
    _check_rgb(out, (1, 3))
    np.testing.assert_array_equal(out[0], [WHITE, RED, BLUE])


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putdata([0, 1])
    out = load_image(_save(img, tmp_path / "p.bmp"))
    np.testing.assert_array_equal(out[0], [GREEN, BLUE])


def test_rgba_composited_on_white(tmp_path):
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    out = load_image(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "rgba.png"))
    _check_rgb(out, (1, 3))
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])  # opaque: exact colour
    np.testing.assert_array_equal(out[0, 1], WHITE)  # fully transparent: white, not black
    np.testing.assert_array_equal(out[0, 2], [127, 127, 127])  # half: blended with white


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_cmyk(tmp_path, suffix):
    img = Image.new("CMYK", (32, 8))
    for x0, cmyk in enumerate([(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]):
        img.paste(cmyk, (x0 * 8, 0, x0 * 8 + 8, 8))
    out = load_image(_save(img, tmp_path / f"cmyk{suffix}", **({"quality": 95} if suffix == ".jpg" else {})))
    _check_rgb(out, (8, 32))
    expected = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
    for k, colour in enumerate(expected):
        np.testing.assert_allclose(out[4, k * 8 + 4], colour, atol=8)


def test_16bit_grayscale_png(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 128]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(path).mode in {"I;16", "I"}
    out = load_image(path)
    _check_rgb(out, (1, 4))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 0])
    assert (out == out[:, :, :1]).all()


def test_32bit_int_tiff_clipped_then_scaled(tmp_path):
    values = np.array([[-5, 0, 257 * 100, 65535, 70000]], dtype=np.int32)
    path = _save(Image.fromarray(values), tmp_path / "i32.tif")
    assert Image.open(path).mode == "I"
    out = load_image(path)
    np.testing.assert_array_equal(out[0, :, 1], [0, 0, 100, 255, 255])


def test_float_tiff_unit_range_scaled(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, -0.2, np.nan]], dtype=np.float32)
    path = _save(Image.fromarray(values), tmp_path / "f.tif")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(load_image(path)[0, :, 2], [0, 128, 255, 0, 0])


def test_float_tiff_above_one_clipped(tmp_path):
    values = np.array([[-3.0, 10.4, 200.0, 300.0]], dtype=np.float32)
    out = load_image(_save(Image.fromarray(values), tmp_path / "f.tif"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 10, 200, 255])


def test_bilevel(tmp_path):
    img = Image.new("1", (2, 1))
    img.putdata([0, 1])
    out = load_image(_save(img, tmp_path / "bw.png"))
    np.testing.assert_array_equal(out[0], [(0, 0, 0), WHITE])


def test_ycbcr_jpeg(tmp_path):
    img = Image.new("RGB", (16, 16), RED).convert("YCbCr")
    out = load_image(_save(img, tmp_path / "ycc.jpg", quality=95))
    np.testing.assert_allclose(out[8, 8], RED, atol=8)


def test_16bit_rgb_png_channel_order(tmp_path):
    bgr = np.zeros((3, 4, 3), dtype=np.uint16)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 0, 257 * 100, 65535  # B, G, R in OpenCV order
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), bgr)
    out = load_image(path)
    _check_rgb(out, (3, 4))
    np.testing.assert_array_equal(out.reshape(-1, 3), np.tile([255, 100, 0], (12, 1)))


def test_exif_orientation_applied_once(tmp_path):
    stored = np.zeros((32, 64, 3), dtype=np.uint8)  # H=32, W=64: left half red, right half blue
    stored[:, :32] = RED
    stored[:, 32:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = _save(Image.fromarray(stored), tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(path)
    _check_rgb(out, (64, 32))  # H and W swapped
    np.testing.assert_allclose(out[8, 16], RED, atol=10)  # stored left -> displayed top
    np.testing.assert_allclose(out[56, 16], BLUE, atol=10)


def test_multiframe_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE)]
    path = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3
    out = load_image(path)
    _check_rgb(out, (6, 8))
    assert (out == RED).all()


def test_multipage_tiff_first_page(tmp_path):
    pages = [Image.new("RGB", (5, 4), GREEN), Image.new("RGB", (9, 9), RED)]
    out = load_image(_save(pages[0], tmp_path / "pages.tif", save_all=True, append_images=pages[1:]))
    _check_rgb(out, (4, 5))
    assert (out == GREEN).all()


def test_accepts_str_path(tmp_path):
    path = _save(Image.new("RGB", (3, 2), BLUE), tmp_path / "b.ppm")
    assert (load_image(str(path)) == BLUE).all()


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated(tmp_path, fmt):
    data = _noise_bytes(tmp_path, fmt)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason.startswith("truncated or corrupt image data")
    assert info.value.path == str(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == "empty file"
    assert str(info.value) == f"{path}: empty file"


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == "not an image (unrecognised format)"


def test_directory_named_png(tmp_path):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "x.png")
    assert "directory" in info.value.reason


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "nope.png")
    assert info.value.reason == "file not found"


def test_pixel_limit_checked(tmp_path):
    path = _save(Image.new("RGB", (40, 30), RED), tmp_path / "big.png")
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=1000)
    assert info.value.reason == "image has 1200 pixels, over the limit of 1000"
    assert load_image(path, max_pixels=1200).shape == (30, 40, 3)


def test_pixel_limit_checked_before_decoding(tmp_path):
    # The header claims 9000x9000 (81M pixels, under Pillow's own limit) but the data is tiny:
    # the limit must fire from the header, not as a decode error.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(9000, 9000))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == f"image has {9000 * 9000} pixels, over the limit of {DEFAULT_MAX_PIXELS}"


def test_pillow_bomb_error_converted(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(20000, 20000))  # over twice Pillow's MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == f"image has {20000 * 20000} pixels, over the limit of {DEFAULT_MAX_PIXELS}"


def test_pillow_globals_untouched(tmp_path):
    from PIL import ImageFile

    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    load_image(_save(Image.new("RGB", (4, 4)), tmp_path / "a.png"), max_pixels=10**9)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_bad_max_pixels(tmp_path):
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(tmp_path / "a.png", max_pixels=0)


# ---------------------------------------------------------------- find_images


def _touch_image(path: pathlib.Path, colour=RED) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower())
    Image.new("RGB", (4, 4), colour).save(path, format=fmt)
    return path


def test_find_images_recursive_sorted_filtered(tmp_path):
    for rel in ["b.png", "a/z.JPG", "a/c/d.TiFf", "a/y.jpeg", "sub/deep/e.bmp"]:
        _touch_image(tmp_path / rel)
    (tmp_path / "c.webp").write_bytes(b"listed by suffix; not opened")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / "a" / "data.npy").write_bytes(b"no")
    (tmp_path / "noext").write_bytes(b"no")
    _touch_image(tmp_path / ".hidden.png")
    _touch_image(tmp_path / ".cache" / "f.png")
    _touch_image(tmp_path / "a" / ".thumbs" / "g.png")
    (tmp_path / "dir.png").mkdir()
    found = find_images(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a/c/d.TiFf", "a/y.jpeg", "a/z.JPG", "b.png", "c.webp", "sub/deep/e.bmp"]
    assert all(isinstance(p, pathlib.Path) for p in found)
    assert find_images(tmp_path) == found  # stable


def test_find_images_single_file_and_missing(tmp_path):
    path = _touch_image(tmp_path / "one.png")
    assert find_images(path) == [path]
    assert find_images(str(path)) == [path]
    with pytest.raises(FileNotFoundError, match="not found"):
        find_images(tmp_path / "missing")


def test_find_images_empty_folder(tmp_path):
    assert find_images(tmp_path) == []


# ---------------------------------------------------------------- iter_images


def test_iter_images_mixed_folder_never_raises(tmp_path):
    _touch_image(tmp_path / "a_good.png", RED)
    (tmp_path / "b_empty.jpg").touch()
    (tmp_path / "c_text.png").write_text("hello")
    data = _noise_bytes(tmp_path, "png")
    (tmp_path / "noise.png").unlink()
    (tmp_path / "d_cut.png").write_bytes(data[: len(data) // 2])
    _touch_image(tmp_path / "sub" / "e_good.jpg", BLUE)
    _save(Image.new("RGB", (100, 60)), tmp_path / "f_big.png")  # over the limit below

    records = list(iter_images(tmp_path, max_pixels=5000))
    assert [r.index for r in records] == list(range(6))
    assert [r.rel_path for r in records] == [
        "a_good.png", "b_empty.jpg", "c_text.png", "d_cut.png", "f_big.png", "sub/e_good.jpg",
    ]
    for r in records:
        assert (r.image is None) != (r.failure is None)
        assert r.ok == (r.failure is None)
    good = {r.rel_path: r.image for r in records if r.ok}
    assert set(good) == {"a_good.png", "sub/e_good.jpg"}
    assert (good["a_good.png"] == RED).all()
    np.testing.assert_allclose(good["sub/e_good.jpg"][2, 2], BLUE, atol=10)
    reasons = {r.rel_path: r.failure.reason for r in records if not r.ok}
    assert reasons["b_empty.jpg"] == "empty file"
    assert reasons["c_text.png"] == "not an image (unrecognised format)"
    assert reasons["d_cut.png"].startswith("truncated or corrupt image data")
    assert reasons["f_big.png"] == "image has 6000 pixels, over the limit of 5000"
    for r in records:
        if r.failure is not None:
            assert r.failure.path == str(r.path)


def test_iter_images_single_file(tmp_path):
    path = _touch_image(tmp_path / "solo.png", GREEN)
    (record,) = iter_images(path)
    assert (record.index, record.path, record.rel_path, record.failure) == (0, path, "solo.png", None)
    assert (record.image == GREEN).all()


def test_iter_images_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_images(tmp_path / "missing"))
