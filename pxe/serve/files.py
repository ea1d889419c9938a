"""Opening a requested file inside a served root, and nothing outside it (TFTP and HTTP).

Rules, the same for both protocols:
- the name is relative to the root; a leading '/' is ignored (GRUB asks for '/grub/grub.cfg'),
  so an absolute path such as '/etc/passwd' means <root>/etc/passwd;
- '\\' counts as '/', and a '..' component is refused outright;
- symlinks are followed only while they stay inside the root (checked on the resolved path,
  and the last component is opened with O_NOFOLLOW so it cannot be swapped afterwards);
- only regular, world-readable files are served (like tftpd-hpa --secure); hidden names
  (a component starting with '.', e.g. the temp files of pxe.atomic) do not exist.

The common case costs one system call: openat2(2) relative to the root with RESOLVE_BENEATH
(Linux 5.6+; the kernel follows symlinks only while they stay beneath the root, atomically).
What it refuses (an absolute symlink, even one into the root; an escape) and kernels without it
go the portable way: realpath, the prefix check, O_NOFOLLOW (os.path.realpath alone cost six
lstat calls per request, measured in tools/bench_http.py's CPU per small GET).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import time


class Refused(Exception):
    """Not allowed: outside the root, '..', not world-readable (TFTP error 2, HTTP 403)."""


class Missing(Exception):
    """No such file (TFTP error 1, HTTP 404)."""


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def clean_name(name: str) -> str:
    """The request as a clean relative path, or Refused/Missing."""
    name = name.replace("\\", "/")
    if _CONTROL.search(name):
        raise Refused("control character in the file name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused("'..' in the file name")
    if not parts:
        raise Missing("no file name")
    if any(p.startswith(".") for p in parts):
        raise Missing("hidden file")
    return "/".join(parts)


def root_of(path: str | os.PathLike[str]) -> str:
    """The root as its real path, checked once at start-up."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise FileNotFoundError(f"served root {path} is not a directory")
    return real


def open_file(root: str, name: str) -> tuple[int, os.stat_result, str]:
    """Open ``name`` under ``root`` (a real path from root_of) -> (fd, stat, relative name).

    The caller owns the returned file descriptor.
    """
    rel = clean_name(name)
    fd = _open_beneath(root, rel)
    if fd is None:
        fd = _open_by_realpath(root, rel)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Missing(f"{rel} is not a regular file")
        if not st.st_mode & stat.S_IROTH:
            raise Refused(f"{rel} is not world-readable")
    except BaseException:
        os.close(fd)
        raise
    return fd, st, rel


def _open_by_realpath(root: str, rel: str) -> int:
    real = os.path.realpath(os.path.join(root, rel))
    if not real.startswith(root + os.sep):
        raise Refused(f"{rel} leads outside the root")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise Missing(rel) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(f"{rel} changed into a symlink") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise Refused(f"{rel}: permission denied") from None
        raise Missing(f"{rel}: {exc.strerror}") from None
    return fd


# -- openat2(2) with RESOLVE_BENEATH -------------------------------------------------------------
class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added in 5.6)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x02, 0x08
_HOW = _OpenHow(os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, 0,
                _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
_HOW_SIZE = ctypes.c_size_t(ctypes.sizeof(_HOW))
_HOW_REF = ctypes.byref(_HOW)
ROOT_FD_AGE = 1.0  # seconds an O_PATH fd of a root is used before it is opened again
_root_fds: dict[str, tuple[int, float]] = {}  # root -> (O_PATH fd, when opened)
_libc: list = []  # [syscall function], or [None] once openat2 turned out to be unavailable


def _open_beneath(root: str, rel: str) -> int | None:
    """An fd of ``rel`` opened beneath ``root`` by the kernel; Missing; or None: ask realpath."""
    if not _libc:
        try:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
            syscall.restype = ctypes.c_long
            _libc.append(syscall)
        except (OSError, AttributeError):
            _libc.append(None)
    syscall = _libc[0]
    if syscall is None:
        return None
    dirfd = _root_dir(root)
    if dirfd is None:
        return None
    fd = syscall(_SYS_OPENAT2, dirfd, rel.encode("utf-8", "surrogateescape"), _HOW_REF,
                 _HOW_SIZE)
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.ENOTDIR):
        raise Missing(rel)
    if err in (errno.ENOSYS, errno.EINVAL):
        _libc[0] = None  # an old kernel (or a filter): the portable way from now on
    return None  # EXDEV (a way out, or an absolute symlink), EACCES, ELOOP...: realpath judges


def _root_dir(root: str) -> int | None:
    """An O_PATH fd of ``root``, opened again every ROOT_FD_AGE seconds: a root directory
    replaced under its name (moved away, made anew) is served within a second, as by name."""
    now = time.monotonic()
    held = _root_fds.get(root)
    if held is not None:
        if now - held[1] < ROOT_FD_AGE:
            return held[0]
        del _root_fds[root]
        os.close(held[0])
    try:
        dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    _root_fds[root] = (dirfd, now)
    return dirfd
