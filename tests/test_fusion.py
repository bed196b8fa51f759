import numpy as np
import pytest
import torch

from segfromxai.stages.fusion import FUSIONS, arithmetic_mean, fuse, geometric_mean, normalise, product, resample


def t(a):
    return torch.tensor(np.asarray(a, dtype=np.float32))


def test_normalise_known_answer_and_constant_map():
    m = t([[[0, 1], [2, 4]], [[3, 3], [3, 3]]])
    out = normalise(m)
    assert torch.equal(out[0], t([[0, 0.25], [0.5, 1]]))
    assert torch.equal(out[1], torch.zeros(2, 2))  # a constant map ranks nothing
    assert torch.equal(m[0], t([[0, 1], [2, 4]]))  # input untouched


def test_normalise_clip_caps_values_above_the_percentile():
    m = t([[list(range(10)) + [1000]]])  # one extreme value
    out = normalise(m, clip=90)  # the 90th percentile of 0..9,1000 is 9 (linear interpolation)
    np.testing.assert_allclose(out[0, 0, :10].numpy(), np.arange(10) / 9, atol=1e-6)
    assert out[0, 0, 10] == 1
    with pytest.raises(ValueError, match="clip"):
        normalise(m, clip=0)


def test_geometric_mean_is_the_kth_root_of_the_product_for_three_maps():
    rng = np.random.default_rng(0)
    maps = [t(rng.uniform(0.05, 1, (2, 5, 5))) for _ in range(3)]
    expected = (maps[0] * maps[1] * maps[2]) ** (1 / 3)
    torch.testing.assert_close(geometric_mean(maps), expected, rtol=1e-5, atol=0)
    # the research-code bug: a square root of a three-way product is not a geometric mean
    assert not torch.allclose(geometric_mean(maps), torch.sqrt(maps[0] * maps[1] * maps[2]))


def test_geometric_mean_weights_eps_floor_and_no_underflow():
    a, b = t([[[0.25, 0.0]]]), t([[[1.0, 1.0]]])
    out = geometric_mean([a, b], weights=[3, 1], eps=1e-4)
    np.testing.assert_allclose(out.numpy(), [[[0.25 ** 0.75, 1e-4 ** 0.75]]], rtol=1e-5)
    # twelve maps of 1e-4: the float32 product underflows to 0, the log-space mean does not
    small = [torch.full((1, 2, 2), 1e-4) for _ in range(12)]
    assert product(small).max() == 0
    torch.testing.assert_close(geometric_mean(small), torch.full((1, 2, 2), 1e-4), rtol=1e-5, atol=0)


def test_product_and_arithmetic_mean_known_answers():
    a, b = t([[[0.5, 1.0]]]), t([[[0.5, 0.0]]])
    np.testing.assert_allclose(product([a, b]).numpy(), [[[0.25, 0.0]]])
    np.testing.assert_allclose(product([a, b], weights=[2, 1]).numpy(), [[[0.125, 0.0]]])
    np.testing.assert_allclose(arithmetic_mean([a, b], weights=[3, 1]).numpy(), [[[0.5, 0.75]]])
    with pytest.raises(ValueError, match="weights"):
        arithmetic_mean([a, b], weights=[1])


def test_resample_area_down_bilinear_up_and_non_square():
    m = t(np.arange(16).reshape(1, 4, 4))
    down = resample(m, (2, 2))
    np.testing.assert_allclose(down[0].numpy(), [[2.5, 4.5], [10.5, 12.5]])  # block means
    up = resample(t(np.ones((1, 2, 3))), (7, 11))
    assert up.shape == (1, 7, 11) and torch.allclose(up, torch.ones(1, 7, 11))
    mixed = resample(m, (2, 8))  # shrink one axis, grow the other
    assert mixed.shape == (1, 2, 8)


@pytest.mark.parametrize("method", sorted(FUSIONS))
def test_fuse_normalises_resamples_and_spans_unit_range(method):
    rng = np.random.default_rng(1)
    maps = {"coarse": t(rng.uniform(0, 5, (2, 4, 4))), "fine": t(rng.uniform(-1, 1, (2, 8, 8)))}
    out = fuse(maps, method=method)
    assert out.shape == (2, 8, 8) and out.dtype == torch.float32
    assert torch.allclose(out.amin((1, 2)), torch.zeros(2)) and torch.allclose(out.amax((1, 2)), torch.ones(2))
    small = fuse(maps, method=method, size=(4, 4))
    assert small.shape == (2, 4, 4)


def test_fuse_of_one_map_is_that_map_normalised():
    m = t([[[1, 2], [3, 5]]])
    torch.testing.assert_close(fuse({"a": m}), normalise(m))


def test_fuse_rejects_unknown_method_and_weights():
    m = {"a": torch.ones(1, 2, 2)}
    with pytest.raises(ValueError, match="valid: geometric, mean, product"):
        fuse(m, method="median")
    with pytest.raises(ValueError, match="not fused"):
        fuse(m, weights={"b": 2.0})


def test_pool_area_and_smooth_bring_pixel_maps_to_the_coarse_scale():
    import scipy.ndimage

    from segfromxai.stages.fusion import gaussian_blur, pool_maps

    rng = np.random.default_rng(0)
    fine = torch.from_numpy((rng.random((2, 28, 21)) > 0.97).astype(np.float32))  # sparse pixels
    coarse = torch.rand(2, 4, 3)
    area = pool_maps({"c": coarse, "f": fine}, "area")
    assert area["c"] is not None and torch.equal(area["c"], coarse)
    np.testing.assert_allclose(area["f"].numpy(), fine.numpy().reshape(2, 4, 7, 3, 7).mean((2, 4)), atol=1e-6)
    smooth = pool_maps({"c": coarse, "f": fine}, "smooth")["f"]
    ref = np.stack([scipy.ndimage.gaussian_filter(m.astype(np.float64), (3.5, 3.5), mode="reflect", truncate=3.0)
                    for m in fine.numpy()])
    np.testing.assert_allclose(smooth.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(gaussian_blur(fine, (0.0, 0.0)).numpy(), fine.numpy())
    assert torch.equal(pool_maps({"c": coarse, "f": fine}, "none")["f"], fine)
    with pytest.raises(ValueError, match="valid: none, area, smooth"):
        pool_maps({"c": coarse}, "max")


def test_fuse_with_pool_keeps_a_sparse_pixel_map_from_zeroing_the_geometric_mean():
    fine = torch.zeros(1, 32, 32)
    fine[0, 4:12:3, 4:12:3] = 1.0  # 9 pixels in the top-left quarter
    coarse = torch.zeros(1, 4, 4)
    coarse[0, :2, :2] = 1.0
    plain = fuse({"c": coarse, "f": fine}, size=(32, 32))
    pooled = fuse({"c": coarse, "f": fine}, size=(32, 32), pool="area")
    assert (plain[0, :16, :16] > 0.5).float().mean() < 0.05  # only the 9 pixels survive
    assert (pooled[0, :12, :12] > 0.5).float().mean() > 0.5
