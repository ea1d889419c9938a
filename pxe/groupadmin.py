"""Membership of the unix group that may change the image repository (`fg-moab-group`).

A thin, checked wrapper around the system's own tools (argv lists, no shell): ``getent`` to
read, ``gpasswd -a/-d`` to change, ``groupadd --system`` to create the group on first use.
Changing membership needs root; listing does not.
"""

from __future__ import annotations

import os
import subprocess

from pxe import validate
from pxe.authz import PermissionDenied
from pxe.errors import DynprovError, InputError


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise DynprovError(f"{argv[0]} not found (Debian package passwd / libc-bin)") from None


def _getent(database: str, key: str) -> list[str] | None:
    proc = _run(["getent", database, key])
    if proc.returncode == 2:  # key not found
        return None
    if proc.returncode != 0:
        raise DynprovError(f"getent {database} {key} failed: {proc.stderr.strip()}")
    return proc.stdout.splitlines()[0].split(":")


def group_exists(group: str) -> bool:
    return _getent("group", validate.unix_name(group, "group")) is not None


def members(group: str) -> list[str]:
    """Listed members plus users whose primary group it is (both count for authz)."""
    entry = _getent("group", validate.unix_name(group, "group"))
    if entry is None:
        raise InputError(f"group {group!r} does not exist (fg-moab-group -add USER creates it)")
    names = {m for m in entry[3].split(",") if m} if len(entry) > 3 else set()
    gid = entry[2]
    proc = _run(["getent", "passwd"])
    for line in proc.stdout.splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[3] == gid:
            names.add(fields[0])
    return sorted(names)


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise PermissionDenied(f"permission denied: {action} needs root")


def _check_user(user: str) -> str:
    validate.unix_name(user, "user")
    if _getent("passwd", user) is None:
        raise InputError(f"no such user {user!r}")
    return user


def add(group: str, user: str) -> bool:
    """Add ``user`` to ``group`` (created if missing). Returns True if the group was created."""
    _require_root(f"changing the members of group {group!r}")
    validate.unix_name(group, "group")
    _check_user(user)
    created = False
    if not group_exists(group):
        proc = _run(["groupadd", "--system", group])
        if proc.returncode != 0:
            raise DynprovError(f"groupadd {group} failed: {proc.stderr.strip()}")
        created = True
    if user in members(group):
        raise InputError(f"user {user!r} is already a member of group {group!r}")
    proc = _run(["gpasswd", "-a", user, group])
    if proc.returncode != 0:
        raise DynprovError(f"gpasswd -a {user} {group} failed: {proc.stderr.strip()}")
    return created


def remove(group: str, user: str) -> None:
    _require_root(f"changing the members of group {group!r}")
    validate.unix_name(group, "group")
    _check_user(user)
    current = members(group)
    if user not in current:
        raise InputError(f"user {user!r} is not a member of group {group!r}")
    proc = _run(["gpasswd", "-d", user, group])
    if proc.returncode != 0:
        # gpasswd cannot take a group away from a user's primary group
        raise DynprovError(f"gpasswd -d {user} {group} failed: {proc.stderr.strip()}")
