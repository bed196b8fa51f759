"""One registration in EXPORTERS is enough for an output format: finish and merge write it, the name checks and
--overwrite know its files, the CLI accepts it as --format and `segfromxai list` shows it."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import segfromxai
import segfromxai.cli
from segfromxai.io.coco import export_stem, record_annotations, record_image
from segfromxai.io.exporters import EXPORTERS, Exporter
from segfromxai.ops import masks
from segfromxai.run import outdir
from segfromxai.run.manifest import Manifest

NAMES = ["a.jpg", "sub/b.png", "c.png"]
HEADER = {"recipe": "r", "model": "m", "targets": None, "classes": ["cat", "dog"], "resolved": {"name": "r"}}


def _count(folder, records, *, categories, images):
    """The test format: ``<folder>/<name without extension>.count`` holding the image's number of masks."""
    n = 0
    for record in records:
        target = Path(folder) / (export_stem(record_image(record)["file_name"]) + ".count")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{len(record_annotations(record))} {len(categories)}\n")
        n += 1
    return n


COUNT = Exporter(_count, "mask counts, one text file per image", folder="counts",
                 target=lambda n: export_stem(n) + ".count",
                 written=lambda rel, names, stems: rel.endswith(".count") and rel[:-6] in stems,
                 clash=" (counts drop the extension)")


def _record(i, name):
    m = np.zeros((6, 8), bool)
    m[1:4, 2:2 + i + 1] = True
    anns = [{"category_id": 1, "segmentation": masks.encode(m), "score": 0.9}] * (i % 2 + 1)
    return {"index": i, "file_name": name, "status": "ok",
            "image": {"id": i + 1, "file_name": name, "height": 6, "width": 8}, "annotations": anns}


def _parts(tmp_path):
    parts = []
    for s in range(2):
        part = tmp_path / f"part{s}"
        part.mkdir()
        with Manifest(part / "manifest.jsonl").open({**HEADER, "images": str(tmp_path), "shard": [s, 2]}) as m:
            m.append([_record(i, n) for i, n in enumerate(NAMES) if i % 2 == s])
        parts.append(part)
    return parts


@pytest.fixture
def count_format(monkeypatch):
    monkeypatch.setitem(EXPORTERS, "count", COUNT)


def _counts(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*.count"))}


def test_a_registered_format_is_written_by_merge_and_finish(tmp_path, count_format):
    summary = outdir.merge(_parts(tmp_path), tmp_path / "merged", formats=("count", "png"))
    assert summary["formats"] == ["coco", "count", "png"]
    assert _counts(tmp_path / "merged" / "counts") == {"a.count": "1 2\n", "sub/b.count": "2 2\n", "c.count": "1 2\n"}
    assert (tmp_path / "merged" / "png" / "sub" / "b.png.png").is_file()

    run = tmp_path / "run"
    run.mkdir()
    with Manifest(run / "manifest.jsonl").open({**HEADER, "images": str(tmp_path), "shard": None}) as m:
        m.append([_record(i, n) for i, n in enumerate(NAMES)])
    outdir.finish(run, [Manifest(run / "manifest.jsonl")], formats=("count",))
    assert len(_counts(run / "counts")) == 3 and not (run / "png").exists()


def test_a_registered_format_is_checked_before_labelling_and_removed_by_overwrite(tmp_path, count_format):
    outdir.check_export_names(["a.png", "a.jpg"], ())
    with pytest.raises(ValueError, match=r"a.png and a.jpg would both be written as counts/a.count: rename one "
                                         r"\(counts drop the extension\)"):
        outdir.check_export_names(["a.png", "a.jpg"], ("count",))
    with pytest.raises(ValueError, match="unknown format 'nope'; valid: coco, count, png, yolo"):
        outdir.check_export_names(NAMES, ("nope",))
    assert "counts" in outdir.run_dirs()

    run = tmp_path / "run"
    run.mkdir()
    header = {**HEADER, "images": str(tmp_path), "shard": None}
    with Manifest(run / "manifest.jsonl").open(header) as m:
        m.append([_record(i, n) for i, n in enumerate(NAMES)])
    outdir.finish(run, [Manifest(run / "manifest.jsonl")], formats=("count",))
    (run / "counts" / "mine.txt").write_text("not the run's")
    outdir.prepare_out(run, header, resume=False, overwrite=True).close()
    assert _counts(run / "counts") == {} and (run / "counts" / "mine.txt").is_file()


def test_a_registered_format_is_a_cli_choice_and_listed(tmp_path, count_format, monkeypatch):
    # The --format choices are read from EXPORTERS when the CLI module is imported: import it afresh (restored after).
    monkeypatch.setattr(segfromxai, "cli", segfromxai.cli)
    monkeypatch.delitem(sys.modules, "segfromxai.cli")
    main = importlib.import_module("segfromxai.cli").main
    lines = CliRunner().invoke(main, ["list"]).output.splitlines()
    assert [ln.split()[0] for ln in lines[lines.index("formats:") + 1:][:4]] == ["coco", "count", "png", "yolo"]

    r = CliRunner().invoke(main, ["merge", *map(str, _parts(tmp_path)), "--out", str(tmp_path / "m"),
                                  "--format", "count"])
    assert r.exit_code == 0, r.output
    assert len(_counts(tmp_path / "m" / "counts")) == 3
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "part0"), "--out", str(tmp_path / "n"), "--format", "nope"])
    assert r.exit_code != 0 and "'nope' is not one of 'coco', 'count', 'png', 'yolo'" in r.output


def test_the_cli_format_choices_are_the_registry():
    for cmd in ("run", "merge"):
        option = next(p for p in segfromxai.cli.main.commands[cmd].params if p.name == "formats")
        assert list(option.type.choices) == sorted(EXPORTERS) == ["coco", "png", "yolo"]
