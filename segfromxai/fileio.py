"""Durable file writes: every file the project writes goes through :func:`atomic_write` (temporary file in the same
folder, fsync, ``os.replace``, fsync of the folder), so a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator


def dumps_compact(obj: Any) -> str:
    """JSON without spaces, NaN refused: the form of every JSON line and streamed JSON file a run writes."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def fsync_dir(directory: Path) -> None:
    """fsync a folder so that a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success replace ``path`` with it.

    The temporary file is ``<dir>/.<name>.<pid>.<random>.tmp``. On leaving the block normally it is flushed,
    fsynced and moved onto ``path`` with ``os.replace`` (atomic on POSIX and Windows within one filesystem), then
    the folder is fsynced. If the block raises, the temporary file is removed, ``path`` is left as it was, and
    the exception propagates.

    Parameters
    ----------
    path : str or PathLike
        Final file; its folder must exist.
    mode : {"w", "wb"}
        Text (UTF-8, ``\\n`` line endings) or binary.

    Yields
    ------
    file object
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        else:
            f = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
