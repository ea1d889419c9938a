"""Compiled Jinja templates kept in the state directory, so a new process does not compile again.

Why: `set-boot --render` and `render` are new processes each time; compiling the DHCP template
costs each one a few ms (the lexer's regular expressions, the generated Python, compile()).
Jinja's bytecode cache stores the compiled code (marshal) per template; loading it is running
code, so only files nobody else could have written are loaded:
- the folder ``<state_dir>/template-cache`` is created 0700 and used only while it is a real
  folder (no link) owned by this user or root and not writable by group or others; it is
  written only after the render that compiled the templates succeeded (StateBytecodeCache.keep);
- each file is opened without following links and loaded only when it is a regular file owned
  by this user or root and not writable by group or others; files are written 0600 (temp file +
  rename: a reader sees the old file or the new one).
Keys: the template's name and file, the Jinja version and the environment's options (another
environment compiles the same source differently); each file also carries the sha256 of the
source it was compiled from, so an edited site override is compiled again. Anything wrong with
the cache (missing, unwritable, corrupt, foreign) costs only the compile, never the render.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tempfile
from pathlib import Path

import jinja2
from jinja2.bccache import Bucket

FOLDER = "template-cache"
_OPTIONS = ("block_start_string", "block_end_string", "variable_start_string",
            "variable_end_string", "comment_start_string", "comment_end_string",
            "line_statement_prefix", "line_comment_prefix", "trim_blocks", "lstrip_blocks",
            "newline_sequence", "keep_trailing_newline", "optimized", "autoescape", "undefined",
            "finalize", "is_async", "extensions")


def _trusted(st: os.stat_result) -> bool:
    """Owned by this user or root, not writable by group or others."""
    return st.st_uid in (os.geteuid(), 0) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class StateBytecodeCache(jinja2.BytecodeCache):
    """Jinja's bytecode cache in a folder only this user can write (see the module docstring).
    What a render compiled is written by keep(), once that render succeeded: a render that fails
    (a template the daemon rejects) leaves the state directory as it was."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._pending: dict[str, bytes] = {}

    def _ours(self) -> bool:
        """The folder exists and is ours alone (a real folder, this user's or root's, 0700-ish)."""
        try:
            st = os.lstat(self.folder)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and _trusted(st)

    def get_bucket(self, environment: jinja2.Environment, name: str, filename: str | None,
                   source: str) -> Bucket:
        options = repr([getattr(environment, o, None) for o in _OPTIONS])
        key = hashlib.sha256(f"{jinja2.__version__}\0{options}\0{name}\0{filename}".encode())
        bucket = Bucket(environment, key.hexdigest(), self.get_source_checksum(source))
        self.load_bytecode(bucket)
        return bucket

    def get_source_checksum(self, source: str) -> str:
        return hashlib.sha256(source.encode("utf-8")).hexdigest()

    def load_bytecode(self, bucket: Bucket) -> None:
        if not self._ours():
            return
        try:
            fd = os.open(self.folder / f"{bucket.key}.jinja",
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        with os.fdopen(fd, "rb") as fh:
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and _trusted(st):
                    bucket.load_bytecode(fh)  # magic, Python version and source checksum checked
            except Exception:  # noqa: BLE001 - a torn or foreign file: compile instead
                bucket.reset()

    def dump_bytecode(self, bucket: Bucket) -> None:
        data = io.BytesIO()
        bucket.write_bytecode(data)
        self._pending[bucket.key] = data.getvalue()

    def keep(self) -> None:
        """Write what this process compiled (call once the render that compiled it succeeded)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        with contextlib.suppress(OSError):
            self.folder.parent.mkdir(parents=True, exist_ok=True)  # the state dir, as render's record
            self.folder.mkdir(mode=0o700, exist_ok=True)
        if not self._ours():
            return
        for key, data in pending.items():
            tmp = None
            try:  # no fsync: a file torn by a crash fails the magic, checksum or marshal check
                fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.folder)  # 0600
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, self.folder / f"{key}.jinja")
                tmp = None
            except OSError:
                return
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)


def for_state_dir(state_dir: Path) -> StateBytecodeCache:
    return StateBytecodeCache(Path(state_dir) / FOLDER)
