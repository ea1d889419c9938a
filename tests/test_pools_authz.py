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
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Site, make_site
from unprivileged_support import readable_tempdir, run_as, staged_code, user_wrap

from pxe import audit, db
from pxe.inventory import Inventory, build

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser")
                       or not shutil.which("useradd"),
                       reason="needs root, runuser and useradd to create real users"),
]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Users:
    group: str
    member: str
    outsider: str
    wrap: list[str]  # prefix that makes an argv run as a user: [..., USER-placeholder, ...]
    code: Path  # a copy of the code the users can read (PYTHONPATH and cwd of their commands)

    def as_user(self, user: str, argv: list[str]) -> subprocess.CompletedProcess:
        return run_as(self.wrap, user, self.code, argv)


@pytest.fixture(scope="module")
def code() -> Iterator[Path]:
    with staged_code() as path:
        yield path


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture
def users(code: Path) -> Iterator[Users]:
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
        wrap = user_wrap()
        if isinstance(wrap, str):
            pytest.skip(wrap)
        found = Users(group=group, member=member, outsider=outsider, wrap=wrap, code=code)
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
    root = readable_tempdir("dynprov-pools-authz-")
    try:
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
    conn = db.connect(site.cfg.database)
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
