"""The append-only resume manifest of a run: one JSON line per finished image, a torn last line tolerated."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Iterator

from ..fileio import atomic_write, dumps_compact


class Manifest:
    """Append-only JSONL file that records finished work so an interrupted run can resume.

    Line 1 is a header ``{"manifest": 1, ...}``; every further line is one record (a dict) as compact JSON.
    Appends are one write of whole lines followed by fsync, so a crash can only leave a torn *last* line, which
    :meth:`read` ignores and :meth:`open` truncates. One writer at a time; comparing the stored header with the
    current run's (recipe, model, ...) is the caller's job (see :attr:`header`).

    Examples
    --------
    >>> with Manifest(path).open({"recipe": "gradcam"}) as m:      # doctest: +SKIP
    ...     if m.header["recipe"] != "gradcam": raise SystemExit("manifest from another recipe")
    ...     done = {r["file_name"] for r in m.records()}
    ...     m.append([{"file_name": "a.jpg"}])
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header: dict | None = None
        self._file: IO[bytes] | None = None

    def _lines(self) -> Iterator[tuple[dict, int]]:
        """Each good line's object (the header first) and the byte length of the good prefix up to it, streamed.

        A torn last line (not newline-terminated, or not parseable) ends the stream; any other bad line raises
        ``ValueError`` naming its line number.
        """
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            good, bad = 0, None
            for number, line in enumerate(f, start=1):
                if bad is not None:
                    raise ValueError(f"{self.path}: line {bad[0]} is not a JSON object ({bad[1]})")
                if not line.endswith(b"\n"):
                    return  # torn last line
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError("not a JSON object")
                except ValueError as err:
                    bad = (number, err)  # fine only as the last line
                    continue
                if number == 1 and obj.get("manifest") != self.VERSION:
                    raise ValueError(f"{self.path}: line 1 is not a manifest header "
                                     f"{{'manifest': {self.VERSION}, ...}}: {obj!r}")
                good += len(line)
                yield obj, good

    def read_header(self) -> dict | None:
        """The header, or None if the file is missing or has no complete header (reads one line)."""
        return next((obj for obj, _ in self._lines()), None)

    def records(self) -> Iterator[dict]:
        """The records in file order, streamed (the whole file is never held in memory)."""
        lines = self._lines()
        next(lines, None)
        for obj, _ in lines:
            yield obj

    def read(self) -> tuple[dict | None, list[dict]]:
        """The header (None if the file is missing or has no complete header) and all records, in order.

        A torn last line (not newline-terminated, or not parseable) is ignored; any other bad line raises
        ``ValueError`` naming its line number. Holds every record: prefer :meth:`records` for large files.
        """
        return self.read_header(), list(self.records())

    def _good_length(self) -> int:
        good = 0
        for _, good in self._lines():
            pass
        return good

    def open(self, header: dict) -> "Manifest":
        """Open for appending; create the file with ``{"manifest": 1, **header}`` if it has no header yet.

        An existing file keeps its header (exposed as :attr:`header`, whatever ``header`` says) and is truncated
        after its last good line, so later appends start on a fresh line. Returns ``self``.
        """
        if self._file is not None:
            raise ValueError(f"{self.path} is already open")
        if header.get("manifest", self.VERSION) != self.VERSION:
            raise ValueError(f"header 'manifest' must be {self.VERSION}, got {header['manifest']!r}")
        stored, good = self.read_header(), self._good_length()
        if stored is None:
            stored = {"manifest": self.VERSION, **header}
            with atomic_write(self.path, "wb") as f:
                f.write((dumps_compact(stored) + "\n").encode("utf-8"))
        elif good != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        self._file = open(self.path, "ab", buffering=0)
        self.header = stored
        return self

    def append(self, records: list[dict]) -> None:
        """Append records (dicts) as lines with one write, then fsync. Nothing is written if one fails to encode."""
        if self._file is None:
            raise ValueError(f"{self.path} is not open; call open(header) first")
        for r in records:
            if not isinstance(r, dict):
                raise ValueError(f"manifest records must be dicts, got {type(r).__name__}")
        data = "".join(dumps_compact(r) + "\n" for r in records).encode("utf-8")
        if not data:
            return
        view = memoryview(data)
        while view:  # an unbuffered write may be partial; in practice this is one system call
            view = view[self._file.write(view):]
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
