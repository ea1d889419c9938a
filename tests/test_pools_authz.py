"""Who may change pools, with real unix users and a real group (created here, removed after).

The commands run as those users through `runuser -u USER --` (a real uid, a real group lookup).
When the test interpreter lives under a directory other users cannot enter (a pyenv under
/root, mode 0700), the command runs in a private mount namespace in which that directory is a
tmpfs holding only the interpreter's tree: the user still runs with its own uid and groups,
and nothing outside that short-lived namespace changes. The checkout itself may be anywhere (a
clone in a 0700 home): the code the users run is a copy staged in a temp dir they can read.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Site, make_site

from pxe import audit, db
from pxe.inventory import Inventory, build

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser")
                       or not shutil.which("useradd"),
                       reason="needs root, runuser and useradd to create real users"),
]

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


def _blocked_ancestors(path: Path) -> list[Path]:
    """Directories on the way to ``path`` that other users may not enter."""
    return [p for p in reversed(path.parents) if not os.stat(p).st_mode & stat.S_IXOTH]


@dataclass
class Users:
    group: str
    member: str
    outsider: str
    wrap: list[str]  # prefix that makes an argv run as a user: [..., USER-placeholder, ...]
    code: Path  # a copy of the code the users can read (PYTHONPATH and cwd of their commands)

    def as_user(self, user: str, argv: list[str]) -> subprocess.CompletedProcess:
        prefix = [user if part == "{user}" else part for part in self.wrap]
        env = {**os.environ, "PYTHONPATH": str(self.code)}
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120,
                              cwd=self.code, env=env)


@pytest.fixture(scope="module")
def staged_code() -> Iterator[Path]:
    """pxe/, msm_plugin/ and templates/ copied where the throw-away users can read them: the
    checkout may sit in a home only its owner can enter (0700 on Debian)."""
    parent = None
    for base in (None, "/tmp"):
        candidate = Path(tempfile.mkdtemp(prefix="dynprov-code-", dir=base))
        if not _blocked_ancestors(candidate):
            parent = candidate
            break
        shutil.rmtree(candidate, ignore_errors=True)
    if parent is None:
        raise AssertionError("no temp dir other users can enter (TMPDIR and /tmp are private)")
    try:
        parent.chmod(0o755)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("pxe", "msm_plugin", "templates"):
            shutil.copytree(ROOT / name, parent / name, ignore=ignore)
        for path in parent.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture
def users(staged_code: Path) -> Iterator[Users]:
    tag = secrets.token_hex(3)
    group, member, outsider = f"dpg{tag}", f"dpm{tag}", f"dpo{tag}"
    created: list[tuple[str, str]] = []
    try:
        _sh("groupadd", group)
        created.append(("groupdel", group))
        _sh("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", group, member)
        created.insert(0, ("userdel", member))
        _sh("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", outsider)
        created.insert(0, ("userdel", outsider))
        wrap = ["runuser", "-u", "{user}", "--"]
        blocked = [p for p in _blocked_ancestors(Path(sys.executable).resolve())
                   if p != Path(sys.executable).resolve()]
        if blocked:
            inner = Path(sys.executable).resolve().relative_to(blocked[0]).parts[0]
            if len(blocked) > 1 or not shutil.which("unshare"):
                pytest.skip(f"the test interpreter under {blocked[0]} is not reachable by "
                            "other users and cannot be exposed here")
            wrap = ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                    "-c", _EXPOSE, str(blocked[0]), inner, "{user}", "--"]
        found = Users(group=group, member=member, outsider=outsider, wrap=wrap, code=staged_code)
        probe = found.as_user(outsider, [sys.executable, "-c", "import pxe.cli.fg_pool"])
        if probe.returncode != 0:
            pytest.skip(f"a test user cannot run the interpreter: {probe.stderr.strip()[-200:]}")
        yield found
    finally:
        for argv in created:
            subprocess.run(argv, capture_output=True, timeout=60)


@pytest.fixture
def shared_site(users: Users) -> Iterator[Site]:
    """A site other users can read (pytest's tmp dirs are private), pool changes for `group`."""
    root = Path(tempfile.mkdtemp(prefix="dynprov-pools-authz-"))
    try:
        root.chmod(0o755)
        site = make_site(root / "site")
        with open(site.config_path, "a") as fh:
            fh.write(f'\n[groups]\npool = "{users.group}"\n')
        cfg = site.cfg
        Inventory(cfg).add([build(cfg, {"name": f"n00{i}", "macs": [f"52:54:00:00:02:0{i}"]})
                            for i in (1, 2, 3)])
        assert site.run("-create", "cloud", cmd="fg-pool").returncode == 0
        yield site
    finally:
        shutil.rmtree(root, ignore_errors=True)


def snapshot(site: Site) -> tuple:
    conn = db.connect(site.cfg.db_path)
    try:
        return (conn.execute("SELECT name FROM pools ORDER BY name").fetchall(),
                conn.execute("SELECT name, pool FROM nodes ORDER BY name").fetchall(),
                conn.execute("SELECT COUNT(*) FROM events").fetchone(),
                audit.read(site.cfg.paths.state_dir))
    finally:
        conn.close()


def fg_pool_argv(site: Site, *argv: str) -> list[str]:
    return [sys.executable, "-m", "pxe.cli.fg_pool", "--config", str(site.config_path), *argv]


CHANGES = [("-to", "cloud", "-resource", "n[001-002]"),
           ("-from", "hpc", "-to", "cloud", "-resource", "n003", "-force"),
           ("-create", "openstack"), ("-delete", "cloud")]


@pytest.mark.parametrize("change", CHANGES, ids=["to", "from-to", "create", "delete"])
def test_outsider_is_refused_and_nothing_changes(users, shared_site, change):
    before = snapshot(shared_site)
    proc = users.as_user(users.outsider, fg_pool_argv(shared_site, *change))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"fg-pool: permission denied: changing resource pools needs "
                           f"membership of group '{users.group}' (user {users.outsider} is not "
                           f"a member)\n")
    assert proc.stdout == ""
    assert snapshot(shared_site) == before


def test_outsider_through_sudo_is_refused(users, shared_site):
    """sudo runs us as root with SUDO_USER set: the real caller's groups decide."""
    before = snapshot(shared_site)
    env = {**os.environ, "SUDO_USER": users.outsider}
    proc = subprocess.run(fg_pool_argv(shared_site, "-to", "cloud", "-resource", "n001"),
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 1
    assert f"needs membership of group '{users.group}'" in proc.stderr
    assert snapshot(shared_site) == before


def test_member_may_move_and_is_named_in_the_audit_log(users, shared_site):
    env = {**os.environ, "SUDO_USER": users.member}
    proc = subprocess.run(fg_pool_argv(shared_site, "-to", "cloud", "-resource", "n001"),
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    # The member as itself (no sudo), on a state dir its group may write.
    state = shared_site.cfg.paths.state_dir
    for path in [state, *state.iterdir()]:
        shutil.chown(path, group=users.group)
        path.chmod(0o2775 if path.is_dir() else 0o664)
    proc = users.as_user(users.member, fg_pool_argv(shared_site, "-to", "cloud", "-resource",
                                                    "n002"))
    assert proc.returncode == 0, proc.stderr
    moves = [r for r in audit.read(state) if r["action"] == "pool-move"]
    assert [(r["user"], r["nodes"], r["from"], r["to"]) for r in moves] == [
        (users.member, "n001", {"hpc": "n001"}, "cloud"),
        (users.member, "n002", {"hpc": "n002"}, "cloud")]
    # listing needs no group (only read access to the state, here through sudo)
    env = {**os.environ, "SUDO_USER": users.outsider}
    proc = subprocess.run(fg_pool_argv(shared_site, "-list", "cloud"), capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (0, "n[001-002]\n"), proc.stderr
