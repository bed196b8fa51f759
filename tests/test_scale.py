"""Sharded runs, merge, worker processes, and streamed manifests."""

import json

import pytest
from pycocotools.coco import COCO

from segfromxai.run.outdir import merge, records
from segfromxai.run.manifest import Manifest
from segfromxai.models.model import load_model
from segfromxai.run.local import run, shard_of
from segfromxai.recipe.recipe import load_recipe
from conftest import invoke

def content(out):
    """Annotations without ids: (file name, category, RLE counts, score), and the images' file names."""
    coco = COCO(str(out / "pseudo_labels.json"))
    anns = sorted((coco.imgs[a["image_id"]]["file_name"], a["category_id"], a["segmentation"]["counts"],
                   round(a["score"], 6)) for a in coco.dataset["annotations"])
    return anns, sorted(im["file_name"] for im in coco.dataset["images"])


def test_shards_partition_the_images_by_a_stable_hash():
    names = [f"dir/{i:04d}.png" for i in range(400)]
    counts = [sum(shard_of(n, 4) == s for n in names) for s in range(4)]
    assert sum(counts) == 400 and min(counts) > 70  # every image in exactly one shard, roughly balanced
    assert shard_of("dir/0001.png", 4) == shard_of("dir/0001.png", 4)


def test_four_shards_merged_equal_one_unsharded_run(tmp_path, synth_images, tiny_card):
    images = synth_images / "images"
    assert invoke("run", "default", "--images", images, "--out", tmp_path / "all", "--checkpoint", tiny_card,
                  "--batch-size", 3).exit_code == 0
    for s in range(4):
        r = invoke("run", "default", "--images", images, "--out", tmp_path / f"part{s}", "--checkpoint", tiny_card,
                   "--batch-size", 3, "--shard", s, "--num-shards", 4)
        assert r.exit_code == 0, r.output
    parts = [tmp_path / f"part{s}" for s in range(4)]
    r = invoke("merge", *parts, "--out", tmp_path / "merged")
    assert r.exit_code == 0, r.output
    assert content(tmp_path / "merged") == content(tmp_path / "all")
    merged = json.loads((tmp_path / "merged" / "run.json").read_text())
    assert merged["counts"]["found"] == 12 and merged["missing_shards"] == []
    # a merge from fewer parts says which shards are missing; ids stay unique
    summary = merge(parts[:3], tmp_path / "three")
    assert summary["missing_shards"] == [3]
    idx = merge(parts, tmp_path / "index", index_only=True)
    assert len(idx["parts"]) == 4 and (tmp_path / "index" / "index.json").exists()


def test_merge_refuses_parts_of_different_runs(tmp_path, synth_images, tiny_card):
    images = synth_images / "images"
    model = load_model(checkpoint=tiny_card)
    run(load_recipe("vitmix/gradcam"), images, tmp_path / "a", model=model, shard=(0, 2), limit=4)
    run(load_recipe("vitmix/rollout"), images, tmp_path / "b", model=model, shard=(1, 2), limit=4)
    run(load_recipe("vitmix/gradcam"), images, tmp_path / "c", model=model, shard=(0, 2), limit=4)
    with pytest.raises(ValueError, match="differs in recipe"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m1")
    with pytest.raises(ValueError, match="different shards"):
        merge([tmp_path / "a", tmp_path / "c"], tmp_path / "m2")
    r = invoke("run", "default", "--images", images, "--out", tmp_path / "d", "--shard", 2)
    assert r.exit_code != 0 and "--num-shards" in r.output


def test_worker_processes_give_the_same_output(tmp_path, synth_images, tiny_card):
    model = load_model(checkpoint=tiny_card)
    recipe = load_recipe("default")
    run(recipe, synth_images / "images", tmp_path / "w0", model=model, batch_size=4)
    summary = run(recipe, synth_images / "images", tmp_path / "w2", model=model, batch_size=4, workers=2)
    assert summary["workers"] == 2 and summary["counts"]["found"] == 12
    assert content(tmp_path / "w2") == content(tmp_path / "w0")


def test_manifest_records_are_streamed_and_merged_in_index_order(tmp_path):
    a, b = Manifest(tmp_path / "a.jsonl"), Manifest(tmp_path / "b.jsonl")
    with a.open({"x": 1}) as m:
        m.append([{"index": 0, "status": "ok"}, {"index": 3, "status": "failed"}])
        m.append([{"index": 5, "status": "ok"}])
    with b.open({"x": 1}) as m:
        m.append([{"index": 4, "status": "ok"}, {"index": 1, "status": "ok"}, {"index": 1, "status": "empty"}])
    assert a.read_header() == {"manifest": 1, "x": 1}
    it = a.records()
    assert next(it) == {"index": 0, "status": "ok"}  # a generator: nothing else read yet
    stream = records([a, b], ("ok", "empty"))
    assert [(r["index"], r["status"]) for r in stream()] == [(0, "ok"), (1, "ok"), (4, "ok"), (5, "ok")]
    assert [r["index"] for r in records([a, b], ("failed",))()] == [3]
