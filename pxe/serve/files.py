"""Opening a requested file inside a served root, and nothing outside it (TFTP and HTTP).

Rules, the same for both protocols:
- the name is relative to the root; a leading '/' is ignored (GRUB asks for '/grub/grub.cfg'),
  so an absolute path such as '/etc/passwd' means <root>/etc/passwd;
- '\\' counts as '/', and a '..' component is refused outright;
- symlinks are followed only while they stay inside the root (checked on the resolved path,
  and the last component is opened with O_NOFOLLOW so it cannot be swapped afterwards);
- only regular, world-readable files are served (like tftpd-hpa --secure); hidden names
  (a component starting with '.', e.g. the temp files of pxe.atomic) do not exist.
"""

from __future__ import annotations

import errno
import os
import stat


class Refused(Exception):
    """Not allowed: outside the root, '..', not world-readable (TFTP error 2, HTTP 403)."""


class Missing(Exception):
    """No such file (TFTP error 1, HTTP 404)."""


def clean_name(name: str) -> str:
    """The request as a clean relative path, or Refused/Missing."""
    name = name.replace("\\", "/")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
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
