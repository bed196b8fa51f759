"""Progress of a long run for a log: one plain line every N images or T seconds, for when no terminal shows a bar.

On a terminal ``segfromxai run`` draws a tqdm bar; under a job scheduler, ``nohup`` or a pipe, a bar is either
invisible or a wall of carriage returns, so :class:`LogProgress` prints lines such as::

    progress: 120/400 images (30.0%), 1.52 images/s, ETA 3m04s

as training tools do in their logs. The rate counts only the images processed since the run started (a resumed
run's finished images are in the count, not in the rate).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, TextIO


def duration(seconds: float) -> str:
    """``seconds`` as ``"1h02m03s"``, ``"3m04s"`` or ``"5s"``; ``"?"`` when unknown (NaN or infinite)."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LogProgress:
    """Print ``progress: done/total images (pct), rate images/s, ETA t`` lines to ``stream``.

    A line is printed on the first call, whenever ``every`` more images are done or ``seconds`` have passed since
    the last line (checked at each update), and by :meth:`close` (unless the last update already printed the same
    count).

    Parameters
    ----------
    total : int
        Images in the run.
    initial : int
        Images already done (a resumed run).
    stream : text file
        Where lines go (``sys.stderr`` in the CLI); flushed after each line.
    every : int
        Print after at least this many images since the last line.
    seconds : float
        Print when at least this long has passed since the last line.
    clock : callable
        Monotonic seconds (``time.monotonic``); a fake one in tests.
    desc : str
        What is counted, printed after ``progress:`` (e.g. ``round 1``); empty: nothing.
    unit : str
        The unit of the count (``images``; a student's training counts ``epochs``).
    """

    def __init__(self, total: int, initial: int = 0, *, stream: TextIO, every: int = 100, seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, desc: str = "", unit: str = "images") -> None:
        if every < 1 or seconds <= 0:
            raise ValueError(f"every must be >= 1 and seconds > 0, got every={every}, seconds={seconds}")
        self.total, self.done, self.start_done = int(total), int(initial), int(initial)
        self.stream, self.every, self.seconds, self.clock = stream, every, seconds, clock
        self.prefix, self.unit = f"{desc}: " if desc else "", unit
        self.start = self.last_time = clock()
        self.last_done = self.done
        self.line(self.start)

    def line(self, now: float) -> None:
        """Print the current state (images done, rate over this session, ETA)."""
        elapsed = now - self.start
        new = self.done - self.start_done
        rate = new / elapsed if elapsed > 0 and new > 0 else math.nan
        eta = (self.total - self.done) / rate if rate > 0 else math.nan
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate_text = "?" if math.isnan(rate) else f"{rate:.2f}"
        self.stream.write(f"progress: {self.prefix}{self.done}/{self.total} {self.unit} ({pct:.1f}%), {rate_text} "
                          f"{self.unit}/s, "
                          f"ETA {duration(eta) if self.done < self.total else '0s'}\n")
        self.stream.flush()
        self.last_time, self.last_done = now, self.done

    def update(self, n: int) -> None:
        """``n`` more images are done."""
        self.done += int(n)
        now = self.clock()
        if self.done - self.last_done >= self.every or now - self.last_time >= self.seconds:
            self.line(now)

    def close(self) -> None:
        """Print the final state, unless the last line already shows it."""
        if self.last_done != self.done:
            self.line(self.clock())


def progress_bar(total: int, initial: int, *, stream: TextIO | None = None, desc: str = "", unit: str = "images",
                 every: int = 100) -> Any:
    """A tqdm bar on a terminal; elsewhere (a log, a pipe, a job scheduler) a :class:`LogProgress` line every
    ``every`` ``unit`` or 30 seconds, on ``stream`` (default: ``sys.stderr``). Both count with ``update(n)`` and end
    with ``close()``."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, unit="img" if unit == "images" else unit, file=stream,
                    desc=desc or None, leave=not desc)
    return LogProgress(total, initial, stream=stream, desc=desc, unit=unit, every=every)


class LazyBar:
    """The engines' ``progress(advance, total)``: a :func:`progress_bar` made at the first call (which gives the
    total and the images already done), updated by the later ones."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.bar: Any = None
        self.stream = stream

    def __call__(self, advance: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(total, advance, stream=self.stream)
        else:
            self.bar.update(advance)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
