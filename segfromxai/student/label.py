"""Labelling a folder with a trained student as ``run`` labels one (``segfromxai student predict``).

:func:`open_student` reloads a student from the folder ``segfromxai student`` wrote (its last round), a
``round_<r>`` folder or its ``card.json``: the trunk, the head and the :class:`~segfromxai.student.predict.Labeller`
its card keeps. :func:`label_folder` runs it over a folder through ``run``'s machinery: the images in sorted order,
in chunks of ``batch_size`` consecutive files, each chunk's records appended to the run's manifest in one write
(:mod:`segfromxai.run.outdir`), so a killed job resumes where it stopped and ends with the same files; an unreadable
image is recorded in ``failures.jsonl`` and skipped; the dataset files, exports and ``run.json`` come from
:func:`segfromxai.run.local.close_run`, as ``run`` writes them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..io.images import ImageLoadError, find_images, load_image
from ..models.features import Backbone
from ..models.model import LoadedModel, read_card
from ..run.local import Job, close_run, discarded_on_failure
from ..run.outdir import check_export_names, done_indices, prepare_out
from ..run.pipeline import Clock
from .config import StudentConfig, settings_key
from .data import read_annotations, read_run
from .predict import Labeller, make_labeller, predict, student_boundary
from .tokens import Tokens, batch_tokens, student_trunk, use_bf16
from .train import load_student


@dataclass(frozen=True)
class Student:
    """A trained student ready to label: the classifier (the image's category in binary mode), its trunk at the
    student's input size, the head, the labeller, the card (``path``) it came from, and whether its trunk runs under
    bfloat16 autocast (the card's ``trunk_dtype`` on this device; a card from before that setting: float32)."""

    model: LoadedModel
    trunk: Backbone
    head: nn.Module
    labeller: Labeller
    card: dict[str, Any]
    path: Path
    bf16: bool = False


def student_card(path: str | Path) -> Path:
    """The ``card.json`` of a student: ``path`` itself, the card in the folder ``path``, or in a ``student`` job
    folder, its last round's (the ``round_<r>`` with the highest ``r`` that holds a card). FileNotFoundError
    otherwise, naming what was looked for."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "card.json").is_file():
        return path / "card.json"
    rounds = [(int(m.group(1)), p) for p in path.glob("round_*")
              if (m := re.fullmatch(r"round_(\d+)", p.name)) and (p / "card.json").is_file()]
    if not rounds:
        raise FileNotFoundError(f"{path} holds no trained student: no card.json in it or in a round_<r> folder "
                                "(give the folder `segfromxai student` wrote, a round folder or its card.json)")
    return max(rounds)[1] / "card.json"


def card_labeller(card: dict[str, Any], model: LoadedModel, config: StudentConfig) -> Labeller:
    """The labeller a student's card keeps; a card written before cards kept it is rebuilt from its training run
    (which must still exist)."""
    if "labeller" in card:
        return Labeller.from_dict(card["labeller"])
    src = read_run(card["train_run"])
    anns, _, _ = read_annotations(src.coco)
    return make_labeller(model, src, anns, card["mode"], config)


def open_student(path: str | Path, *, boundary: str | None = None, device: str = "cpu") -> Student:
    """A trained student (see :func:`student_card`), its masks moved by ``boundary`` when given (a name in
    :data:`segfromxai.stages.boundary.BOUNDARIES`, ``none``: off; default: the card's, i.e. the training run's
    recipe's). ValueError for a card that is not a student's or whose trunk checkpoint is gone."""
    card_path = student_card(path)
    card = read_card(card_path)
    if card.get("kind") != "segfromxai-student":
        raise ValueError(f"{card_path} is a model card, not a student's (kind {card.get('kind')!r}); train one "
                         "with `segfromxai student`")
    trunk_source = str(card.get("trunk", ""))
    if trunk_source not in ("", "random-init", "timm-pretrained") and not Path(trunk_source).exists():
        raise ValueError(f"{card_path}: its trunk {trunk_source} is not on this machine")
    model, head, card = load_student(card_path, device=device)
    config = StudentConfig(**{"trunk_dtype": "float32", **card["config"]})
    lab = card_labeller(card, model, config)
    if boundary is not None:
        method, params = student_boundary({"method": lab.boundary, **lab.boundary_params}, boundary)
        config = dataclasses.replace(config, boundary=method)  # checks the name against BOUNDARIES
        lab = dataclasses.replace(lab, boundary=method, boundary_params=params,
                                  provenance={**lab.provenance, "boundary": method})
    trunk = student_trunk(model, config.img_size, pixels=config.pixels, blocks=config.blocks)
    return Student(model, trunk, head, lab, card, card_path, use_bf16(config.trunk_dtype, device))


def student_header(student: Student, images: Path) -> dict[str, Any]:
    """The manifest header of a student's labelling job: what must match to resume it (``recipe``: a digest of the
    student's weights, labeller and trunk precision, ``images``, ``model``), its categories and the resolved settings
    (``resolved``, the COCO ``info``'s ``recipe``: ``name``, ``student``, ``masks``, ``boundary``, so that the
    labels can train another student)."""
    lab, card = student.labeller, student.card
    resolved = {"name": "student", "student": {"card": str(student.path.resolve()), "round": card.get("round"),
                                               "head": card["config"]["head"], "mode": lab.mode,
                                               "img_size": card["config"]["img_size"], "soft": lab.soft,
                                               "blocks": card["config"].get("blocks", 1),
                                               "trunk_dtype": "bfloat16" if student.bf16 else "float32",
                                               "train_run": card.get("train_run")},
                "masks": dict(lab.mask_params), "boundary": {"method": lab.boundary, **lab.boundary_params}}
    digest = settings_key(card.get("weights_sha256"), card.get("key"), lab.to_dict(),
                          *(["bfloat16"] if student.bf16 else []))
    return {"recipe": digest, "images": str(images.resolve()), "model": student.model.source, "targets": {},
            "shard": None, "classes": [c["name"] for c in lab.categories], "categories": lab.categories,
            "resolved": resolved}


def label_chunk(student: Student, paths: list[Path], rels: list[str], chunk: list[int], clock: Clock) -> list[dict]:
    """Manifest records of one chunk: ``failed`` for an image that cannot be read (the reason kept), else ``ok``
    (with masks) or ``empty``, each with its COCO image (id = index + 1) and annotations."""
    records, ims, idx = [], [], []
    with clock("load"):
        for i in chunk:
            try:
                ims.append(load_image(paths[i]))
                idx.append(i)
            except Exception as e:  # one bad file never stops the job (as run's ChunkLoader)
                reason = e.reason if isinstance(e, ImageLoadError) else f"unexpected error ({e!r})"
                records.append({"index": i, "file_name": rels[i], "status": "failed", "reason": reason})
    if ims:
        with clock("trunk"), torch.no_grad():
            grid, probs = batch_tokens(student.model, student.trunk, ims, False, bf16=student.bf16)
        tokens = Tokens([rels[i] for i in idx], [im.shape[:2] for im in ims], grid, probs)
        with clock("masks"):
            got = predict(student.head, tokens, student.labeller, chunk=len(ims), guides=ims)
        for i, rec in zip(idx, got):
            anns = rec["annotations"]
            records.append({"index": i, "file_name": rels[i], "status": "ok" if anns else "empty",
                            "image": {**rec["image"], "id": i + 1}, "annotations": anns})
    return sorted(records, key=lambda r: r["index"])


def label_folder(student: Student, images: str | Path, out: str | Path, *, batch_size: int = 8,
                 limit: int | None = None, formats: tuple[str, ...] = (), resume: bool = False,
                 overwrite: bool = False, progress: Callable[[int, int], None] | None = None,
                 skip_empty: bool = False) -> dict[str, Any]:
    """Label every image under ``images`` (a folder, searched recursively, or one image) with ``student`` and
    write what ``run`` writes to ``out``: ``pseudo_labels.json`` (COCO, the training run's categories; each
    annotation's ``score`` as in :func:`segfromxai.student.predict.annotations_of`), ``pseudo_labels_results.json``,
    ``failures.jsonl``, ``run.json``, the append-only ``manifest.jsonl`` and the exports ``formats``
    (:data:`segfromxai.io.exporters.EXPORTERS`). ``resume`` continues a killed job (the same student, images and
    labeller), ``overwrite`` starts it again; ``progress(advance, total)`` is called at the start and after every
    chunk. Returns the summary (``run.json``)."""
    out, root = Path(out), Path(images)
    found = find_images(root)[:limit]
    rels = [p.name if p == root else p.relative_to(root).as_posix() for p in found]
    check_export_names(rels, formats)
    fresh, made_out = not (out / "manifest.jsonl").exists(), not out.exists()
    manifest = prepare_out(out, student_header(student, root), resume=resume, overwrite=overwrite, names=rels)
    done = done_indices(manifest)
    chunks = [list(range(k, min(len(rels), k + batch_size))) for k in range(0, len(rels), batch_size)]
    chunks = [c for c in chunks if any(i not in done for i in c)]
    job = Job(manifest, chunks, done, None, len(rels), fresh and not done, made_out, rels)
    clock, processed = Clock(), 0
    if progress is not None:
        progress(job.total - job.pending, job.total)
    student.model.module.eval()
    with job.manifest, discarded_on_failure(out, job):
        for chunk in job.chunks:
            records = [r for r in label_chunk(student, found, rels, chunk, clock) if r["index"] not in done]
            with clock("write"):
                job.manifest.append(records)
            processed += len(records)
            if progress is not None:
                progress(len(records), job.total)
    return close_run(out, job, clock, processed, formats=formats,
                     engine={"engine": "student", "student": str(student.path)}, skip_empty=skip_empty)
