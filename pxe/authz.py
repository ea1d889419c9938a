"""Who may change what: root, or a member of a configured unix group.

Unprivileged members reach root-owned state through a sudoers rule that lets the group run
just our command; then SUDO_USER names the real caller, and that user's groups are checked.
"""

from __future__ import annotations

import grp
import os
import pwd

from pxe.errors import DynprovError


class PermissionDenied(DynprovError):
    exit_code = 1


def real_user() -> str:
    """The human behind the call: SUDO_USER when root runs us through sudo, else our own uid."""
    uid = os.getuid()
    if uid == 0 and os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_groups(user: str) -> set[str]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return set()
    names = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    try:
        names.add(grp.getgrgid(entry.pw_gid).gr_name)
    except KeyError:
        pass
    return names


def require_group(group: str, action: str) -> str:
    """Return the caller's name if root (not via sudo) or in ``group``; else refuse clearly."""
    user = real_user()
    if user == "root" or (os.getuid() == 0 and not os.environ.get("SUDO_USER")):
        return user
    if group in user_groups(user):
        return user
    raise PermissionDenied(f"permission denied: {action} needs membership of group {group!r} "
                           f"(user {user} is not a member)")
