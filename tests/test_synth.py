import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segfromxai.cli import main
from segfromxai.quality.synth import CLASSES, make_scene, shape_mask, write_synth


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_synth_cli_output_loads_with_pycocotools(tmp_path, mode):
    out = tmp_path / "s"
    res = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "12", "--seed", "3", "--size", "96",
                                    "--mode", mode])
    assert res.exit_code == 0, res.output
    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == 12
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    per_image = 1 if mode == "single" else 2
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert len(anns) == per_image
        assert len({a["category_id"] for a in anns}) == per_image  # different classes in multi mode
        assert (out / "images" / img["file_name"]).is_file()
        union = np.zeros((img["height"], img["width"]), bool)
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            assert m.shape == (img["height"], img["width"]) and m.any()
            assert not (union & m).any(), "visible masks of two objects overlap"
            union |= m
            assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
            assert a["area"] == pytest.approx(m.sum())
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows[0] == "file_name,label" and len(rows) == 1 + 12 * per_image


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    write_synth(tmp_path / "a", 6, seed=11, size=64)
    write_synth(tmp_path / "b", 6, seed=11, size=64)
    write_synth(tmp_path / "c", 6, seed=12, size=64)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_scene_depends_only_on_seed_and_index():
    a, oa = make_scene(5, 7, 64)
    b, ob = make_scene(5, 7, 64)
    assert np.array_equal(a, b) and np.array_equal(oa[0].mask, ob[0].mask)


def test_scenes_cover_every_class_and_the_area_range():
    labels, areas = [], []
    for i in range(200):
        _, objs = make_scene(0, i, 64)
        labels.append(objs[0].label)
        areas.append(objs[0].mask.mean())
    assert set(labels) == set(range(len(CLASSES))) and len(CLASSES) >= 8
    areas = np.array(areas)
    assert areas.min() < 0.08 and areas.max() > 0.4  # about 5% to 60%
    assert areas.min() > 0.02 and areas.max() < 0.65


def test_object_colour_is_not_the_class():
    # mean object colour must carry (almost) no class information: a nearest-centroid classifier on colour fails
    feats, labels = [], []
    for i in range(240):
        img, objs = make_scene(1, i, 64)
        feats.append(img[objs[0].mask].mean(0))
        labels.append(objs[0].label)
    feats, labels = np.array(feats), np.array(labels)
    tr, te = slice(0, 160), slice(160, None)
    cents = np.stack([feats[tr][labels[tr] == k].mean(0) for k in range(len(CLASSES))])
    pred = np.argmin(((feats[te, None] - cents[None]) ** 2).sum(-1), 1)
    assert (pred == labels[te]).mean() < 0.3  # chance is 0.125


def test_some_objects_are_partly_occluded_and_none_mostly():
    fractions = [o.occluded_fraction for i in range(80) for o in make_scene(2, i, 96, "multi")[1]]
    assert sum(f > 0.01 for f in fractions) >= 10
    assert max(fractions) <= 0.4 + 1e-9


def test_shape_mask_rejects_unknown_name():
    with pytest.raises(ValueError, match="valid shapes: circle"):
        shape_mask("blob", 32, np.array([16.0, 16.0]), 10, 0.0)


def test_rle_round_trip_of_written_annotations(tmp_path):
    write_synth(tmp_path, 3, seed=4, size=48, mode="multi")
    coco = json.loads((tmp_path / "annotations.json").read_text())
    for a in coco["annotations"]:
        rle = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())
        m = mask_utils.decode(rle)
        assert m.sum() == a["area"]
        assert list(mask_utils.toBbox(rle)) == a["bbox"]
