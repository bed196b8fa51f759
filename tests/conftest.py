import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_vit():
    """A tiny random timm ViT (2 blocks, 32 px, patch 8): fast, no download."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=5).eval()


@pytest.fixture(scope="session")
def tiny_card(tmp_path_factory):
    """A segfromxai model card for a tiny random ViT (32 px, patch 8, 2 blocks) over the synth classes."""
    import timm
    from safetensors.torch import save_file

    from segfromxai.models.model import Preprocess, write_card
    from segfromxai.quality.synth import CLASSES

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": len(CLASSES)}
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    folder = tmp_path_factory.mktemp("tiny_model")
    save_file(m.state_dict(), str(folder / "model.safetensors"))
    pre = Preprocess(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return write_card(folder / "card.json", {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": kwargs,
                                              "classes": list(CLASSES), "preprocess": pre.to_dict(),
                                              "weights": "model.safetensors"})


@pytest.fixture(scope="session")
def synth_images(tmp_path_factory):
    """Twelve 48 px synth scenes (images/, annotations.json, labels.csv)."""
    from segfromxai.quality.synth import write_synth

    return write_synth(tmp_path_factory.mktemp("synth"), 12, seed=3, size=48)


def docs_text():
    """README.md and every docs/*.md, joined: the project's documentation as one text."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    pages = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    return "\n".join(p.read_text() for p in pages)


def invoke(*args):
    """``segfromxai ARGS...`` through click's CliRunner (arguments as strings, exceptions not caught)."""
    from click.testing import CliRunner

    from segfromxai.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    """The one ``Error:`` line of a usage error, checked to be the only one and without a traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture()
def images(tmp_path, synth_images):
    """A copy of the twelve synth images in ``tmp_path/images`` (tests may add or break files there)."""
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(synth_images / "images", folder)
    return folder


@pytest.fixture()
def messy_images(images):
    """The synth images plus a truncated PNG, an empty file and a text file named .jpg (what a folder of photos
    holds: every command must report and skip the three)."""
    good = sorted(images.glob("*.png"))[0].read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("this is not an image\n")
    return images


# a student trained in seconds: the tiny ViT at its own 32 px, float32 on every CPU
STUDENT_FAST = dict(epochs=3, batch_size=8, lr=0.05, img_size=0, trunk_dtype="float32")


def coco_anns(path) -> list[tuple]:
    """A COCO file's annotations as comparable tuples: (file name, category, RLE counts, score to 6 places)."""
    import json

    doc = json.loads(path.read_text())
    names = {i["id"]: i["file_name"] for i in doc["images"]}
    return [(names[a["image_id"]], a["category_id"], a["segmentation"]["counts"], round(a["score"], 6))
            for a in doc["annotations"]]


def outlier_tokens(n: int = 16, g: int = 4):
    """Known-answer tokens (one view) whose label is the sign of a small channel (+-0.01) beside a channel of noise
    1000 times larger, as a ViT's inner blocks have a few such channels: (Tokens, uint8 labels (n, g, g))."""
    import numpy as np

    from segfromxai.student.tokens import Tokens

    rng = np.random.default_rng(0)
    fg = rng.integers(0, 2, (n, g, g)).astype(np.uint8)
    grid = np.stack([np.where(fg == 1, 0.01, -0.01), rng.normal(0, 10.0, (n, g, g))], -1)
    tokens = Tokens([f"{i}.png" for i in range(n)], [(g, g)] * n, torch.tensor(grid[:, None], dtype=torch.float16),
                    np.zeros((n, 0), np.float32))
    return tokens, fg


@pytest.fixture(scope="module")
def tiny_model(tiny_card):
    """The tiny random ViT of ``tiny_card``, loaded."""
    from segfromxai.models.model import load_model

    return load_model(checkpoint=tiny_card)


@pytest.fixture(scope="module")
def tiny_run(tiny_model, synth_images, tmp_path_factory):
    """The default recipe run with the tiny ViT over the twelve synth images."""
    from segfromxai.recipe.recipe import load_recipe
    from segfromxai.run.local import run

    out = tmp_path_factory.mktemp("run")
    run(load_recipe("default"), synth_images / "images", out, model=tiny_model, batch_size=4)
    return out
