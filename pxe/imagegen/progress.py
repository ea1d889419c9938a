"""Progress display for the long steps of an image build.

One line per step on stderr: ``[2/6] bootstrap debian bookworm ... 41.2 s``. On a terminal the
current line is redrawn about once a second with the elapsed time and the step's latest phase
(e.g. mmdebstrap's "installing essential packages"); elsewhere (a log, CI) each phase is printed
once, so a log shows where the time went. ``quiet`` prints nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    def __init__(self, total: int, out: TextIO | None = None, quiet: bool = False,
                 tty: bool | None = None):
        self.total = total
        self.out = out or sys.stderr
        self.quiet = quiet
        self.tty = self.out.isatty() if tty is None else tty
        self.index = 0
        self.times: dict[str, float] = {}
        self._title = ""
        self._phase = ""
        self._start = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        phase = f" ({self._phase})" if self._phase else ""
        return f"[{self.index}/{self.total}] {self._title}{phase} ... {elapsed:.0f} s"

    def _ticker(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                self.out.write("\r\x1b[K" + self._line())
                self.out.flush()

    def phase(self, text: str) -> None:
        """The step's current phase (shown on a terminal; printed once elsewhere)."""
        text = text.strip()
        if not text or text == self._phase:
            return
        with self._lock:
            self._phase = text[:70]
            if self.quiet:
                return
            if self.tty:
                self.out.write("\r\x1b[K" + self._line())
            else:
                self.out.write(f"      {self._phase}\n")
            self.out.flush()

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.index += 1
        self._title, self._phase, self._start = title, "", time.monotonic()
        ticker = None
        if not self.quiet:
            if self.tty:
                self._stop.clear()
                ticker = threading.Thread(target=self._ticker, daemon=True)
                ticker.start()
            else:
                self.out.write(f"[{self.index}/{self.total}] {title} ...\n")
                self.out.flush()
        ok = False
        try:
            yield
            ok = True
        finally:
            if ticker is not None:
                self._stop.set()
                ticker.join(timeout=5)
            took = time.monotonic() - self._start
            self.times[title] = took
            if not self.quiet:
                with self._lock:
                    self._phase = ""
                    end = "done" if ok else "FAILED"
                    prefix = "\r\x1b[K" if self.tty else ""
                    self.out.write(f"{prefix}[{self.index}/{self.total}] {title} ... {end} "
                                   f"({took:.1f} s)\n")
                    self.out.flush()
