"""The ``student`` job: a light head on a frozen ViT trunk, trained on a run's pseudo-labels, self-trained, and
scored.

:func:`train_student` reads the training run and splits its images (:mod:`segfromxai.student.data`), caches the
trunk's tokens once (:mod:`segfromxai.student.tokens`), builds round 1's targets from the pseudo-labels
(:mod:`segfromxai.student.targets`), trains a head (:mod:`segfromxai.student.heads`,
:mod:`segfromxai.student.train`), predicts the images (:mod:`segfromxai.student.predict`) and scores them.
Self-training (``rounds`` > 1) relabels the training images with the previous round's student and trains a fresh
head on those labels. The seed paper's table (pseudo vs GT, student vs GT, pseudo vs student) comes from
:func:`segfromxai.quality.evaluate.comparisons`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from ..fileio import atomic_write
from ..models.model import LoadedModel
from .config import UNTRAINED, StudentConfig, settings_key
from .data import RunSource, Split, check_labelled, content_key, read_annotations, read_run, split, subset_coco
from .predict import Labeller, make_labeller, predict, write_labels
from .targets import choose_mode, pseudo_targets, student_targets
from .tokens import Tokens, stored_tokens, student_trunk, use_bf16
from .heads import read_head_weights
from .jobdir import check_job_out, job_folder
from .train import load_round, new_head, save_round, train_head


@dataclass
class Job:
    """A student job's data: the training run, the split, cached tokens, targets, the labeller, and whether the
    trunk ran in bfloat16 (``trunk_dtype`` resolved on this device)."""

    src: RunSource
    split: Split
    train: Tokens
    test: Tokens
    targets: np.ndarray
    keep: np.ndarray
    channels: list[str]
    labeller: Labeller
    input_size: tuple[int, int] = (224, 224)
    bf16: bool = False


def check_inputs(out: str | Path, config: StudentConfig, *, resume: bool, overwrite: bool) -> None:
    """What can be refused before the model loads: ``out`` (:func:`segfromxai.student.jobdir.check_job_out`) and
    the ``head_weights`` file (:func:`segfromxai.student.heads.read_head_weights`). Raises ValueError or
    FileExistsError."""
    check_job_out(Path(out), resume=resume, overwrite=overwrite)
    if config.head_weights:
        read_head_weights(config.head_weights)


def prepare(train_run: str | Path, images: str | Path, *, model: LoadedModel, config: StudentConfig,
            progress: bool = False, cache: Path | None = None) -> Job:
    """Read the training run, split the images, cache the trunk's tokens once (on disk in ``cache`` when given,
    :func:`stored_tokens`) and build round 1's targets."""
    src = read_run(train_run)
    anns, sizes, _ = read_annotations(src.coco)
    check_labelled(src, list(anns))
    sp = split(list(anns), src.images, Path(images), config)
    anns = {n: anns[n] for n in sp.train}
    mode = choose_mode(config.mode, anns)
    channel = {int(c["id"]): (1 if mode == "binary" else j + 1) for j, c in enumerate(src.categories)}
    channels = ["background", "foreground"] if mode == "binary" else ["background", *(c["name"] for c in
                                                                                     src.categories)]
    trunk = student_trunk(model, config.img_size, pixels=config.pixels, blocks=config.blocks)
    if config.head_weights:  # a bad file is refused before the token pass
        new_head(config, int(trunk.module.num_features), len(channels), 1)
    targets, keep = pseudo_targets(anns, sizes, sp.train, trunk.preprocess.size, channel,
                                   max_area=config.max_area, min_score=config.min_score)
    if not keep.any():
        raise ValueError(f"no training image left: {len(sp.train)} images in {src.coco}, none with a mask that "
                         "passes the filters (--max-area, --min-score)")
    bf16 = use_bf16(config.trunk_dtype, model.device)
    train = stored_tokens(model, src.images, sp.train, cache=cache, trunk=trunk, flip=config.flip, progress=progress,
                          desc="training tokens", bf16=bf16)
    if sp.test == sp.train and Path(images).resolve() == src.images.resolve():
        test = Tokens(train.names, train.sizes, train.grid[:, :1], train.probs, train.root)
    else:
        test = stored_tokens(model, images, sp.test, cache=cache, trunk=trunk, flip=False, progress=progress,
                             desc="tokens to predict", bf16=bf16)
    return Job(src, sp, train, test, targets, keep, channels, make_labeller(model, src, anns, mode, config),
               trunk.preprocess.size, bf16)


def run_round(job: Job, round_: int, key: str, out: Path, *, model: LoadedModel, config: StudentConfig,
              progress: bool = False, on_epoch: Callable[[int, int], None] | None = None) -> nn.Module:
    """Train (or reload, when ``out/round_<r>`` holds it) round ``round_``'s head and write its labels."""
    folder = out / f"round_{round_}"
    dim, k = int(job.train.grid.shape[-1]), len(job.channels)
    head = load_round(folder, config, dim, k, key)
    if head is None:
        folder.mkdir(parents=True, exist_ok=True)
        ckpt = folder / "checkpoint.safetensors"
        head = train_head(job.train, job.targets, job.keep, k, config, round_=round_, checkpoint=ckpt, key=key,
                          progress=progress, on_epoch=on_epoch, device=model.device)
        extra = {"config": config.to_dict(), "round": round_, "mode": job.labeller.mode,
                 "train_run": str(job.src.folder), "n_train": int(job.keep.sum()), "held_out": job.split.held_out,
                 "input_size": list(job.input_size), "labeller": job.labeller.to_dict(), "trunk_bf16": job.bf16}
        save_round(folder, head, model, channels=job.channels, key=key, extra=extra)
        ckpt.unlink(missing_ok=True)
    return head


def label_info(job: Job, config: StudentConfig, round_: int) -> dict[str, Any]:
    """The COCO ``info`` of a student's labels: what trained it, on what, and the versions."""
    from ..run.outdir import versions

    return {"description": f"segfromxai student masks (round {round_})", "student": config.to_dict(),
            "round": round_, "mode": job.labeller.mode, "train_run": str(job.src.folder),
            "n_train": int(job.keep.sum()), "held_out": job.split.held_out, "versions": versions()}


def score(student: Path, *, gt: str | Path | None, pseudo: Path | None) -> dict[str, dict[str, Any]]:
    """The seed paper's table for a student's masks: pseudo vs GT, student vs GT, pseudo vs student (the columns
    whose two sources are given), through :mod:`segfromxai.quality.evaluate`."""
    from ..quality.evaluate import comparisons, evaluate

    if pseudo is not None:
        return comparisons(pseudo, gt=gt, student=student)
    if gt is None:
        return {}
    return {"student vs GT": evaluate(student, gt)}


def train_student(train_run: str | Path, images: str | Path, out: str | Path, *, model: LoadedModel,
                  config: StudentConfig = StudentConfig(), gt: str | Path | None = None,
                  pseudo: str | Path | None = None, progress: bool = False,
                  on_epoch: Callable[[int, int], None] | None = None,
                  log: Callable[[str], None] | None = None, cache: str | Path | None = "tokens",
                  resume: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train a student on the pseudo-labels of ``train_run``, predict ``images``, and self-train ``config.rounds``.

    Writes ``out/round_<r>/`` (``head.safetensors``, ``card.json``, ``student_labels.json``, and with ``gt`` or
    ``pseudo`` ``metrics.json`` and ``per_image.csv``), then the last round's ``out/student_labels.json``,
    ``out/metrics.json`` (:func:`segfromxai.quality.evaluate.write_evaluation`'s format), ``out/report.html`` (the
    evaluation report with the student column and contact sheets, images from ``images``) and ``out/student.json``
    (the headline numbers of every round, with ``agreement_spearman``: the Spearman of the per-image pseudo vs
    student IoU with the true IoU, :func:`segfromxai.quality.agreement.agreement_spearman`). ``pseudo`` is a run
    folder over ``images`` (default, when the student holds out part of the training folder: the training run);
    its labels are scored on the images the student predicts (``out/pseudo_scored.json``). ``log`` receives each
    round's table. ``cache``: the folder of the trunk's tokens (:func:`stored_tokens`; relative: under ``out``;
    None: kept in memory only). ``out`` follows ``run``'s rules (:func:`segfromxai.student.jobdir.job_folder`): a
    folder holding a student job is continued with ``resume`` (a finished round is reused when its key, which
    covers the settings, the model, and the content of the pseudo-labels, the training images and the head
    weights, still matches) or started again with ``overwrite``. Returns ``student.json``'s content.
    """
    out = Path(out)
    cache = None if cache is None else out / cache
    header = {"kind": "segfromxai-student", "train_run": str(train_run), "images": str(images)}
    with job_folder(out, header, resume=resume, overwrite=overwrite, cache=cache):
        job = prepare(train_run, images, model=model, config=config, progress=progress, cache=cache)
        return _train_rounds(job, images, out, model=model, config=config, gt=gt, pseudo=pseudo,
                             progress=progress, on_epoch=on_epoch, log=log)


def _train_rounds(job: Job, images: str | Path, out: Path, *, model: LoadedModel, config: StudentConfig,
                  gt: str | Path | None, pseudo: str | Path | None, progress: bool,
                  on_epoch: Callable[[int, int], None] | None, log: Callable[[str], None] | None) -> dict[str, Any]:
    """:func:`train_student`'s rounds on a prepared job: train (or reuse), predict, score, write."""
    from ..quality.agreement import FLAG, agreement_spearman
    from ..quality.evaluate import headline, table, write_evaluation

    source = read_run(pseudo).coco if pseudo is not None else job.src.coco if job.split.held_out else None
    scored = subset_coco(source, job.split.test, out / "pseudo_scored.json") if source is not None else None
    trained = {k: v for k, v in config.to_dict().items() if k not in UNTRAINED}
    if job.bf16:  # the precision `auto` resolved to: another machine's tokens train another head
        trained["trunk_bf16"] = True
    key = settings_key(trained, job.split.train, model.source,
                       content_key(job.src, job.split.train, config.head_weights))
    rounds, results, records = [], {}, []
    for r in range(1, config.rounds + 1):
        key = settings_key(key, r)
        head = run_round(job, r, key, out, model=model, config=config, progress=progress, on_epoch=on_epoch)
        records = predict(head, job.test, job.labeller)
        labels = out / f"round_{r}" / "student_labels.json"
        write_labels(labels, records, job.labeller, label_info(job, config, r))
        results = score(labels, gt=gt, pseudo=scored)
        rho, rho_flag = agreement_spearman(results), agreement_spearman(results, FLAG)
        if results:
            write_evaluation(labels.parent, results)
            if log is not None:
                log(f"round {r} ({job.labeller.mode} {config.head} student, {int(job.keep.sum())} training "
                    f"images, {len(job.split.test)} scored):\n" + table({n: headline(x) for n, x in results.items()})
                    + ("" if np.isnan(rho) else f"\nagreement as a quality flag: Spearman {rho:.3f} of pseudo vs "
                       f"student IoU with pseudo vs GT IoU, over images; {rho_flag:.3f} of {FLAG}"))
        rounds.append({"round": r, "n_train": int(job.keep.sum()), "agreement_spearman": rho, "flag_spearman": rho_flag,
                       "table": {n: headline(x) for n, x in results.items()}})
        if r < config.rounds:
            job.targets, job.keep = student_targets(head, job.train, job.input_size,
                                                    confident=config.confident, max_area=config.max_area)
    write_labels(out / "student_labels.json", records, job.labeller, label_info(job, config, config.rounds))
    summary = {"config": config.to_dict(), "train_run": str(job.src.folder), "images": str(images),
               "held_out": job.split.held_out, "n_predicted": len(job.split.test), "rounds": rounds}
    write_summary(out, summary, results, images=Path(images))
    return summary


def write_summary(out: Path, summary: dict[str, Any], results: dict[str, dict[str, Any]], *, images: Path) -> None:
    """The last round's ``metrics.json``, ``per_image.csv`` and ``report.html`` (when ``results`` holds scores,
    contact sheets from ``images``) and ``student.json`` (``summary``) in ``out``."""
    from ..quality.evaluate import json_safe, write_evaluation, write_evaluation_report

    if results:
        write_evaluation(out, results)
        write_evaluation_report(out, results, settings=summary, images=images, title="segfromxai student report")
    with atomic_write(out / "student.json") as f:
        json.dump(json_safe(summary), f, indent=2)
