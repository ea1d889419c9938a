"""Running our commands as throw-away unprivileged users (helpers, no tests here).

The checkout may sit in a home only its owner can enter (a clone in /root, 0700 on Debian) and
the test interpreter too (a pyenv under /root). So the users run a copy of the code staged in a
temp dir they can read (staged_code), and when the interpreter is unreachable, inside a private
mount namespace in which the blocking directory is a tmpfs holding only the interpreter's tree
(user_wrap): the user still runs with its own uid and groups, and nothing outside that
short-lived namespace changes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs as root inside `unshare -m`: hide BLOCKED behind a tmpfs that holds only CHILD (bound from
# the real one), then become the user. argv: BLOCKED CHILD USER -- COMMAND...
_EXPOSE = r"""
import os, subprocess, sys, tempfile
blocked, child, user = sys.argv[1:4]
command = sys.argv[5:]
def run(*argv): subprocess.run(argv, check=True)
keep = tempfile.mkdtemp(prefix="dynprov-expose-")
run("mount", "--bind", blocked, keep)
run("mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", blocked)
os.mkdir(os.path.join(blocked, child))
run("mount", "--bind", os.path.join(keep, child), os.path.join(blocked, child))
run("umount", "-l", keep)
os.rmdir(keep)
os.execvp("runuser", ["runuser", "-u", user, "--", *command])
"""


def blocked_ancestors(path: Path) -> list[Path]:
    """Directories on the way to ``path`` that other users may not enter."""
    return [p for p in reversed(path.parents) if not os.stat(p).st_mode & stat.S_IXOTH]


def user_wrap() -> list[str] | str:
    """The argv prefix running a command as "{user}", or why that is impossible here."""
    python = Path(sys.executable).resolve()
    blocked = [p for p in blocked_ancestors(python) if p != python]
    if not blocked:
        return ["runuser", "-u", "{user}", "--"]
    if len(blocked) > 1 or not shutil.which("unshare"):
        return (f"the test interpreter under {blocked[0]} is not reachable by other users and "
                "cannot be exposed here")
    inner = python.relative_to(blocked[0]).parts[0]
    return ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
            "-c", _EXPOSE, str(blocked[0]), inner, "{user}", "--"]


def readable_tempdir(prefix: str) -> Path:
    """A fresh 0755 temp dir whose parents every user may enter (TMPDIR, else /tmp)."""
    for base in (None, "/tmp"):
        candidate = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        if not blocked_ancestors(candidate):
            candidate.chmod(0o755)
            return candidate
        shutil.rmtree(candidate, ignore_errors=True)
    raise AssertionError("no temp dir other users can enter (TMPDIR and /tmp are private)")


@contextlib.contextmanager
def staged_code() -> Iterator[Path]:
    """pxe/, msm_plugin/ and templates/ copied where the throw-away users can read them."""
    parent = readable_tempdir("dynprov-code-")
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("pxe", "msm_plugin", "templates"):
            shutil.copytree(ROOT / name, parent / name, ignore=ignore)
        for path in parent.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def run_as(wrap: list[str], user: str, code: Path, argv: list[str], cwd: Path | None = None,
           env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``argv`` as ``user`` with the staged ``code`` first on PYTHONPATH."""
    prefix = [user if part == "{user}" else part for part in wrap]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(code)}
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or code, env=full_env, stdin=subprocess.DEVNULL)
