"""Progress of a long command on stderr (replay, verify, archival): one line on a terminal, rewritten in place.

Silent when stderr is not a terminal, so logs and pipes get only the final report.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """One line on a terminal, rewritten in place: events done, events/s and the time left. Silent elsewhere."""

    def __init__(self, stream: TextIO | None = None, *, label: str = "replay", every_s: float = 0.25) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._label = label
        self._every_s = every_s
        self.total: int | None = None
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def start(self, total: int | None) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._tty and now - self._drawn >= self._every_s:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total and self.total > self.done and rate > 0:
            eta = f"ETA {(self.total - self.done) / rate:.0f}s"
            of = f"/~{self.total:,}"
        else:
            eta, of = "", ""
        self._stream.write(f"\r{self._label}: {self.done:,}{of} events  {rate:,.0f} events/s  {eta}\x1b[K")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty and self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
