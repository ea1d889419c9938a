"""A node's console log: timestamped lines in ``<state_dir>/console/NODE.log``, size-bounded.

What conserver gives xCAT sites: the last screens of a node are on disk after the fact. One
writer per node (an flock on ``NODE.log.lock``, so `pxe-stage console NODE --log` and `serve`
never write one file twice); every line starts with its UTC time (``2026-12-06T06:40:01.123Z``)
so `pxe-stage run show` can pick the lines of a run's time window. When a file would grow past
``max_bytes`` it is rotated (NODE.log -> NODE.log.1 ... NODE.log.N, the oldest dropped). Files
are mode 0640: a console may show what the node prints, not for every local user.

Console bytes are cleaned before they are written: terminal escape sequences (SeaBIOS, iPXE and
the kernel's colours, cursor moves) and other control characters go, carriage returns end lines.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pxe import validate
from pxe.errors import DynprovError

MODE = 0o640
PARTIAL_MAX = 4096  # a "line" this long without a newline is written as it is
# CSI (ESC [ ... final), OSC (ESC ] ... BEL/ST), and two-byte ESC sequences.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (.*)$")


def log_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "console"


def log_path(state_dir: Path, node: str) -> Path:
    """``<state_dir>/console/NODE.log``; the name is checked before it becomes a path."""
    validate.hostname(node)
    return log_dir(state_dir) / f"{node}.log"


def stamp(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_stamp(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.UTC).timestamp()


def clean(text: str) -> str:
    """One console line without escape sequences and control characters (tabs kept)."""
    return _CONTROL.sub("", _ESCAPES.sub("", text))


class LogBusy(DynprovError):
    """Another process already writes this node's console log."""


class ConsoleLog:
    """The one writer of a node's console log: bytes in, timestamped clean lines out."""

    def __init__(self, path: Path, *, max_bytes: int = 1 << 20, rotations: int = 5,
                 clock: object = None):
        import time

        self.path = Path(path)
        self.max_bytes = max_bytes
        self.rotations = rotations
        self.clock = clock or time.time
        self.partial = b""
        self.partial_since: float | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._lock_fd = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LogBusy(f"{self.path}: another process already logs this console "
                          "(pxe-stage serve with console logging, or another --log)") from None
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, MODE)
        os.fchmod(fd, MODE)
        return fd

    # -- writing -------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Console bytes as they come; complete lines are written at once."""
        data = self.partial + data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            self._write(line)
        if len(self.partial) >= PARTIAL_MAX:
            self._write(self.partial)
            self.partial = b""
        self.partial_since = (self.partial_since or self.clock()) if self.partial else None

    def flush_partial(self, idle: float = 1.0) -> None:
        """Write a line still without its newline once it waited ``idle`` s (a "login:" prompt)."""
        if self.partial and self.partial_since is not None and \
                self.clock() - self.partial_since >= idle:
            self._write(self.partial)
            self.partial, self.partial_since = b"", None

    def note(self, text: str) -> None:
        """A line of our own (session opened, lost, reconnecting), marked as such."""
        self.flush_partial(0.0)
        self._write(f"-- dynprov: {text}".encode(), keep_blank=True)

    def _write(self, raw: bytes, keep_blank: bool = False) -> None:
        text = clean(raw.decode("utf-8", "replace"))
        if not text.strip() and not keep_blank:
            return
        line = f"{stamp(self.clock())} {text}\n".encode()
        self._rotate_for(len(line))
        os.write(self._fd, line)

    def _rotate_for(self, size: int) -> None:
        try:
            current = os.fstat(self._fd).st_size
        except OSError:
            current = 0
        if current == 0 or current + size <= self.max_bytes:
            return
        os.close(self._fd)
        if self.rotations <= 0:
            self.path.unlink(missing_ok=True)
        else:
            for n in range(self.rotations - 1, 0, -1):
                older = Path(f"{self.path}.{n}")
                if older.exists():
                    os.replace(older, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._fd = self._open()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush_partial(0.0)
            os.close(self._fd)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def __enter__(self) -> ConsoleLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    ts: float
    text: str
    file: str
    line: int  # 1-based line number in ``file``

    def as_dict(self) -> dict[str, object]:
        return {"ts": self.ts, "time": stamp(self.ts), "text": self.text, "file": self.file,
                "line": self.line}


def files_of(state_dir: Path, node: str) -> list[Path]:
    """The node's log files, oldest first (NODE.log.N ... NODE.log.1, NODE.log)."""
    path = log_path(state_dir, node)
    rotated = []
    for p in path.parent.glob(f"{path.name}.*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.exists() else [])


def _lines(path: Path) -> Iterator[Line]:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            m = _STAMP.match(raw.decode("utf-8", "replace").rstrip("\n"))
            if m:
                with contextlib.suppress(ValueError):
                    yield Line(parse_stamp(m.group(1)), m.group(2), str(path), number)


def between(state_dir: Path, node: str, start: float, end: float) -> list[Line]:
    """The node's console lines stamped within [start, end], oldest first. Compared to the
    millisecond, as lines are stamped: a line written in the millisecond a run started (its
    stamp the start floored) belongs to the run."""
    lo, hi = math.floor(start * 1000), math.floor(end * 1000)
    out: list[Line] = []
    for path in files_of(state_dir, node):
        out.extend(ln for ln in _lines(path) if lo <= round(ln.ts * 1000) <= hi)
    return out


AFTER_END = 5.0  # s of console after a node's last step: a failure's last screen comes after it


def window(node_run: dict, now: float) -> tuple[float, float] | None:
    """A run's time window for one node (from `pxe-stage run show`'s data): its first step to
    its last (plus AFTER_END) once it is final, to now while it is in the run."""
    from pxe import states

    stamps = [s["ts"] for s in node_run.get("steps", []) if s.get("ts")]
    if not stamps:
        return None
    if node_run.get("state") in states.ACTIVE:
        return min(stamps), now
    return min(stamps), max(stamps) + AFTER_END


def for_run(state_dir: Path, run: dict, *, limit: int, now: float) -> dict[str, dict]:
    """Per node of a run: where its console lines of the run are (file, first and last line
    number), how many, and the last ``limit`` of them."""
    out: dict[str, dict] = {}
    for member in run.get("nodes", []):
        span = window(member, now)
        if span is None:
            continue
        lines = between(state_dir, member["node"], *span)
        files: dict[str, list[int]] = {}
        for ln in lines:
            files.setdefault(ln.file, []).append(ln.line)
        out[member["node"]] = {
            "window": [span[0], span[1]], "count": len(lines),
            "files": [{"file": f, "first_line": nums[0], "last_line": nums[-1]}
                      for f, nums in files.items()],
            "lines": [ln.as_dict() for ln in lines[-limit:]] if limit else []}
    return out
