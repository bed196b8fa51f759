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
