"""set-boot as one set-based transaction (issue 18): what each node records (its boot_set time,
which recovery reads), the one event per command, and the node-range fast path that skips
ClusterShell."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
from ClusterShell.NodeSet import NodeSet
from test_run_support import add_images, configure, driver_held, node_row

from pxe import db, nodeset, run
from pxe.errors import InputError, NotFound
from pxe.inventory import Inventory, build
from pxe.reports import record_report
from pxe.setboot import TOKEN_CHARS, set_boot
from tests.conftest import Site

TOKEN_ALPHABET = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _site(site: Site, tmp_path: Path, count: int) -> object:
    cfg = configure(site)
    add_images(cfg, tmp_path, centos5={}, sles11={}, armos={"arch": "aarch64"})
    Inventory(cfg).add([build(cfg, {"name": f"n{i:03d}", "mac": f"52:54:00:31:{i // 256:02x}:"
                                                              f"{i % 256:02x}"})
                        for i in range(1, count + 1)])
    return cfg


def _store(cfg):
    """The state store the site uses: the SQLite file, or PostgreSQL ([state] url)."""
    return cfg.database


def _stored(cfg) -> dict[str, tuple]:
    conn = db.connect(_store(cfg))
    try:
        return {r[0]: tuple(r[1:]) for r in conn.execute(
            "SELECT name, boot_target, desired_os, boot_token FROM nodes")}
    finally:
        conn.close()


def _boot_set(cfg) -> dict[str, float | None]:
    conn = db.connect(_store(cfg))
    try:
        return dict(conn.execute("SELECT name, boot_set FROM nodes").fetchall())
    finally:
        conn.close()


def _events(cfg) -> list[tuple]:
    conn = db.connect(_store(cfg))
    try:
        return [tuple(r) for r in conn.execute(
            "SELECT node, kind, detail FROM events WHERE kind = 'set-boot' ORDER BY id")]
    finally:
        conn.close()


@pytest.fixture(params=["set-based", "row-by-row"])
def statements(request, monkeypatch):
    """Both ways set-boot writes: SQLite's set-based statements, and the rows one by one that
    an older SQLite and other backends take."""
    if request.param == "row-by-row":
        monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 37, 2))
    return request.param


@pytest.mark.unit
def test_every_node_gets_its_own_token_as_returned_and_one_event(site: Site, tmp_path: Path,
                                                                 statements: str):
    cfg = _site(site, tmp_path, 300)
    # Two nodes of the middle left out: the statement must touch exactly the named ones.
    result = set_boot(cfg, ["n[001-149]", "n[152-300]"], "centos5")
    names = [b.name for b in result]
    assert names == [f"n{i:03d}" for i in range(1, 301) if i not in (150, 151)]
    stored = _stored(cfg)
    tokens = [b.boot_token for b in result]
    assert len(set(tokens)) == len(tokens)  # unique per node
    assert all(len(t) == TOKEN_CHARS and set(t) <= TOKEN_ALPHABET for t in tokens)
    for b in result:
        assert stored[b.name] == ("os", "centos5", b.boot_token)  # node i got token i
    assert stored["n150"][0] == "local" and stored["n150"][2] is None
    # One event for the command: the node set (a list folded), the target, the count.
    assert _events(cfg) == [(None, "set-boot", "centos5: n[001-149,152-300] (298 node(s))")]
    boot_set = _boot_set(cfg)
    assert boot_set["n150"] is None and boot_set["n151"] is None
    assert len({boot_set[n] for n in names}) == 1 and boot_set["n001"] > 0  # one moment
    assert "boot_token" not in repr(result[0]) and result[0].boot_token not in repr(result[0])

    # A second set-boot issues new tokens (one-time) for the same nodes.
    again = set_boot(cfg, "n[001-003]", "sles11")
    assert {b.boot_token for b in again}.isdisjoint(tokens)
    assert _stored(cfg)["n002"] == ("os", "sles11", again[1].boot_token)


@pytest.mark.unit
def test_local_drops_the_tokens_or_keeps_them(site: Site, tmp_path: Path, statements: str):
    cfg = _site(site, tmp_path, 4)
    issued = {b.name: b.boot_token for b in set_boot(cfg, "n[001-004]", "centos5")}
    kept = set_boot(cfg, "n[001-002]", None, keep_tokens=True)
    assert [(b.boot_target, b.desired_os, b.boot_token) for b in kept] == \
        [("local", "centos5", issued["n001"]), ("local", "centos5", issued["n002"])]
    dropped = set_boot(cfg, "n[003-004]", None)
    assert [b.boot_token for b in dropped] == [None, None]
    stored = _stored(cfg)
    assert stored["n001"] == ("local", "centos5", issued["n001"])
    assert stored["n004"] == ("local", "centos5", None)
    assert _events(cfg)[-2:] == [(None, "set-boot", "local: n[001-002] (2 node(s), tokens kept)"),
                                 (None, "set-boot", "local: n[003-004] (2 node(s))")]


@pytest.mark.unit
def test_the_event_names_the_set_as_given_never_every_node(site: Site, tmp_path: Path):
    cfg = _site(site, tmp_path, 600)
    before = _boot_set(cfg)
    set_boot(cfg, " n[001-600] ", "centos5")  # as given (trimmed)
    every_other = [f"n{i:03d}" for i in range(1, 601, 2)]  # folds to 300 ranges: cut short
    set_boot(cfg, every_other, None)
    first, second = _events(cfg)
    assert first == (None, "set-boot", "centos5: n[001-600] (600 node(s))")
    assert second[2].startswith("local: n[001,003,005,") and second[2].endswith("... (300 node(s))")
    assert len(second[2]) < 250
    after = _boot_set(cfg)
    assert all(after[n] > after["n002"] for n in every_other) and before["n001"] is None


@pytest.mark.unit
def test_an_unknown_node_or_another_arch_changes_nothing(site: Site, tmp_path: Path,
                                                         statements: str):
    cfg = _site(site, tmp_path, 3)
    before = _stored(cfg)
    with pytest.raises(NotFound, match=r"unknown node\(s\): n\[004-005\]"):
        set_boot(cfg, "n[001-005]", "centos5")
    with pytest.raises(NotFound, match="n004"):
        set_boot(cfg, "n[003-004]", None)
    with pytest.raises(InputError, match="armos is for aarch64; not for node.s. n001, n002$"):
        set_boot(cfg, "n[001-002]", "armos")
    with pytest.raises(NotFound, match=r"unknown node\(s\): n004$"):  # nodes first, as before
        set_boot(cfg, "n[003-004]", "nope")
    with pytest.raises(NotFound, match="unknown image label"):
        set_boot(cfg, "n003", "nope")
    assert _stored(cfg) == before and _events(cfg) == []
    assert set(_boot_set(cfg).values()) == {None}


@pytest.mark.unit
def test_recovery_leaves_a_boot_set_by_hand_after_the_run(site: Site, tmp_path: Path):
    """The run driver's follow-up resets a node left on the network when its run ended, unless
    someone set its boot afterwards: it reads that from the node's boot_set time."""
    cfg = _site(site, tmp_path, 2)
    conn = db.connect(_store(cfg))
    with driver_held(cfg):
        run.request(cfg, conn, ["n001", "n002"], "centos5")
        issued = {b.name: b.boot_token for b in set_boot(cfg, ["n001", "n002"], "centos5")}
        for name in ("n001", "n002"):
            record_report(conn, name, issued[name], "ready")
        set_boot(cfg, "n002", "sles11")  # by hand, after the run: the admin's, it stays
        assert run.follow_ups(cfg, conn) == ["n001"]
        assert run.follow_ups(cfg, conn) == []
    assert node_row(cfg, "n001")["boot_target"] == "local"
    assert (node_row(cfg, "n002")["boot_target"], node_row(cfg, "n002")["desired_os"]) == \
        ("os", "sles11")
    conn.close()


SPECS = ["n[00000-09999]", "n[1-10]", "gpu[1-4,9]-ib", "n[001-003,002,010-012]", "[1-5]",
         "x[0-3]", "n[5-5]", "a-[1-3]", "n[0-0]", "n[8-12,1-3]", "n[09-11]", " n[1-2] ",
         "rack1-n[0001-0040]"]


@pytest.mark.unit
@pytest.mark.parametrize("spec", SPECS)
def test_simple_ranges_expand_as_clustershell_does(spec: str):
    fast = nodeset._simple_range(spec)
    assert fast is not None  # taken without ClusterShell
    assert fast == list(NodeSet(spec.strip()))
    assert nodeset.expand(spec) == fast


@pytest.mark.unit
@pytest.mark.parametrize("spec", ["n[1-10/2]", "n[1-3],m[1-2]", "n[1-4]!n2",
                                  "n[1-2]-[1-2]", "n1", "n[ 1-3]"])
def test_anything_else_is_left_to_clustershell(spec: str):
    assert nodeset._simple_range(spec) is None
    assert nodeset.expand(spec) == list(NodeSet(spec))


@pytest.mark.unit
@pytest.mark.parametrize("spec", ["-n[1-3]", "n[1-3]-", "n[01-5]", "a" * 62 + "[1-10]", "n[3-1]",
                                  "n[1-100001]", "n[1-3]\n"])
def test_the_fast_path_refuses_what_clustershell_refuses(spec: str):
    with pytest.raises(InputError):
        nodeset.expand(spec)


@pytest.mark.unit
def test_the_fast_path_does_not_import_clustershell():
    import subprocess

    code = ("import sys; from pxe import nodeset; assert len(nodeset.expand('n[0001-2000]')) == 2000;"
            " print('ClusterShell' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
