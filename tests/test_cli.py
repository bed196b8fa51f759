import re

from click.testing import CliRunner

from segfromxai import __version__
from segfromxai.cli import main
from segfromxai.catalog import names as registries


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_list_prints_every_registry_one_name_per_line_under_a_header():
    r = CliRunner().invoke(main, ["list"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    for title, names in registries().items():
        i = lines.index(f"{title}:")
        body = []
        for line in lines[i + 1:]:
            if not line.startswith("  "):
                break
            body.append(line.split()[0])
        assert body == (names or ["(none registered yet)"])


def test_list_marks_explainers_that_need_a_vit_or_a_head():
    lines = CliRunner().invoke(main, ["list"]).output.splitlines()
    start = {line.split("  [")[0] + ("  [" + line.split("  [")[1].split("]")[0] + "]" if "  [" in line else "")
             for line in lines}
    assert "  lrp  [needs ViT, head]" in start and "  gradcam  [needs head]" in start
    assert "  rollout  [needs ViT]" in start


def test_list_gives_every_entry_its_summary():
    from segfromxai.catalog import registries

    lines = CliRunner().invoke(main, ["list"]).output.splitlines()
    for registry in registries().values():
        for name, entry in registry.items():
            assert entry.summary and any(ln.split()[0] == name and ln.endswith(entry.summary) for ln in lines
                                         if ln.startswith("  ")), name


def test_every_command_and_registered_name_is_documented_in_the_readme():
    from conftest import docs_text

    readme = docs_text()  # README.md and docs/*.md
    for cmd in main.commands:
        assert re.search(rf"segfromxai {cmd}\b", readme), f"command {cmd!r} missing from README and docs/"
    for names in registries().values():
        for n in names:
            assert f"`{n}`" in readme, f"registered name {n!r} missing from README and docs/"


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "segfromxai", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout


def test_classify_reports_bad_files_and_goes_on(tmp_path):
    import numpy as np
    from PIL import Image
    import timm
    from safetensors.torch import save_file
    import json

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                          num_classes=2)
    ck = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(ck), metadata={"timm_name": "vit_tiny_patch16_224", "timm_kwargs": json.dumps(
        {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 2})})
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(img / "a.png")
    (img / "b.jpg").write_text("not an image")
    (img / "c.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("file_name,label\na.png,class_1\n")
    r = CliRunner().invoke(main, ["classify", "--images", str(img), "--checkpoint", str(ck), "--labels",
                                  str(tmp_path / "labels.csv"), "--out", str(tmp_path / "pred.csv")])
    assert r.exit_code == 0, r.output
    assert "classified 1 images (2 skipped)" in r.output
    assert "b.jpg: not an image" in r.output and "c.png: empty file" in r.output
    assert (tmp_path / "pred.csv").read_text().startswith("file_name,label,confidence\na.png,class_")
    assert re.search(r"^all\s+1\s+[01]\s", r.output, re.M)


def test_unknown_model_is_a_usage_error():
    r = CliRunner().invoke(main, ["classify", "--images", ".", "--model", "vit_smal_patch16_224"])
    assert r.exit_code == 2 and "did you mean" in r.output
