"""Opening a file a person named on the command line, as that person could.

Through sudo, root must not lend its rights: the file is opened with the caller's own uid and
groups (``as_caller``). Whoever runs us, the path is never followed through a final symbolic
link (O_NOFOLLOW), and only a regular file is accepted: a FIFO, a device or a directory is
refused at once (O_NONBLOCK, so opening a FIFO cannot hang), never read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

from pxe import authz
from pxe.errors import InputError

TYPE_CHECKING = False  # not typing's: on every command's path (typing costs ~2 ms)
if TYPE_CHECKING:
    from typing import BinaryIO

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def sudo_caller() -> pwd.struct_passwd | None:
    """The user behind sudo, when root runs us for someone else; else None."""
    user = os.environ.get("SUDO_USER")
    if os.geteuid() != 0 or not user or user == "root":
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise authz.PermissionDenied(f"permission denied: unknown SUDO_USER {user!r}") from None


@contextlib.contextmanager
def as_caller() -> Iterator[str]:
    """Inside this block, act with the real user's permissions when run through sudo.

    So a member can use only files they can read, and write only where they may write: root's
    rights are used for the repository and the stores, never for the user's paths.
    """
    caller = sudo_caller()
    if caller is None:
        yield authz.real_user()
        return
    saved_groups = os.getgroups()
    os.setgroups(os.getgrouplist(caller.pw_name, caller.pw_gid))
    os.setegid(caller.pw_gid)
    os.seteuid(caller.pw_uid)
    try:
        yield caller.pw_name
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(saved_groups)


def kind_of(mode: int) -> str:
    """'a FIFO', 'a device' ... for a file that is not a regular file."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_input(path: Path, what: str, *, as_user: bool = True,
               follow_links: bool = False) -> BinaryIO:
    """Open ``path`` for reading: a regular file, not through a final symlink (unless
    ``follow_links``: a path from the site's own config or our own work area), readable by the
    invoking user (``as_user``: SUDO_USER's rights under sudo). Every refusal names ``what``
    and the path; the caller closes the returned file."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    who = as_caller() if as_user else contextlib.nullcontext(authz.real_user())
    with who as user:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise InputError(f"{what} {path}: no such file") from None
        except PermissionError:
            raise authz.PermissionDenied(
                f"permission denied: user {user} cannot read {what} {path}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InputError(f"{what} {path}: is a symbolic link; give the file itself "
                                 "(links are not followed)") from None
            if exc.errno == errno.ENOTDIR:
                raise InputError(f"{what} {path}: no such file (a parent is not a "
                                 "directory)") from None
            raise InputError(f"{what} {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{what} {path}: is {kind_of(mode)}, not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
