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
