"""A run's output folder: preparing it (resume, overwrite, refuse), streaming its manifest back, writing the dataset
files from it, and merging the parts of a sharded run.

A run's ``manifest.jsonl`` (:class:`~segfromxai.run.manifest.Manifest`) starts with a header that names the job
(recipe digest, image folder, model, label source, shard, classes, the resolved recipe) and holds one record per
image: ``{"index", "file_name", "status": ok|empty|failed|skipped, ...}``. ``index`` is the image's position in the
sorted list of the whole folder, so every shard of one job numbers its images the same way and COCO image ids
(``index + 1``) are unique across shards. The dataset files are always rebuilt from manifests, streamed: records
are read from disk in index order (a k-way merge over parts), never all held in memory.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..fileio import atomic_write
from ..io.coco import AGNOSTIC_CLASS, export_name, export_stem, named_after, write_coco, write_results
from ..io.exporters import EXPORTERS
from ..registry import lookup
from .manifest import Manifest

RUN_FILES = ("manifest.jsonl", "run.json", "pseudo_labels.json", "pseudo_labels_results.json", "failures.jsonl",
             "metrics.json", "per_image.csv", "report.html", "index.json")
RESUME_KEYS = ("recipe", "images", "model", "targets", "shard")
"""Header keys that must match for ``--resume``; the same keys but ``shard`` must match for ``merge``."""


def dist_version(name: str) -> str:
    """The installed distribution's version from its metadata (pycocotools has no ``__version__``), or
    ``"unknown"`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the packages that shape the output."""
    import platform

    import numpy as np
    import timm
    import torch

    from ..version import __version__
    return {"segfromxai": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__,
            "pycocotools": dist_version("pycocotools")}


STATUSES = ("ok", "empty", "failed", "skipped")
TMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
"""The temporary files of :func:`segfromxai.fileio.atomic_write` (``.<name>.<pid>.<random>.tmp``)."""
SHEET_NAME = re.compile(r"^\d{3}_.*\.png$")
"""The report's contact sheets (``sheets/000_<name>.png``)."""


def check_out(out: Path, *, marker: str = "manifest.jsonl", what: str = "segfromxai run") -> None:
    """Refuse an output folder before any work: a file, a folder that cannot be created or written, or a folder
    that is not empty and holds no run (no ``marker`` file; files starting with ``.`` do not count; ``what``
    names the job in the message, e.g. a student's). Raises ValueError or FileExistsError with a one-line reason;
    creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot create --out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to --out {out}: {probe} is not writable")
    if out.is_dir() and not (out / marker).exists():
        if any(not p.name.startswith(".") for p in out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no {what}: give a new or empty folder "
                                  "(--overwrite only replaces an earlier run, never other files)")


def check_out_outside(out: Path, images: Path) -> None:
    """Refuse an output folder that is an image folder ``images`` or lies inside it: its PNG exports, overlays and
    contact sheets would be read as images by the next run or ``--resume``. Raises ValueError naming both flags."""
    images = Path(images)
    if images.is_dir() and Path(out).resolve().is_relative_to(images.resolve()):
        raise ValueError(f"--out {out} lies inside --images {images}: the images it writes (exports, overlays, "
                         "sheets) would be read as input by the next run; give an output folder outside it")


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.lock`` (``flock``, released when the process dies) for the block, so that
    two jobs never write into one folder; a second job gets FileExistsError at once. ``out`` must exist. Where
    ``fcntl`` is missing (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(Path(out) / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise FileExistsError(f"another segfromxai job is writing to {out} (it holds {out / '.lock'}): wait "
                                  "for it to end or give another --out") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_dirs() -> tuple[str, ...]:
    """The folders a run writes files in: ``maps``, ``overlays``, each export's folder (:data:`EXPORTERS`) and
    the report's ``sheets``."""
    return ("maps", "overlays", *(e.folder for _, e in sorted(EXPORTERS.items()) if e.folder), "sheets")


def check_export_names(names: list[str], formats: Iterable[str]) -> None:
    """Raise ValueError, before any labelling, when a format is unknown, two images would write the same export
    file, or a name cannot be exported. ``maps/`` and ``overlays/`` keep the image's extension
    (:func:`export_name`), so only unsafe names fail there; each format in ``formats`` checks its own file names
    (:attr:`Exporter.target`: ``yolo/labels/`` pairs a label with its image by the name without its extension, as
    YOLO tools look it up, so ``a.png`` beside ``a.jpg`` is refused with ``--format yolo``)."""
    checks = [("overlays", lambda n: export_name(n, ".png").as_posix(), "")]
    for name in sorted(set(formats)):
        e = lookup(EXPORTERS, name, "format")
        if e.target is not None:
            checks.append((e.folder, e.target, e.clash))
    for folder, name_of, clash in checks:
        seen: dict[str, str] = {}
        for n in names:
            try:
                target = name_of(n)
            except ValueError as err:
                raise ValueError(f"cannot export {n!r}: {err}") from err
            if target in seen:
                raise ValueError(f"{seen[target]} and {n} would both be written as {folder}/{target}: rename one"
                                 + clash)
            seen[target] = n


def _walk_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` (not following links to folders), relative to it."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            yield (Path(dirpath) / name).relative_to(folder)


def _written_by_run(where: str, rel: Path, names: set[str], stems: set[str]) -> bool:
    """Whether ``<where>/<rel>`` is a file a run writes for one of the images ``names`` (see :func:`remove_run`)."""
    posix = rel.as_posix()
    if TMP_NAME.match(rel.name):
        return True
    if where in ("overlays", "maps"):
        return named_after(posix, ".npz" if where == "maps" else ".png", names, stems)
    if where == "sheets":
        return len(rel.parts) == 1 and SHEET_NAME.match(rel.name) is not None
    return any(e.folder == where and e.written(posix, names, stems) for e in EXPORTERS.values())


def remove_run(out: Path, names: Iterable[str]) -> None:
    """Remove what a run wrote in ``out`` and nothing else: the files of ``RUN_FILES``; in :func:`run_dirs` only the
    files named after the images ``names`` (``overlays/<name>.png``, ``maps/<name>.npz`` and each export's, see
    :attr:`Exporter.written`: ``png/<name>.png``, ``yolo/labels/[train|val/]<name without suffix>.txt``,
    ``yolo/images/[train|val/]<name>``, ``yolo/data.yaml``), the report's ``sheets/NNN_*.png`` and leftover
    temporary files; then the folders that are left empty."""
    names = set(names)
    stems = {export_stem(n) for n in names}
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    remove_stale_tmp(out)
    for where in run_dirs():
        folder = out / where
        if not folder.is_dir():
            continue
        for rel in list(_walk_files(folder)):
            if _written_by_run(where, rel, names, stems):
                (folder / rel).unlink(missing_ok=True)
        for dirpath, _, _ in sorted(os.walk(folder), key=lambda d: -len(d[0])):
            with contextlib.suppress(OSError):
                Path(dirpath).rmdir()  # only empty folders go


def remove_stale_tmp(out: Path) -> int:
    """Remove the temporary files (``TMP_NAME``) a killed run left in ``out`` and its :func:`run_dirs`; their count."""
    n = 0
    folders = [out] + [out / d for d in run_dirs() if (out / d).is_dir()]
    for folder in folders:
        rels = [Path(p.name) for p in out.iterdir() if p.is_file()] if folder == out else _walk_files(folder)
        for rel in list(rels):
            if TMP_NAME.match(rel.name):
                (folder / rel).unlink(missing_ok=True)
                n += 1
    return n


def prepare_out(out: Path, header: dict[str, Any], *, resume: bool, overwrite: bool,
                names: Iterable[str] = ()) -> Manifest:
    """Open ``out``'s manifest for appending: new, resumed (the header must match on ``RESUME_KEYS``; leftover
    temporary files are removed) or, with ``overwrite``, emptied first of what the earlier run wrote (its records'
    and ``names``' files, see :func:`remove_run`). A folder holding a run is refused without either flag, and so
    is a non-empty folder holding none (:func:`check_out`)."""
    manifest = Manifest(out / "manifest.jsonl")
    check_out(out)
    if manifest.path.exists():
        if overwrite:
            remove_run(out, itertools.chain(_recorded_names(manifest), names))
        elif not resume:
            raise FileExistsError(f"{out} holds a run already: pass --resume to continue it or --overwrite to "
                                  "start again")
        else:
            old = manifest.read_header() or {}
            diff = sorted(k for k in RESUME_KEYS if old.get(k) != header.get(k))
            if diff:
                raise ValueError(f"cannot resume {out}: its run differs in {', '.join(diff)} "
                                 "(use --overwrite to start again)")
            remove_stale_tmp(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest.open(header)
    return manifest


def _recorded_names(manifest: Manifest) -> list[str]:
    """The file names a manifest records, as far as it can be read (a damaged one is being overwritten)."""
    names: list[str] = []
    with contextlib.suppress(ValueError):
        names.extend(r["file_name"] for r in manifest.records() if isinstance(r.get("file_name"), str))
    return names


def run_records(manifest: Manifest) -> Iterator[dict]:
    """The manifest's records, streamed, each checked to be a run record (an int ``index`` and a ``status`` of
    ``STATUSES``); another raises ValueError naming the file and line."""
    for line, r in enumerate(manifest.records(), start=2):
        index = r.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or r.get("status") not in STATUSES:
            raise ValueError(f"{manifest.path}, line {line}: not a run record (needs an index and a status): "
                             f"{json.dumps(r)[:80]}; pass --overwrite to start the run again")
        yield r


def done_indices(manifest: Manifest) -> set[int]:
    """Indices of the images the manifest holds a record for."""
    return {r["index"] for r in run_records(manifest)}


def _in_order(manifest: Manifest) -> Callable[[], Iterator[dict]]:
    """Records by increasing index, first copy of an index wins. Streamed when the file is in order (as ``run``
    writes it); otherwise the records are sorted in memory."""
    last = -1
    for r in run_records(manifest):
        if r["index"] <= last:
            by_index: dict[int, dict] = {}
            for q in run_records(manifest):
                by_index.setdefault(q["index"], q)
            return lambda: iter([by_index[i] for i in sorted(by_index)])
        last = r["index"]
    return lambda: run_records(manifest)


def records(manifests: Iterable[Manifest], statuses: tuple[str, ...]) -> Callable[[], Iterator[dict]]:
    """A factory of streams over the records of all manifests with these statuses, merged by index."""
    streams = [_in_order(m) for m in manifests]

    def stream() -> Iterator[dict]:
        last = -1
        for r in heapq.merge(*(s() for s in streams), key=lambda r: r["index"]):
            if r["index"] != last and r["status"] in statuses:
                yield r
            last = r["index"]
    return stream


def image_root(header: dict[str, Any]) -> Path:
    """The folder a run's ``file_name`` paths are relative to (the parent when the run labelled one file)."""
    root = Path(header["images"])
    return root.parent if root.is_file() else root


def finish(out: Path, manifests: list[Manifest], *, formats: tuple[str, ...] = ("coco",),
           skip_empty: bool = False) -> dict[str, Any]:
    """Write the dataset files of ``out`` from the manifests (streamed, atomic) and return the summary.

    The categories are the header's ``categories`` when it has them (a student labels with its training run's),
    else one per ``classes`` entry (id = class index + 1).

    ``skip_empty`` leaves the images without a mask out of ``pseudo_labels.json`` (a training file where every
    image has a target); the exports (:data:`EXPORTERS`, each in its folder) keep them (an all-background PNG, an
    empty YOLO label file)."""
    exporters = {name: lookup(EXPORTERS, name, "format") for name in sorted(set(formats))}
    header = manifests[0].read_header() or {}
    recipe, classes = header["resolved"], header["classes"]
    categories = header.get("categories") or [{"id": k + 1, "name": c, "supercategory": AGNOSTIC_CLASS}
                                              for k, c in enumerate(classes)]
    labelled = records(manifests, ("ok", "empty"))
    info = {"description": f"segfromxai pseudo-labels ({recipe['name']})", "version": versions()["segfromxai"],
            "recipe": recipe, "model": header["model"], "versions": versions()}
    coco_records = records(manifests, ("ok",)) if skip_empty else labelled
    counts = write_coco(out / "pseudo_labels.json", coco_records, categories=categories, info=info)
    write_results(out / "pseudo_labels_results.json", labelled)
    with atomic_write(out / "failures.jsonl") as f:
        for r in records(manifests, ("failed",))():
            f.write(json.dumps({"file_name": r["file_name"], "reason": r["reason"]}) + "\n")
    root = image_root(header)  # a merge on another machine may not see the images: an export does without, then
    for exporter in exporters.values():
        exporter(out / exporter.folder, labelled(), categories=categories, images=root if root.is_dir() else None)
    status: dict[str, int] = {}
    skipped = []
    for r in records(manifests, ("ok", "empty", "failed", "skipped"))():
        status[r["status"]] = status.get(r["status"], 0) + 1
        if r["status"] == "skipped":
            skipped.append({"file_name": r["file_name"], "reason": r["reason"]})
    return {"recipe": recipe, "model": header["model"], "versions": versions(), "shard": header.get("shard"),
            "counts": {"found": sum(status.values()), "labelled": status.get("ok", 0),
                       "no_mask": status.get("empty", 0), "failed": status.get("failed", 0),
                       "skipped": status.get("skipped", 0), "annotations": counts["annotations"]},
            "skipped": skipped, "formats": sorted({"coco", *formats}), "skip_empty": skip_empty}


def merge(parts: list[str | Path], out: str | Path, *, formats: tuple[str, ...] = ("coco",), index_only: bool = False,
          overwrite: bool = False, skip_empty: bool = False) -> dict[str, Any]:
    """Combine the output folders of a sharded run into one dataset in ``out`` (streamed), or with ``index_only``
    write ``out/index.json`` listing the parts and leave them sharded.

    The parts must come from one job (same recipe, images, model, label source and classes), each a different
    shard of the same ``num_shards``; a missing shard is allowed and reported (``missing_shards``).
    """
    out = Path(out)
    manifests = [Manifest(Path(p) / "manifest.jsonl") for p in parts]
    headers = []
    for p, m in zip(parts, manifests):
        h = m.read_header()
        if h is None:
            raise ValueError(f"{p}: not a segfromxai run output (no manifest.jsonl)")
        headers.append(h)
    first = headers[0]
    for p, h in zip(parts[1:], headers[1:]):
        diff = sorted(k for k in (*RESUME_KEYS[:-1], "classes") if h.get(k) != first.get(k))
        if diff:
            raise ValueError(f"{p} is not a part of the same run as {parts[0]}: it differs in {', '.join(diff)}")
    shards = [tuple(h.get("shard") or (0, 1)) for h in headers]
    n = {s[1] for s in shards}
    if len(n) != 1 or len(set(shards)) != len(shards):
        raise ValueError(f"parts must be different shards of one --num-shards: got {sorted(shards)}")
    missing = sorted(set(range(n.pop())) - {s[0] for s in shards})
    if (out / "manifest.jsonl").exists() or ((out / "pseudo_labels.json").exists() and not overwrite):
        raise FileExistsError(f"{out} holds a run or a merge already (use --overwrite for a merge)")
    out.mkdir(parents=True, exist_ok=True)
    entries = [{"path": str(Path(p).resolve()), "shard": list(s),
                "counts": json.loads((Path(p) / "run.json").read_text())["counts"]
                if (Path(p) / "run.json").exists() else None} for p, s in zip(parts, shards)]
    if index_only:
        doc = {"parts": entries, "missing_shards": missing, "recipe": first["resolved"], "model": first["model"]}
        with atomic_write(out / "index.json") as f:
            json.dump(doc, f, indent=2)
        return doc
    summary = finish(out, manifests, formats=formats, skip_empty=skip_empty)
    summary.update({"shard": None, "parts": entries, "missing_shards": missing})
    with atomic_write(out / "run.json") as f:
        json.dump(summary, f, indent=2)
    return summary
