import numpy as np
import pycocotools.mask as mask_utils
import pytest

from segfromxai.ops import masks

# Two blobs that touch only diagonally, plus an isolated pixel.
DIAG = np.array([
    [1, 1, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1],
], dtype=bool)


def test_components_4_vs_8():
    labels4, n4 = masks.components(DIAG, connectivity=4)
    labels8, n8 = masks.components(DIAG, connectivity=8)
    assert labels4.dtype == np.int32 and labels8.dtype == np.int32
    assert (n4, n8) == (3, 2)
    np.testing.assert_array_equal(labels4, [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 2, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 3],
    ])
    np.testing.assert_array_equal(labels8, [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 2],
    ])
    with pytest.raises(ValueError):
        masks.components(DIAG, connectivity=6)


def test_remove_small():
    out = masks.remove_small(DIAG, min_area=2)
    expected = DIAG.copy()
    expected[4, 4] = False
    np.testing.assert_array_equal(out, expected)
    # 4-connectivity splits the diagonal pixel off, so it goes too
    expected4 = expected.copy()
    expected4[2, 2] = False
    np.testing.assert_array_equal(masks.remove_small(DIAG, min_area=2, connectivity=4), expected4)
    assert not masks.remove_small(DIAG, min_area=6).any()
    np.testing.assert_array_equal(masks.remove_small(DIAG, min_area=1), DIAG)
    assert out.dtype == bool


RING = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 0, 1, 1, 1],
    [0, 1, 0, 1, 0, 1, 0, 0],
    [0, 1, 1, 1, 0, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 0, 0, 0, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
], dtype=bool)
# holes: (2, 2) one pixel, (6, 1..3) three pixels; (2, 6..7) touches the border (column 7), so it is no hole.


def test_fill_holes():
    full = RING.copy()
    full[2, 2] = True
    full[6, 1:4] = True
    np.testing.assert_array_equal(masks.fill_holes(RING), full)
    small = RING.copy()
    small[2, 2] = True
    np.testing.assert_array_equal(masks.fill_holes(RING, max_area=2), small)
    np.testing.assert_array_equal(masks.fill_holes(RING, max_area=3), full)
    np.testing.assert_array_equal(masks.fill_holes(RING, max_area=0), RING)
    assert not masks.fill_holes(np.zeros((3, 4), bool)).any()
    assert masks.fill_holes(np.ones((3, 4), bool)).all()


def test_fill_holes_diagonal_leak_is_still_a_hole():
    # the background pixel at (1, 1) touches the outside only through a corner: 4-connected background -> hole
    m = np.array([
        [0, 1, 1],
        [1, 0, 1],
        [1, 1, 1],
    ], bool)
    assert masks.fill_holes(m)[1, 1]


def test_keep_largest():
    m = np.zeros((4, 6), bool)
    m[0, 0] = True
    m[2:4, 2:5] = True
    m[0, 4:6] = True
    expected = np.zeros_like(m)
    expected[2:4, 2:5] = True
    np.testing.assert_array_equal(masks.keep_largest(m), expected)
    assert not masks.keep_largest(np.zeros((2, 2), bool)).any()
    # ties: first in raster order
    t = np.zeros((3, 5), bool)
    t[2, 0:2] = True
    t[0, 3:5] = True
    np.testing.assert_array_equal(masks.keep_largest(t), np.pad(np.ones((1, 2), bool), ((0, 2), (3, 0))))


def test_split_components_order_and_min_area():
    m = np.zeros((5, 6), bool)
    m[4, 0:4] = True  # third by first pixel (row 4)
    m[0, 5] = True  # first (row 0)
    m[1:3, 2:4] = True  # second (row 1)
    parts = masks.split_components(m)
    assert [tuple(np.argwhere(p)[0]) for p in parts] == [(0, 5), (1, 2), (4, 0)]
    assert all(p.dtype == bool and p.shape == m.shape for p in parts)
    np.testing.assert_array_equal(np.sum(parts, axis=0), m.astype(int))
    big = masks.split_components(m, min_area=2)
    assert [int(p.sum()) for p in big] == [4, 4]
    assert masks.split_components(np.zeros((2, 3), bool)) == []


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (13, 7), (1, 9), (31, 2)])
@pytest.mark.parametrize("fill", ["random", "false", "true"])
def test_encode_decode_round_trip(shape, fill):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    m = {"random": rng.random(shape) < 0.4, "false": np.zeros(shape, bool), "true": np.ones(shape, bool)}[fill]
    rle = masks.encode(m)
    assert isinstance(rle["counts"], str)
    assert rle["size"] == list(shape)
    out = masks.decode(rle)
    assert out.dtype == bool and out.shape == shape
    np.testing.assert_array_equal(out, m)
    np.testing.assert_array_equal(masks.decode({**rle, "counts": rle["counts"].encode()}), m)
    assert masks.area(rle) == int(m.sum())
    ys, xs = np.nonzero(m)
    if len(xs):
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    else:
        expected = [0, 0, 0, 0]
    assert masks.bbox(rle) == [float(v) for v in expected]
    assert all(isinstance(v, float) for v in masks.bbox(rle))
    assert isinstance(masks.area(rle), int)


def test_decode_uncompressed_rle():
    m = np.zeros((3, 4), bool)
    m[1, 2] = m[2, 2] = True  # column-major: 7 zeros, 2 ones, 3 zeros
    np.testing.assert_array_equal(masks.decode({"size": [3, 4], "counts": [7, 2, 3]}), m)
    assert masks.area({"size": [3, 4], "counts": [7, 2, 3]}) == 2
    with pytest.raises(ValueError):
        masks.decode({"size": [3, 4], "counts": [7, 2]})
    with pytest.raises(ValueError):
        masks.decode([[0, 0, 1, 0, 1, 1]])


def test_encode_matches_pycocotools():
    m = np.random.default_rng(0).random((9, 11)) < 0.5
    ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert masks.encode(m)["counts"] == ref["counts"].decode()


def test_to_polygons_rectangle():
    m = np.zeros((6, 10), bool)
    m[2:5, 3:9] = True  # rows 2..4, columns 3..8
    polys = masks.to_polygons(m)
    assert len(polys) == 1
    corners = {tuple(p) for p in np.reshape(polys[0], (-1, 2))}
    assert corners == {(3.0, 2.0), (8.0, 2.0), (8.0, 4.0), (3.0, 4.0)}
    assert all(isinstance(v, float) for v in polys[0])


def test_to_polygons_drops_holes_and_tiny_parts_and_orders():
    m = np.zeros((12, 12), bool)
    m[6:11, 1:6] = True
    m[8, 3] = False  # a hole: dropped
    m[1:4, 7:11] = True
    m[0, 0] = True  # a single pixel: fewer than 3 points, dropped
    polys = masks.to_polygons(m)
    assert len(polys) == 2
    firsts = [np.reshape(p, (-1, 2))[:, ::-1].min(axis=0).tolist() for p in polys]
    assert firsts[0][0] < firsts[1][0]  # upper blob first
    simplified = masks.to_polygons(m, tolerance=1.0)
    assert len(simplified) == 2
    with pytest.raises(ValueError):
        masks.to_polygons(m, tolerance=-1)


@pytest.mark.parametrize("fn", [
    lambda m: masks.components(m),
    lambda m: masks.remove_small(m, min_area=2),
    lambda m: masks.fill_holes(m),
    lambda m: masks.keep_largest(m),
    lambda m: masks.split_components(m),
    lambda m: masks.encode(m),
    lambda m: masks.to_polygons(m, tolerance=0.5),
])
def test_no_mutation_and_2d_only(fn):
    for m in (RING.copy(), RING.astype(np.uint8)):
        before = m.copy()
        fn(m)
        np.testing.assert_array_equal(m, before)
        assert m.dtype == before.dtype
    with pytest.raises(ValueError):
        fn(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError):
        fn(np.zeros(5, bool))


def test_fill_holes_and_remove_small_return_new_arrays():
    m = RING.copy()
    for out in (masks.fill_holes(m, max_area=0), masks.remove_small(m, min_area=0)):
        out[:] = False
    np.testing.assert_array_equal(m, RING)


def test_mask_iou_known_answers():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert masks.mask_iou(a, b) == 0.0  # both empty
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert masks.mask_iou(a, b) == pytest.approx(4 / 12)
    assert masks.mask_iou(a, a) == 1.0 and masks.mask_iou(a, ~a) == 0.0
