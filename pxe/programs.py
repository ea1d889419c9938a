"""Where a daemon's program is: $PATH, then the sbin folders (dhcpd and dnsmasq live there).

A module of its own, standard library os only: `render` names the checking binary in the key of
the installed DHCP config (pxe.dhcpinputs) on every run, and shutil (which also imports bz2, lzma
and fnmatch, ~2 ms) would be imported for its which() alone.
"""

from __future__ import annotations

import os

SBIN = "/usr/sbin:/sbin:/usr/local/sbin"


def which(name: str, path: str | None = None) -> str | None:
    """shutil.which(name, path) on POSIX: the first executable file ``name`` in ``path``
    (default $PATH, else the system's default path)."""
    if os.path.dirname(name):
        return name if _runnable(name) else None
    if path is None:
        path = os.environ.get("PATH")
        if path is None:
            try:
                path = os.confstr("CS_PATH")
            except (AttributeError, ValueError):
                path = os.defpath
    seen: set[str] = set()
    for folder in path.split(os.pathsep) if path else ():
        if folder not in seen:
            seen.add(folder)
            candidate = os.path.join(folder, name)
            if _runnable(candidate):
                return candidate
    return None


def _runnable(path: str) -> bool:
    return os.path.exists(path) and os.access(path, os.X_OK) and not os.path.isdir(path)


def find_binary(name: str) -> str | None:
    """The program ``name`` as the DHCP backends run it: on $PATH, else in the sbin folders."""
    return which(name) or which(name, path=SBIN)
