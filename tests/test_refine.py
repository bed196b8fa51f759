import inspect

import cv2
import numpy as np
import pytest
import scipy.linalg
import torch

import segfromxai.stages.refine as refine
from segfromxai.stages.refine import (
    CHOICES,
    REFINERS,
    affinity,
    cut_level,
    grid_positions,
    ncut,
    ncut_bipartition,
    none,
)
from segfromxai.ops.resize import resize_area, resize_bilinear


def _affinity_slow(x, *, tau=0.2, eps=1e-5, positions=None, position_weight=0.0, position_sigma=0.1, prior=None,
                   prior_weight=0.0):
    """Plain reference: one pair at a time, straight from the formula."""
    n = len(x)
    w = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            s = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            if position_weight:
                d = np.linalg.norm(positions[i] - positions[j])
                s += position_weight * np.exp(-d**2 / (2 * position_sigma**2))
            if prior_weight:
                s += prior_weight * prior[i] * prior[j]
            w[i, j] = 1.0 if s > tau else eps
    return w


def _graph_case(seed, n, terms):
    rng = np.random.default_rng(seed)
    fh = 4 if n % 4 == 0 else 1
    x = rng.standard_normal((n, 6)) + (rng.random((n, 1)) > 0.5) * rng.standard_normal(6)
    kw = {}
    if "position" in terms:
        kw.update(positions=grid_positions((fh, n // fh)), position_weight=0.7, position_sigma=0.2)
    if "prior" in terms:
        kw.update(prior=rng.random(n), prior_weight=0.5)
    return x, kw


def _blocks(shape, blocks):
    """Features (fh, fw, k + 1): one-hot e0 on the background, e_{k+1} on block k (orthogonal clusters)."""
    x = np.zeros(shape + (len(blocks) + 1,))
    x[..., 0] = 1.0
    for k, (r0, r1, c0, c1) in enumerate(blocks):
        x[r0:r1, c0:c1] = 0.0
        x[r0:r1, c0:c1, k + 1] = 1.0
    return x


CENTRE = _blocks((5, 5), [(1, 4, 1, 4)])
BLOCK = CENTRE[..., 1] > 0


def _structured(seed=0, g=12):
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:g, 0:g] / g
    lab = ((rr - 0.4) ** 2 + (cc - 0.45) ** 2 < 0.25**2).astype(int)
    x = rng.standard_normal((2, 32))[lab] + 0.8 * rng.standard_normal((g, g, 32))
    fused = np.clip(0.7 * lab + 0.3 * rng.random((g, g)), 0, 1).astype(np.float32)
    return x, fused


@pytest.mark.parametrize("terms", [(), ("position",), ("prior",), ("position", "prior")])
def test_affinity_matches_pairwise_reference(terms):
    x, kw = _graph_case(1, 24, terms)
    w = affinity(x, **kw)
    assert np.allclose(w, _affinity_slow(x, **kw))
    assert np.array_equal(w, w.T) and set(np.unique(w)) <= {1e-5, 1.0}


@pytest.mark.parametrize("seed,n,terms", [(0, 16, ()), (1, 40, ()), (2, 100, ()), (3, 36, ("position",)),
                                          (4, 64, ("prior",)), (5, 100, ("position", "prior")), (6, 17, ())])
def test_lanczos_matches_dense_generalized_eigh(seed, n, terms):
    x, kw = _graph_case(seed, n, terms)
    y, split = ncut_bipartition(x, solver="lanczos", **kw)
    w = affinity(x, **kw)
    d = w.sum(axis=1)
    lam_ref, vec_ref = scipy.linalg.eigh(np.diag(d) - w, np.diag(d))
    yr = vec_ref[:, 1]
    cos = (y @ (d * yr)) / np.sqrt((y @ (d * y)) * (yr @ (d * yr)))
    assert abs(cos) > 0.999
    yr = np.sign(cos) * yr
    assert np.array_equal(y > split, yr > yr.mean())
    assert split == pytest.approx(y.mean())
    lam = (y @ (d * y - w @ y)) / (y @ (d * y))
    assert lam == pytest.approx(lam_ref[1], abs=1e-9)
    assert np.linalg.norm(d * y - w @ y - lam * d * y) < 1e-8 * np.linalg.norm(d * y)
    yd, split_d = ncut_bipartition(x, solver="dense", **kw)
    assert np.allclose(np.abs(yd), np.abs(y), atol=1e-7) and np.array_equal(yd > split_d, yr > yr.mean())


def test_eigenvector_is_d_normalised_with_largest_entry_positive():
    x, _ = _graph_case(7, 30, ())
    for solver in CHOICES["ncut"]["solver"]:
        y, _ = ncut_bipartition(x, solver=solver)
        d = affinity(x).sum(axis=1)
        assert y @ (d * y) == pytest.approx(1.0) and y[np.argmax(np.abs(y))] > 0


def test_two_clusters_partition_is_exactly_the_block():
    y, split = ncut_bipartition(CENTRE.reshape(25, -1))
    side = (y > split).reshape(5, 5)
    assert np.array_equal(side, BLOCK) or np.array_equal(side, ~BLOCK)


def test_fused_high_on_block_returns_the_block_upsampled():
    fused = np.where(BLOCK, 0.9, 0.1).astype(np.float32)
    assert [m.tolist() for m in ncut(fused, fused > 0.5, size=(5, 5), features=CENTRE)] == [BLOCK.tolist()]
    (out,) = ncut(fused, fused > 0.5, size=(30, 30), features=CENTRE)
    # the soft map is +-c on the two clusters: its bilinear zero set is the block with rounded corners
    assert np.array_equal(out, resize_bilinear(np.where(BLOCK, 1.0, -1.0), (30, 30)) > 0)
    square = np.kron(BLOCK, np.ones((6, 6), bool))
    assert not (out & ~square).any() and out.sum() > 0.95 * square.sum()


def test_fused_high_outside_makes_the_outside_foreground():
    fused = np.where(BLOCK, 0.1, 0.9).astype(np.float32)
    (grid,) = ncut(fused, fused > 0.5, size=(5, 5), features=CENTRE)
    assert np.array_equal(grid, ~BLOCK)
    (out,) = ncut(fused, fused > 0.5, size=(30, 30), features=CENTRE)
    # soft map: |y - split| on the outside, -max |y - split| (the block's value) on the block
    y, split = ncut_bipartition(CENTRE.reshape(25, -1))
    dist = np.abs(y - split).reshape(5, 5)
    assert np.array_equal(out, resize_bilinear(np.where(BLOCK, -dist.max(), dist), (30, 30)) > 0)
    outside = np.kron(~BLOCK, np.ones((6, 6), bool))
    assert out[:5].all() and out[-5:].all() and 0.8 * outside.sum() < out.sum() < outside.sum()


def test_corner_veto_reverses_an_explained_side_that_holds_the_corners():
    """A map higher on the frame around the block chooses the outside (all four corners); MaskCut's corner rule
    overrules it, and leaves a choice that holds no corner alone. The reversed side must still overlap the
    thresholded map (here ``> 0.5``: everything), as any chosen side must."""
    outside = np.where(BLOCK, 0.6, 0.9).astype(np.float32)
    inside = np.where(BLOCK, 0.9, 0.1).astype(np.float32)
    for rule in ("mass", "mean"):
        kw = dict(size=(5, 5), features=CENTRE, foreground=rule)
        assert [m.tolist() for m in ncut(outside, outside > 0.5, **kw)] == [(~BLOCK).tolist()]
        assert [m.tolist() for m in ncut(outside, outside > 0.5, corner_veto=True, **kw)] == [BLOCK.tolist()]
        assert [m.tolist() for m in ncut(inside, inside > 0.5, corner_veto=True, **kw)] == [BLOCK.tolist()]


def test_upsampling_keeps_aspect_ratio():
    fused = np.where(BLOCK, 0.9, 0.1).astype(np.float32)
    for refiner in REFINERS.values():
        (out,) = refiner(fused, fused > 0.5, size=(30, 70), features=CENTRE)
        assert out.shape == (30, 70) and out.dtype == bool
        assert np.array_equal(out, resize_bilinear(np.where(BLOCK, 1.0, -1.0), (30, 70)) > 0)
        assert np.array_equal(out[15], np.repeat(BLOCK[2], 14))
        assert np.array_equal(out[:, 35], np.repeat(BLOCK[:, 2], 6))


def test_foreground_follows_explanation_mass_not_eigenvector_sign(monkeypatch):
    x, fused = _structured()
    kw = dict(size=(24, 36), features=x, instances=2)
    ref = ncut(fused, fused > 0.6, **kw)
    fiedler = refine.fiedler
    monkeypatch.setattr(refine, "fiedler", lambda *a, **k: -fiedler(*a, **k))
    flipped = ncut(fused, fused > 0.6, **kw)
    assert len(ref) == len(flipped) >= 1
    assert all(np.array_equal(a, b) for a, b in zip(ref, flipped))


def test_swapping_the_cluster_features_does_not_change_the_mask():
    fused = np.where(BLOCK, 0.9, 0.1)
    a = ncut(fused, fused > 0.5, size=(10, 10), features=CENTRE)
    b = ncut(fused, fused > 0.5, size=(10, 10), features=CENTRE[..., ::-1])
    assert len(a) == len(b) == 1 and np.array_equal(a[0], b[0])


def test_foreground_side_must_overlap_the_thresholded_explanation():
    fused = np.where(BLOCK, 0.0, 0.5)
    fused[2, 2] = 0.9  # the mask (one block token) lies on the side with less explanation mass
    assert ncut(fused, fused > 0.7, size=(5, 5), features=CENTRE) == []


THREE = _blocks((10, 10), [(1, 4, 1, 4), (6, 9, 1, 3), (2, 4, 6, 10)])
THREE_MASKS = [THREE[..., k] > 0 for k in (1, 2, 3)]


def test_multi_instance_recovers_the_blocks():
    fused = np.where(THREE[..., 0] > 0, 0.0, 0.9)
    out = ncut(fused, fused > 0.5, size=(10, 10), features=THREE, instances=3, components="largest")
    assert sorted(m.tolist() for m in out) == sorted(m.tolist() for m in THREE_MASKS)
    big = ncut(fused, fused > 0.5, size=(20, 20), features=THREE, instances=3, components="largest")
    assert len(big) == 3 and not (big[0] & big[1]).any()
    # min_area: the 6-token block is under 7% of the image
    out = ncut(fused, fused > 0.5, size=(10, 10), features=THREE, instances=3, components="largest", min_area=0.07)
    assert sorted(int(m.sum()) for m in out) == [8, 9]


def test_components_overlap_largest_all():
    x = _blocks((6, 9), [(1, 3, 1, 3)])
    x[3:5, 6:8] = x[1, 1]  # a second patch of the same cluster, not explained
    fused = np.zeros((6, 9))
    fused[1:3, 1:3] = 0.9
    mask = fused > 0.5
    sizes = {c: [int(m.sum()) for m in ncut(fused, mask, size=(6, 9), features=x, components=c)]
             for c in CHOICES["ncut"]["components"]}
    assert sizes == {"overlap": [4], "largest": [4], "all": [8], "seed": [4]}


def test_combine_relations():
    x, fused = _structured(3)
    mask = fused > 0.6
    kw = dict(size=(30, 45), features=x)
    (alone,), (inter,), (union,) = (ncut(fused, mask, combine=c, **kw) for c in ("none", "intersection", "union"))
    (base,) = none(fused, mask, size=(30, 45))
    assert np.array_equal(inter, alone & base) and np.array_equal(union, alone | base)
    assert not (inter & ~union).any() and inter.sum() < union.sum()


def test_none_refiner_is_the_cut_level_upsampling():
    x, fused = _structured(4)
    mask = fused >= np.quantile(fused, 0.7)
    (out,) = none(fused, mask, size=(37, 53))
    assert np.array_equal(out, resize_bilinear(fused, (37, 53)) > cut_level(fused, mask))
    (same,) = none(fused, mask, size=fused.shape)
    assert np.array_equal(same, mask)
    assert none(fused, np.zeros_like(mask), size=(8, 8)) == []


def test_resize_bilinear_matches_torch_and_cv2():
    g = np.random.default_rng(0).random((5, 7))
    for size in [(30, 70), (13, 9), (5, 7), (3, 2)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(g)[None, None], size=size, mode="bilinear",
                                              align_corners=False)[0, 0].numpy()
        assert np.allclose(resize_bilinear(g, size), ref, atol=1e-12)
    assert np.allclose(resize_bilinear(g, (30, 70)), cv2.resize(g, (70, 30), interpolation=cv2.INTER_LINEAR),
                       atol=1e-6)


def test_resize_area_is_block_mean_and_matches_cv2():
    g = np.random.default_rng(1).random((12, 18))
    out = resize_area(g, (4, 6))
    assert np.allclose(out, g.reshape(4, 3, 6, 3).mean(axis=(1, 3)))
    assert np.allclose(out, cv2.resize(g, (6, 4), interpolation=cv2.INTER_AREA), atol=1e-6)
    assert np.allclose(resize_area(g, (5, 7)).mean(), g.mean())


@pytest.mark.parametrize("op", ["gt", "ge"])
def test_cut_level_reproduces_level_set_masks(op):
    rng = np.random.default_rng(2)
    fused = np.round(rng.random((9, 11)), 1).astype(np.float32)  # many ties
    for t in np.unique(fused):
        mask = fused > t if op == "gt" else fused >= t
        level = cut_level(fused, mask)
        assert np.array_equal(fused.astype(np.float64) > level, mask)
    assert cut_level(fused, np.zeros_like(fused, bool)) == np.inf
    assert cut_level(fused, np.ones_like(fused, bool)) == -np.inf
    adjacent = np.array([[0.5, np.nextafter(0.5, 1.0)]])
    assert np.array_equal(adjacent > cut_level(adjacent, np.array([[False, True]])), [[False, True]])


def test_cut_level_rejects_a_mask_that_is_not_a_level_set():
    with pytest.raises(ValueError, match="upper level set"):
        cut_level(np.array([[0.2, 0.8]]), np.array([[True, False]]))


def test_fused_on_another_grid_is_area_averaged_to_the_feature_grid():
    x, fused = _structured(5, g=6)
    fine = np.kron(fused, np.ones((2, 2))).astype(np.float32)  # the same map on a 12 x 12 grid
    mask = fine > 0.6
    a = ncut(fine, mask, size=(18, 18), features=x)
    b = ncut(fused, fused > cut_level(fine, mask), size=(18, 18), features=x)
    assert len(a) == len(b) == 1 and np.array_equal(a[0], b[0])


def test_unknown_choices_name_the_valid_ones():
    fused = np.where(BLOCK, 0.9, 0.1)
    for name, valid in CHOICES["ncut"].items():
        with pytest.raises(ValueError, match=", ".join(valid)):
            ncut(fused, fused > 0.5, size=(5, 5), features=CENTRE, **{name: "nope"})
    with pytest.raises(ValueError, match="lanczos, dense"):
        ncut_bipartition(CENTRE.reshape(25, -1), solver="arpack")


def test_ncut_without_features_raises():
    fused = np.where(BLOCK, 0.9, 0.1)
    with pytest.raises(ValueError, match="features"):
        ncut(fused, fused > 0.5, size=(5, 5))


def test_signatures_are_keyword_only_with_defaults_and_choices_match():
    for name, refiner in REFINERS.items():
        fn = refiner.fn
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["fused", "mask"]
        assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])
        assert all(p.default is not p.empty for p in params[3:]) and params[3].name == "features"
        assert name in CHOICES
        for opt, valid in CHOICES[name].items():
            assert inspect.signature(fn).parameters[opt].default in valid


def test_deterministic_and_inputs_untouched():
    x, fused = _structured(6, g=20)
    mask = fused > 0.6
    copies = [a.copy() for a in (x, fused, mask)]
    kw = dict(size=(50, 40), features=x, instances=2, position_weight=0.3, prior_weight=0.2)
    a, b = ncut(fused, mask, **kw), ncut(fused, mask, **kw)
    assert len(a) == len(b) >= 1 and all(np.array_equal(p, q) for p, q in zip(a, b))
    assert all(np.array_equal(c, o) for c, o in zip(copies, (x, fused, mask)))
    y1, _ = ncut_bipartition(x.reshape(400, -1))
    y2, _ = ncut_bipartition(x.reshape(400, -1))
    assert np.array_equal(y1, y2)


def test_empty_mask_gives_no_instance():
    x, fused = _structured(7)
    assert ncut(fused, np.zeros(fused.shape, bool), size=(9, 9), features=x) == []


def test_one_cut_keeps_every_overlapping_component_with_components_overlap():
    fused = np.where(THREE[..., 0] > 0, 0.0, 0.9)
    (out,) = ncut(fused, fused > 0.5, size=(10, 10), features=THREE)
    assert np.array_equal(out, THREE[..., 0] == 0)


def test_max_overlap_drops_instances_that_overlap_earlier_ones():
    fused = np.where(THREE[..., 0] > 0, 0.0, 0.9)
    kw = dict(size=(10, 10), features=THREE, instances=3, components="largest", combine="union")
    assert len(ncut(fused, fused > 0.5, **kw)) == 1  # every instance contains the whole explanation
    assert len(ncut(fused, fused > 0.5, max_overlap=1.0, **kw)) == 3


def test_lanczos_and_dense_refine_alike():
    x, fused = _structured(8, g=16)
    kw = dict(size=(40, 48), features=x, instances=2, position_weight=0.5, prior_weight=0.3)
    a = ncut(fused, fused > 0.6, solver="lanczos", **kw)
    b = ncut(fused, fused > 0.6, solver="dense", **kw)
    assert len(a) == len(b) >= 1 and all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("n", [2, 3, 7, 8, 30])
def test_degenerate_graphs_do_not_fail(n):
    for x in (np.ones((n, 4)), np.zeros((n, 4))):  # complete graph; graph of eps only
        y, split = ncut_bipartition(x)
        assert y.shape == (n,) and np.isfinite(y).all() and np.isfinite(split)
    with pytest.raises(ValueError, match="at least 2"):
        ncut_bipartition(np.ones((1, 4)))


def test_structureless_graph_falls_back_to_the_thresholded_explanation():
    x = np.random.default_rng(0).standard_normal((4, 4, 8)) * 0.01 + 1.0  # every pair linked: W constant
    assert (affinity(x.reshape(16, -1)) == 1).all()
    fused = np.where(BLOCK[:4, :4], 0.9, 0.1)
    out = ncut(fused, fused > 0.5, size=(8, 12), features=x, instances=3)
    assert len(out) == 1 and np.array_equal(out[0], none(fused, fused > 0.5, size=(8, 12))[0])


def test_foreground_mean_does_not_favour_the_larger_side():
    fused = np.where(THREE[..., 0] > 0, 0.1, 0.9)  # background mass 64 x 0.1 beats the 6-token block's 5.4
    kw = dict(size=(10, 10), features=THREE, instances=3, components="largest")
    assert len(ncut(fused, fused > 0.5, **kw)) == 2
    out = ncut(fused, fused > 0.5, foreground="mean", **kw)
    assert sorted(m.tolist() for m in out) == sorted(m.tolist() for m in THREE_MASKS)


def test_ncut_on_a_coarser_feature_grid_keeps_a_mask_when_no_area_mean_reaches_the_level():
    """Regression (issue 18): a sparse 32 x 32 map (a few bright pixels) cut by Otsu, refined on a 4 x 4 feature
    grid: every area mean is below the level chosen on the 32 x 32 grid, which used to give no mask at all."""
    f = np.zeros((32, 32))
    f[9, 9] = f[10, 12] = f[12, 10] = 1.0  # all inside the token (1, 1) of the 4 x 4 grid
    feats = np.zeros((4, 4, 2))
    feats[..., 1] = 1.0
    feats[0:2, 0:2] = [1.0, 0.0]
    out = ncut(f, f > 0.5, size=(32, 32), features=feats, tau=0.5)
    assert len(out) == 1 and out[0][:16, :16].mean() > 0.9 and not out[0][20:, 20:].any()
