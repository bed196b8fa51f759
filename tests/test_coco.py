import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segfromxai.io import coco, png, yolo
from segfromxai.ops import masks
from segfromxai.run.manifest import Manifest

CATEGORIES = [{"id": 1, "name": "cat", "supercategory": "animal"},
              {"id": 2, "name": "dog", "supercategory": "animal"},
              {"id": 3, "name": "bird \"b\"", "supercategory": "animal"}]
INFO = {"description": "test", "recipe": {"explainer": "gradcam"}, "versions": {"segfromxai": "0.1.0"}}

# (id, file_name, height, width, number of annotations)
IMAGES = [(3, "a.jpg", 20, 30, 2), (7, "sub/b.png", 17, 11, 0), (1, "c.jpeg", 32, 32, 3),
          (10, "sub/deep/d.jpg", 9, 25, 1), (4, "e.jpg", 24, 13, 1)]


def _random_mask(rng, h, w):
    m = np.zeros((h, w), bool)
    while not m.any():
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        m[y0:y1, x0:x1] = True
        m &= rng.random((h, w)) < 0.9  # ragged edges and small holes
    return m


def make_records(seed=0):
    """Records plus the original masks, keyed by (image id, annotation index)."""
    rng = np.random.default_rng(seed)
    records, originals = [], {}
    for image_id, name, h, w, n in IMAGES:
        anns = []
        for j in range(n):
            m = _random_mask(rng, h, w)
            originals[image_id, j] = m
            anns.append({"category_id": int(rng.integers(1, 4)), "segmentation": masks.encode(m),
                         "score": float(rng.random()), "attributes": {"explainer": "gradcam", "part": j}})
        records.append({"image": {"id": image_id, "file_name": name, "height": h, "width": w, "extra": "kept"},
                        "annotations": anns})
    return records, originals


def _factory(records):
    def gen():
        yield from records
    return gen


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).rglob(".*.tmp"))


def test_write_coco_round_trip(tmp_path):
    records, originals = make_records()
    path = tmp_path / "ann.json"
    counts = coco.write_coco(path, _factory(records), categories=CATEGORIES, info=INFO)
    assert counts == {"images": 5, "annotations": 7}
    assert _leftovers(tmp_path) == []
    raw = json.loads(path.read_text())
    assert list(raw) == ["info", "licenses", "images", "annotations", "categories"]
    assert raw["info"] == INFO and raw["licenses"] == [] and raw["categories"] == CATEGORIES
    assert [im["extra"] for im in raw["images"]] == ["kept"] * 5

    gt = COCO(str(path))
    assert sorted(gt.getImgIds()) == sorted(i[0] for i in IMAGES)
    anns = raw["annotations"]
    assert [a["id"] for a in anns] == list(range(1, 8))
    seen = {}
    for a in anns:
        assert a["iscrowd"] == 0
        assert isinstance(a["segmentation"]["counts"], str)
        assert isinstance(a["score"], float) and a["attributes"]["explainer"] == "gradcam"
        img = gt.imgs[a["image_id"]]
        m = gt.annToMask(gt.anns[a["id"]]).astype(bool)
        assert m.shape == (img["height"], img["width"]) and m.any()
        j = seen.setdefault(a["image_id"], 0)
        seen[a["image_id"]] += 1
        assert a["attributes"]["part"] == j
        np.testing.assert_array_equal(m, originals[a["image_id"], j])
        assert a["area"] == int(m.sum()) == masks.area(a["segmentation"])
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                             float(ys.max() - ys.min() + 1)]
        assert a["bbox"] == masks.bbox(a["segmentation"])
    # images without annotations are still listed
    assert gt.getAnnIds(imgIds=[7]) == []


def test_write_coco_licenses_and_bytes_counts(tmp_path):
    records, _ = make_records(1)
    records[0]["annotations"][0]["segmentation"]["counts"] = records[0]["annotations"][0]["segmentation"][
        "counts"].encode()
    coco.write_coco(tmp_path / "a.json", lambda: iter(records), categories=CATEGORIES, info={},
                    licenses=[{"id": 1, "name": "CC-BY"}])
    raw = json.loads((tmp_path / "a.json").read_text())
    assert raw["licenses"] == [{"id": 1, "name": "CC-BY"}]
    assert isinstance(raw["annotations"][0]["segmentation"]["counts"], str)


def _empty_mask_records():
    records, _ = make_records()
    bad = records[2]["annotations"][1]
    bad["segmentation"] = masks.encode(np.zeros((32, 32), bool))
    return records


@pytest.mark.parametrize("existing", [False, True])
def test_write_coco_empty_mask_raises_and_leaves_nothing(tmp_path, existing):
    path = tmp_path / "ann.json"
    if existing:
        path.write_text("old content")
    records = _empty_mask_records()
    with pytest.raises(ValueError, match="empty mask"):
        coco.write_coco(path, _factory(records), categories=CATEGORIES, info=INFO)
    assert _leftovers(tmp_path) == []
    if existing:
        assert path.read_text() == "old content"
    else:
        assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ann.json"] if existing else [])


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r[0]["annotations"][0].update(segmentation=masks.encode(np.ones((30, 20), bool))), "size"),
    (lambda r: r[0]["annotations"][0].update(category_id=9), "category_id 9"),
    (lambda r: r[0]["annotations"][0].update(id=5), "already has"),
    (lambda r: r[1]["image"].update(id=3), "duplicate image id"),
    (lambda r: r[0]["annotations"][0].pop("score"), "score"),
    (lambda r: r[0]["annotations"][0].update(score=float("nan")), "finite"),
    (lambda r: r[0]["image"].pop("height"), "height"),
])
def test_write_coco_rejects(tmp_path, mutate, match):
    records, _ = make_records()
    mutate(records)
    with pytest.raises(ValueError, match=match):
        coco.write_coco(tmp_path / "x.json", _factory(records), categories=CATEGORIES, info=INFO)
    assert list(tmp_path.iterdir()) == []


def test_write_coco_needs_fresh_iterables(tmp_path):
    records, _ = make_records()
    gen = iter(records)
    with pytest.raises(ValueError, match="second call"):
        coco.write_coco(tmp_path / "x.json", lambda: gen, categories=CATEGORIES, info=INFO)
    with pytest.raises(TypeError, match="callable"):
        coco.write_coco(tmp_path / "x.json", records, categories=CATEGORIES, info=INFO)
    assert list(tmp_path.iterdir()) == []


def test_write_coco_calls_factory_twice_and_streams(tmp_path):
    records, _ = make_records()
    calls = []

    def factory():
        calls.append(1)
        return (r for r in records)

    coco.write_coco(tmp_path / "x.json", factory, categories=CATEGORIES, info=INFO)
    assert len(calls) == 2


def _write_images(folder, records):
    rng = np.random.default_rng(0)
    for r in records:
        im = r["image"]
        p = Path(folder) / im["file_name"]
        p.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(p, format="PNG")  # PNG content whatever the suffix: PIL sniffs it


def test_torchvision_reads_it(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    records, originals = make_records()
    ann_file = tmp_path / "ann.json"
    coco.write_coco(ann_file, _factory(records), categories=CATEGORIES, info=INFO)
    _write_images(tmp_path / "images", records)
    ds = torchvision.datasets.wrap_dataset_for_transforms_v2(
        torchvision.datasets.CocoDetection(str(tmp_path / "images"), str(ann_file)),
        target_keys=("image_id", "boxes", "labels", "masks"))
    by_id = {r["image"]["id"]: r for r in records}
    assert len(ds) == len(records)
    for idx in range(len(ds)):
        _, target = ds[idx]
        rec = by_id[target["image_id"]]
        h, w = rec["image"]["height"], rec["image"]["width"]
        n = len(rec["annotations"])
        if n == 0:  # torchvision gives only the image id for an image without annotations
            assert set(target) == {"image_id"}
            continue
        assert tuple(target["masks"].shape) == (n, h, w)
        assert target["labels"].tolist() == [a["category_id"] for a in rec["annotations"]]
        for j in range(n):
            np.testing.assert_array_equal(target["masks"][j].numpy().astype(bool), originals[target["image_id"], j])
            x, y, bw, bh = masks.bbox(rec["annotations"][j]["segmentation"])
            np.testing.assert_allclose(target["boxes"][j].tolist(), [x, y, x + bw, y + bh])


def test_write_results_and_cocoeval(tmp_path, capsys):
    records, _ = make_records()
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    coco.write_coco(gt_path, _factory(records), categories=CATEGORIES, info=INFO)
    assert coco.write_results(res_path, _factory(records)) == 7
    assert coco.write_results(tmp_path / "res2.json", iter(records)) == 7
    raw = json.loads(res_path.read_text())
    assert all(set(r) == {"image_id", "category_id", "segmentation", "score"} for r in raw)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in raw)
    gt = COCO(str(gt_path))
    dt = gt.loadRes(str(res_path))
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    assert _leftovers(tmp_path) == []


def test_write_results_empty_mask_raises(tmp_path):
    with pytest.raises(ValueError, match="empty mask"):
        coco.write_results(tmp_path / "r.json", _empty_mask_records())
    assert list(tmp_path.iterdir()) == []


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return masks.encode(m)


def _png_records():
    return [
        {"image": {"id": 1, "file_name": "x/y/one.jpg", "height": 6, "width": 8},
         "annotations": [
             {"category_id": 1, "segmentation": _rect(6, 8, 0, 3, 0, 4), "score": 0.9, "attributes": {}},
             {"category_id": 2, "segmentation": _rect(6, 8, 2, 5, 3, 7), "score": 0.5, "attributes": {}},
             {"category_id": 2, "segmentation": _rect(6, 8, 4, 6, 5, 8), "score": 0.7, "attributes": {}},
         ]},
        {"image": {"id": 2, "file_name": "two.png", "height": 3, "width": 4}, "annotations": []},
    ]


def test_export_png(tmp_path):
    assert png.export_png(tmp_path / "out", _png_records()) == 2
    one = cv2.imread(str(tmp_path / "out/x/y/one.jpg.png"), cv2.IMREAD_UNCHANGED)
    assert one.dtype == np.uint8 and one.shape == (6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[0:3, 0:4] = 1
    expected[2:5, 3:7] = 2
    expected[4:6, 5:8] = 2  # same-class overlap stays 2
    expected[2, 3] = 255  # the only cat/dog overlap
    np.testing.assert_array_equal(one, expected)
    two = cv2.imread(str(tmp_path / "out/two.png.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(two, np.zeros((3, 4), np.uint8))
    assert _leftovers(tmp_path) == []


def test_export_png_highest_score_wins(tmp_path):
    png.export_png(tmp_path, _png_records(), ignore_overlap=False)
    one = np.asarray(Image.open(tmp_path / "x/y/one.jpg.png"))
    assert one[2, 3] == 1  # cat scores 0.9 > dog 0.5
    assert 255 not in one


def test_export_png_rejects(tmp_path):
    recs = _png_records()
    recs[0]["annotations"][0]["category_id"] = 255
    with pytest.raises(ValueError, match="1..254"):
        png.export_png(tmp_path, recs)
    recs = _png_records()
    recs[1]["image"]["file_name"] = "../escape.png"
    with pytest.raises(ValueError, match="relative"):
        png.export_png(tmp_path / "o", recs)
    recs = _png_records()
    recs[1]["image"]["file_name"] = "x/y/one.jpg"
    with pytest.raises(ValueError, match="same label file"):
        png.export_png(tmp_path / "p", recs)


def test_export_collision_a_png_beside_a_jpg_and_a_backslash_name_get_their_own_files(tmp_path):
    recs = _png_records()
    recs[1]["image"]["file_name"] = "x/y/one.png"  # beside x/y/one.jpg
    assert png.export_png(tmp_path / "p", recs) == 2
    assert sorted(p.name for p in (tmp_path / "p/x/y").iterdir()) == ["one.jpg.png", "one.png.png"]
    recs = _png_records()
    recs[0]["image"]["file_name"], recs[1]["image"]["file_name"] = "sub/b.png", "sub\\b.png"
    assert png.export_png(tmp_path / "q", recs) == 2
    assert (tmp_path / "q/sub/b.png.png").is_file() and (tmp_path / "q/sub\\b.png.png").is_file()
    assert coco.export_name("sub/a.jpg", ".npz").as_posix() == "sub/a.jpg.npz"


def test_export_yolo(tmp_path):
    recs = _png_records()
    recs[0]["annotations"][1]["category_id"] = 3
    assert yolo.export_yolo(tmp_path, recs, categories=CATEGORIES) == 2
    split = {r["image"]["file_name"]: "val" if yolo.yolo_split_key(r["image"]["file_name"]) < 0.1 else "train"
             for r in recs}
    if len(set(split.values())) == 1:  # two images: each split gets one, the smallest key goes to val
        split[min(split, key=yolo.yolo_split_key)] = "val"
        split[max(split, key=yolo.yolo_split_key)] = "train"
    lines = (tmp_path / f"labels/{split['x/y/one.jpg']}/x/y/one.txt").read_text().splitlines()
    assert len(lines) == 3
    parsed = [(int(line.split()[0]), np.array(line.split()[1:], float).reshape(-1, 2)) for line in lines]
    assert [c for c, _ in parsed] == [0, 2, 1]  # cat -> 0, bird -> 2, dog -> 1
    for line in lines:
        assert all(len(v.split(".")[1]) == 6 for v in line.split()[1:])
    h, w = 6, 8
    for (cls, xy), (y0, y1, x0, x1) in zip(parsed, [(0, 3, 0, 4), (2, 5, 3, 7), (4, 6, 5, 8)]):
        assert ((xy >= 0) & (xy <= 1)).all()
        corners = {(round(x * w, 4), round(y * h, 4)) for x, y in xy}
        assert corners == {(x0, y0), (x1 - 1, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)}
    assert (tmp_path / f"labels/{split['two.png']}/two.txt").read_text() == ""
    yaml = (tmp_path / "data.yaml").read_text()
    assert "nc: 3\n" in yaml
    assert 'names:\n  0: "cat"\n  1: "dog"\n  2: "bird \\"b\\""\n' in yaml
    assert "lossy" in yaml and "holes" in yaml
    assert "No images were linked" in yaml and not (tmp_path / "images").exists()  # labels only without images=
    assert _leftovers(tmp_path) == []


def _split_by_hand(name, fraction):
    """The documented split rule, re-implemented: SHA-1 of "val:" + name, first 8 bytes over 2**64."""
    import hashlib

    return "val" if int(hashlib.sha1(f"val:{name}".encode()).hexdigest()[:16], 16) / 2 ** 64 < fraction else "train"


def _yolo_source(folder, names):
    recs = []
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8, 3), k, np.uint8)).save(folder / name)
        recs.append({"image": {"id": k + 1, "file_name": name, "height": 6, "width": 8},
                     "annotations": [{"category_id": 1, "segmentation": _rect(6, 8, 1, 4, 1, 5), "score": 0.5}]})
    return recs


def test_export_yolo_links_images_into_a_held_out_split_that_trains_from_anywhere(tmp_path):
    src = tmp_path / "src"
    names = [f"d{k % 3}/img{k:03d}.png" for k in range(60)]
    recs = _yolo_source(src, names)
    out = tmp_path / "yolo"
    assert yolo.export_yolo(out, recs, categories=CATEGORIES, images=src, val_fraction=0.2) == 60
    want = {n: _split_by_hand(n, 0.2) for n in names}
    assert 4 <= sum(s == "val" for s in want.values()) <= 20  # the hash spreads names: about 12 of 60
    for n, split in want.items():
        image, label = out / "images" / split / n, (out / "labels" / split / n).with_suffix(".txt")
        assert label.exists() and image.exists() and not image.is_symlink()
        assert os.path.samefile(image, src / n)  # a hard link: no bytes copied
        other = "train" if split == "val" else "val"
        assert not (out / "images" / other / n).exists()
    yaml = (out / "data.yaml").read_text()
    assert f"path: {json.dumps(str(out.resolve()))}\n" in yaml
    assert "train: images/train\n" in yaml and "val: images/val\n" in yaml and "0.2" in yaml
    # an export of fewer images removes the files of the images it no longer holds
    yolo.export_yolo(out, recs[:30], categories=CATEGORIES, images=src, val_fraction=0.2)
    left = {p.relative_to(out / "images").as_posix().split("/", 1)[1] for p in (out / "images").rglob("*.png")}
    assert left == set(names[:30])
    assert len(list((out / "labels").rglob("*.txt"))) == 30


def test_export_yolo_copies_when_links_fail_and_keeps_one_image_per_split(tmp_path, monkeypatch):
    src = tmp_path / "src"
    recs = _yolo_source(src, ["a.png", "b.png"])

    def no_link(a, b):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    assert yolo.link_or_copy(src / "a.png", tmp_path / "c/a.png") == "copy"
    assert not os.path.samefile(src / "a.png", tmp_path / "c/a.png")
    assert (tmp_path / "c/a.png").read_bytes() == (src / "a.png").read_bytes()
    yolo.export_yolo(tmp_path / "y", recs, categories=CATEGORIES, images=src, val_fraction=0.0)
    val = [p.name for p in (tmp_path / "y/images/val").iterdir()]
    assert val == [min(["a.png", "b.png"], key=yolo.yolo_split_key)]  # 2 images: val is never empty
    assert len(list((tmp_path / "y/images/train").iterdir())) == 1
    yolo.export_yolo(tmp_path / "one", recs[:1], categories=CATEGORIES, images=src)
    assert "val: images/train\n" in (tmp_path / "one/data.yaml").read_text()  # one image: nothing to hold out
    with pytest.raises(FileNotFoundError, match="missing.png"):
        yolo.export_yolo(tmp_path / "z", [{"image": {"id": 1, "file_name": "missing.png", "height": 6, "width": 8},
                                           "annotations": []}], categories=CATEGORIES, images=src)
    with pytest.raises(ValueError, match="val_fraction"):
        yolo.export_yolo(tmp_path / "z", recs, categories=CATEGORIES, val_fraction=1.0)


def test_export_yolo_unknown_category(tmp_path):
    recs = _png_records()
    with pytest.raises(ValueError, match="category_id 2"):
        yolo.export_yolo(tmp_path, recs, categories=CATEGORIES[:1])


# --- Manifest -------------------------------------------------------------------------------------------------------


def test_manifest_round_trip_and_torn_line(tmp_path):
    path = tmp_path / "run.jsonl"
    m = Manifest(path)
    assert m.read() == (None, [])
    with m.open({"recipe": "gradcam"}) as opened:
        assert opened is m
        assert m.header == {"manifest": 1, "recipe": "gradcam"}
        m.append([{"file_name": "a.jpg", "n": 1}, {"file_name": "b.jpg", "n": 0}])
        m.append([])
    assert path.read_text().splitlines()[0] == '{"manifest":1,"recipe":"gradcam"}'
    assert path.read_text().splitlines()[1] == '{"file_name":"a.jpg","n":1}'

    with open(path, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"file_name":"c.j')
    header, recs = Manifest(path).read()
    assert header == {"manifest": 1, "recipe": "gradcam"}
    assert [r["file_name"] for r in recs] == ["a.jpg", "b.jpg"]

    with Manifest(path).open({"recipe": "other"}) as m2:
        assert m2.header == {"manifest": 1, "recipe": "gradcam"}  # the stored header wins; caller compares
        assert path.read_bytes().endswith(b'"n":0}\n')  # torn line truncated
        m2.append([{"file_name": "c.jpg", "n": 2}])
    header, recs = Manifest(path).read()
    assert [r["file_name"] for r in recs] == ["a.jpg", "b.jpg", "c.jpg"]
    assert len(path.read_text().splitlines()) == 4


def test_manifest_unparseable_terminated_last_line_is_torn(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"manifest":1}\n{"a":1}\n\x00\x00\x00\n')
    assert Manifest(path).read() == ({"manifest": 1}, [{"a": 1}])
    with Manifest(path).open({}) as m:
        m.append([{"a": 2}])
    assert path.read_bytes() == b'{"manifest":1}\n{"a":1}\n{"a":2}\n'


def test_manifest_complete_line_without_newline_is_torn(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"manifest":1}\n{"a":1}')
    assert Manifest(path).read() == ({"manifest": 1}, [])


def test_manifest_torn_header_is_rewritten(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"manif')
    assert Manifest(path).read() == (None, [])
    with Manifest(path).open({"x": 1}) as m:
        assert m.header == {"manifest": 1, "x": 1}
    assert path.read_bytes() == b'{"manifest":1,"x":1}\n'


def test_manifest_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"manifest":1}\n{"a":1}\n{"a":\n{"a":3}\n')
    with pytest.raises(ValueError, match="line 3"):
        Manifest(path).read()
    with pytest.raises(ValueError, match="line 3"):
        Manifest(path).open({})
    path.write_bytes(b'{"not":"a header"}\n')
    with pytest.raises(ValueError, match="header"):
        Manifest(path).read()


def test_manifest_append_requires_open_and_dicts(tmp_path):
    m = Manifest(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="not open"):
        m.append([{"a": 1}])
    with m.open({}):
        with pytest.raises(ValueError):
            m.append([{"a": 1}, "nope"])
        with pytest.raises(ValueError):
            m.append([{"a": float("nan")}])
    assert Manifest(m.path).read() == ({"manifest": 1}, [])


# --- atomic_write ---------------------------------------------------------------------------------------------------


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with coco.atomic_write(path) as f:
            f.write("new half")
            assert any(p.name.startswith(f".f.txt.{os.getpid()}.") for p in tmp_path.iterdir())
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_replaces(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with coco.atomic_write(path, "wb") as f:
        f.write(b"\x00new")
        assert path.read_bytes() == b"old"  # not visible until the block ends
    assert path.read_bytes() == b"\x00new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(ValueError):
        with coco.atomic_write(path, "a"):
            pass
