"""Atomic file writes and the render lock: a reader never sees a torn file, a crash keeps the old one."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

TYPE_CHECKING = False  # not typing's: on every command's path (typing costs ~2 ms)
if TYPE_CHECKING:
    from typing import BinaryIO


def temp_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A new file beside ``path`` for writing then renaming over it: (fd, name), as
    tempfile.mkstemp makes one (O_EXCL, O_NOFOLLOW, close-on-exec, mode 0600, a random name)
    without importing tempfile (with shutil, random, bz2, lzma: ~3 ms of a command's start)."""
    parent = os.fspath(path.parent) if str(path.parent) else "."
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _attempt in range(100):  # bounded: 48 random bits each
        name = os.path.join(parent, f".{path.name}.{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write ``data`` to ``path`` by temp file + fsync + rename. Returns False if unchanged."""
    path = Path(path)
    try:
        if path.read_bytes() == data:
            return False
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def _syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd`` (Linux syncfs(2)); falls back to sync(2)."""
    import ctypes

    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0:
            return
    except (AttributeError, OSError):
        pass
    os.sync()


def write_many(files: dict[Path, bytes], mode: int = 0o644) -> list[Path]:
    """Write many files atomically with one filesystem sync instead of one fsync per file.

    Each file still appears by rename, so a reader sees the old or the new content; the single
    syncfs() before the renames gives the same crash guarantee as per-file fsync. Returns the
    paths that changed.
    """
    pending: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            try:
                if path.read_bytes() == data:
                    continue
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                pass
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = temp_beside(path)
            pending.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)
        if pending:
            fd = os.open(pending[0][1].parent, os.O_RDONLY)
            try:
                _syncfs(fd)
            finally:
                os.close(fd)
        for tmp, path in pending:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return [path for _, path in pending]


@contextlib.contextmanager
def streamed(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write a large file by streaming into a temp file beside ``path``; rename on success.

    On any exception the temp file is removed and ``path`` keeps its old content (if any).
    """
    path = Path(path)
    fd, tmp = temp_beside(path, "")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str, mode: int = 0o644) -> bool:
    return write_bytes(path, text.encode(), mode)


@contextlib.contextmanager
def locked(lock_path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an flock on ``lock_path`` (created if missing) for the duration of the block."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
