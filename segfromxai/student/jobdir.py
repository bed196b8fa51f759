"""A student job's output folder, with ``run``'s rules (:mod:`segfromxai.run.outdir`): a file, an unwritable folder
or a non-empty folder that holds no student job is refused; a folder that holds one is continued (``resume``: each
finished round whose key still matches is reused, a round cut short continues from its checkpoint) or started
again (``overwrite``: what the job wrote is removed, the token cache kept, it is keyed by content); a lock keeps a
second job out; a job that fails before it has saved anything leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
from pathlib import Path
from typing import Any, Iterator

from ..fileio import atomic_write
from ..run.outdir import TMP_NAME, check_out, out_lock

MARKER = "student_job.json"
"""The file that says a folder holds a student job (written when the job starts)."""
MARKERS = (MARKER, "student.json")  # student.json: a job finished before the marker existed
JOB_FILES = (MARKER, "student.json", "student_labels.json", "metrics.json", "per_image.csv", "report.html",
             "pseudo_scored.json")
ROUND_FILES = ("head.safetensors", "card.json", "checkpoint.safetensors", "student_labels.json", "metrics.json",
               "per_image.csv")
ROUND_NAME = re.compile(r"^round_\d+$")
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
"""A full disk or quota, a read-only or forbidden file system: a job's write errors, reported as one line."""
SHEET_NAME = re.compile(r"^\d{3}_.*\.png$")


def holds_job(out: Path) -> bool:
    """Whether ``out`` holds a student job (its marker, or a finished job's ``student.json``)."""
    return any((out / m).is_file() for m in MARKERS)


def _rounds(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.is_dir() and ROUND_NAME.match(p.name)] if out.is_dir() else []


def _unlink_known(folder: Path, names: tuple[str, ...], pattern: re.Pattern | None = None) -> None:
    """Remove the files ``names`` (and those matching ``pattern`` or the temporary files' name) of ``folder``,
    then ``folder`` itself when that left it empty."""
    if not folder.is_dir():
        return
    for p in list(folder.iterdir()):
        if p.is_file() and (p.name in names or TMP_NAME.match(p.name) or (pattern and pattern.match(p.name))):
            p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only an empty folder goes


def remove_job(out: Path) -> None:
    """Remove what a student job wrote in ``out`` and nothing else: ``JOB_FILES``, each ``round_<r>``'s
    ``ROUND_FILES``, the report's ``sheets/NNN_*.png`` and ``figures``, temporary files; the token cache stays."""
    for folder in _rounds(out):
        _unlink_known(folder, ROUND_FILES)
    _unlink_known(out / "sheets", (), SHEET_NAME)
    _unlink_known(out / "figures", (), re.compile(r".*\.svg$"))
    for p in list(out.iterdir()):
        if p.is_file() and (p.name in JOB_FILES or TMP_NAME.match(p.name)):
            p.unlink(missing_ok=True)


def _saved_work(out: Path, cache: Path | None) -> bool:
    """Whether a failed job left something worth resuming: a round's folder, or cached tokens under ``out``."""
    tokens = _under(cache, out) and cache.is_dir() and any(cache.iterdir())
    return bool(_rounds(out)) or tokens


def _under(cache: Path | None, out: Path) -> bool:
    return cache is not None and out.resolve() in cache.resolve().parents


def check_job_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse ``out`` before any work (:func:`segfromxai.run.outdir.check_out`, with a student job's marker), and a
    folder holding a student job without ``resume`` or ``overwrite``; creates nothing."""
    marker = next((m for m in MARKERS if (out / m).is_file()), MARKER)
    check_out(out, marker=marker, what="segfromxai student job")
    if holds_job(out) and not (resume or overwrite):
        raise FileExistsError(f"{out} holds a student job already: pass --resume to continue it or --overwrite to "
                              "start again")


@contextlib.contextmanager
def job_folder(out: str | Path, header: dict[str, Any], *, resume: bool = True, overwrite: bool = False,
               cache: Path | None = None) -> Iterator[Path]:
    """Prepare ``out`` for a student job and hold its lock for the block.

    Refused (ValueError or FileExistsError, one line): ``out`` a file or unwritable, not empty without a student
    job, holding one without ``resume`` or ``overwrite``, or locked by another job. ``overwrite`` removes what the
    earlier job wrote (:func:`remove_job`). ``header`` (what the job trains on) is written to ``MARKER``. When the
    block raises and the folder held no job before, what this job wrote goes again (the folder too when this call
    created it), unless it saved a round or tokens (``cache``) worth resuming."""
    out = Path(out)
    check_job_out(out, resume=resume, overwrite=overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    held = True
    try:
        with out_lock(out):
            held = holds_job(out)
            if held and not (resume or overwrite):
                raise FileExistsError(f"{out} holds a student job already: pass --resume to continue it or "
                                      "--overwrite to start again")
            if held and overwrite:
                remove_job(out)
            with atomic_write(out / MARKER) as f:
                json.dump(header, f, indent=2, default=str)
            yield out
    except BaseException as e:
        if not held and not _saved_work(out, cache):
            _clean(out, cache, created)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            raise ValueError(f"cannot write to --out {out}: {e.strerror or e}{where}; what was written is whole, "
                             "so the same command with --resume continues once it can write") from e
        raise


def _clean(out: Path, cache: Path | None, created: bool) -> None:
    """Remove what a job that saved nothing wrote: its marker, lock, scored subset, an empty token cache under
    ``out``, and ``out`` itself when the job created it and it is empty."""
    with contextlib.suppress(OSError):  # a read-only or full disk may refuse even this
        if _under(cache, out):
            _unlink_known(cache, ())
        for name in (MARKER, "pseudo_scored.json", ".lock"):
            (out / name).unlink(missing_ok=True)
        if created:
            out.rmdir()
