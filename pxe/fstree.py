"""A small in-memory file tree, written out as a newc cpio, a tarball or a real directory.

The provisioning initramfs and the test images are built from one of these, so nothing needs
root, loop mounts or mknod: device nodes exist only as archive entries (or mksquashfs pseudo
definitions). Output is reproducible: owner root, fixed mtime (SOURCE_DATE_EPOCH, else 0),
entries in path order.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pxe.errors import DynprovError

CPIO_MAGIC = b"070701"  # newc: what the kernel's initramfs unpacker reads


@dataclass(frozen=True)
class Entry:
    kind: str  # "dir" | "file" | "symlink" | "chardev"
    mode: int
    data: bytes = b""
    target: str = ""
    rdev: tuple[int, int] = (0, 0)

    @property
    def type_bits(self) -> int:
        return {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
                "chardev": stat.S_IFCHR}[self.kind]


def _clean(path: str) -> str:
    """'/a/b' or 'a/b' -> 'a/b'; refuses '..' and empty paths."""
    parts = PurePosixPath("/" + path).parts[1:]
    if not parts or ".." in parts:
        raise DynprovError(f"bad path in file tree: {path!r}")
    return "/".join(parts)


def mtime() -> int:
    try:
        return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    except ValueError:
        return 0


class Tree:
    """Paths (relative, '/'-separated) -> entries; parent directories are added as needed."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _put(self, path: str, entry: Entry) -> str:
        path = _clean(path)
        parent = PurePosixPath(path).parent
        if str(parent) != ".":
            self.add_dir(str(parent))
        old = self.entries.get(path)
        if old is not None and old.kind == "dir" and entry.kind != "dir":
            raise DynprovError(f"file tree: {path} is a directory")
        self.entries[path] = entry
        return path

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        clean = _clean(path)
        if clean in self.entries:
            if self.entries[clean].kind != "dir":
                raise DynprovError(f"file tree: {clean} exists and is not a directory")
            return
        self._put(clean, Entry("dir", mode))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(path, Entry("file", mode, data=data))

    def add_symlink(self, path: str, target: str) -> None:
        self._put(path, Entry("symlink", 0o777, target=target))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(path, Entry("chardev", mode, rdev=(major, minor)))

    def __contains__(self, path: str) -> bool:
        return _clean(path) in self.entries

    def __iter__(self) -> Iterator[tuple[str, Entry]]:
        return iter(sorted(self.entries.items()))

    # --- writers --------------------------------------------------------------------------

    def write_cpio(self, out: BinaryIO) -> None:
        """newc ("070701") archive, as the kernel's initramfs unpacker and cpio -i read it."""
        when = mtime()
        for ino, (path, entry) in enumerate(self, start=1):
            body = entry.target.encode() if entry.kind == "symlink" else entry.data
            _cpio_record(out, path, ino=ino, mode=entry.type_bits | entry.mode, mtime=when,
                         nlink=2 if entry.kind == "dir" else 1, body=body, rdev=entry.rdev)
        _cpio_record(out, "TRAILER!!!", ino=0, mode=0, mtime=0, nlink=1, body=b"")

    def cpio_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.write_cpio(buf)
        return buf.getvalue()

    def write_tar(self, out: BinaryIO, compression: str = "") -> None:
        """A POSIX tarball (compression "", "gz" or "xz") that busybox tar unpacks."""
        if compression not in ("", "gz", "xz"):
            raise DynprovError(f"unknown tar compression {compression!r}")
        when = mtime()
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for path, entry in self:
                info = tarfile.TarInfo(path)
                info.mode, info.mtime, info.uid, info.gid = entry.mode, when, 0, 0
                info.uname = info.gname = "root"
                if entry.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, entry.target
                    tar.addfile(info)
                elif entry.kind == "chardev":
                    info.type = tarfile.CHRTYPE
                    info.devmajor, info.devminor = entry.rdev
                    tar.addfile(info)
                else:
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
        out.write(compress(raw.getvalue(), {"": "none", "gz": "gzip", "xz": "xz"}[compression]))

    def materialize(self, root: Path) -> list[str]:
        """Write files, directories and symlinks under ``root`` (an empty directory). Device
        nodes are not created (that needs root): returns them as mksquashfs pseudo definitions
        ("dev/console c 600 0 0 5 1")."""
        pseudo: list[str] = []
        for path, entry in self:
            dest = root / path
            if entry.kind == "dir":
                dest.mkdir(parents=True, exist_ok=True)
                dest.chmod(entry.mode)
            elif entry.kind == "symlink":
                dest.symlink_to(entry.target)
            elif entry.kind == "chardev":
                pseudo.append(f"{path} c {entry.mode:o} 0 0 {entry.rdev[0]} {entry.rdev[1]}")
            else:
                dest.write_bytes(entry.data)
                dest.chmod(entry.mode)
        return pseudo


def compress(data: bytes, how: str) -> bytes:
    """gzip (mtime 0, reproducible), xz (CRC32 check: what the kernel and busybox unxz read)
    or none."""
    if how == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if how == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if how == "none":
        return data
    raise DynprovError(f"unknown compression {how!r} (gzip, xz or none)")


def _cpio_record(out: BinaryIO, name: str, *, ino: int, mode: int, mtime: int, nlink: int,
                 body: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, len(body), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    header = CPIO_MAGIC + b"".join(b"%08X" % f for f in fields)
    out.write(header + raw_name)
    out.write(b"\0" * (-(len(header) + len(raw_name)) % 4))
    out.write(body)
    out.write(b"\0" * (-len(body) % 4))
