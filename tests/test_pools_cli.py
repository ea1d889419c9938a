"""`fg-pool` as a real process: the original syntax, exit codes, one-line errors, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pxe import audit, db, pools
from pxe.inventory import Inventory, build
from pxe.nodeset import expand

pytestmark = pytest.mark.integration


def fg_pool(site, *argv: str) -> subprocess.CompletedProcess:
    return site.run(*argv, cmd="fg-pool")


def add_nodes(site, count: int) -> list[str]:
    cfg = site.cfg
    names = [f"n{i:03d}" for i in range(1, count + 1)]
    Inventory(cfg).add([build(cfg, {"name": n, "macs": [f"52:54:00:00:01:{i:02x}"]})
                        for i, n in enumerate(names, start=1)])
    return names


def snapshot(site) -> tuple:
    """What fg-pool may change: the pools, every node's pool, the pool events, the audit log."""
    cfg = site.cfg
    conn = db.connect(cfg.database)
    try:
        return (conn.execute("SELECT name FROM pools ORDER BY name").fetchall(),
                conn.execute("SELECT name, pool FROM nodes ORDER BY name").fetchall(),
                conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'pool-move'").fetchone(),
                audit.read(cfg.paths.state_dir))
    finally:
        conn.close()


def node_pools(site) -> dict[str, str]:
    conn = db.connect(site.cfg.database)
    try:
        return dict(conn.execute("SELECT name, pool FROM nodes").fetchall())
    finally:
        conn.close()


@pytest.fixture
def four(site):
    """n001-n004 in hpc, pools 'cloud' and 'other' (empty)."""
    add_nodes(site, 4)
    for name in ("cloud", "other"):
        assert fg_pool(site, "-create", name).returncode == 0
    return site


def test_help():
    for flag in ("--help", "-h"):
        proc = subprocess.run([sys.executable, "-m", "pxe.cli.fg_pool", flag],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0
        for form in ("-create NAME", "-list [NAME]", "[-from FROM] -to TO -resource NODES",
                     "-delete NAME", "-force", "--json", "fgpool"):
            assert form in proc.stdout


def test_original_syntax_and_long_forms(site):
    add_nodes(site, 6)
    assert fg_pool(site, "-create", "openstack").stdout == "created pool openstack\n"
    assert fg_pool(site, "--create", "eucalyptus").returncode == 0
    proc = fg_pool(site, "-to", "openstack", "-resource", "n[001-003]")
    assert (proc.returncode, proc.stdout) == (0, "moved 3 node(s) to openstack: "
                                                 "n[001-003] from hpc\n")
    proc = fg_pool(site, "-from", "openstack", "-to", "eucalyptus", "-resource", "n003")
    assert (proc.returncode, proc.stdout) == (0, "moved 1 node(s) to eucalyptus: "
                                                 "n003 from openstack\n")
    proc = fg_pool(site, "--from", "hpc", "--to", "eucalyptus", "--resource", "n[004-005]",
                   "--json")
    assert json.loads(proc.stdout) == {"to": "eucalyptus", "moved": ["n004", "n005"],
                                       "already": [], "from": {"hpc": ["n004", "n005"]},
                                       "forced": {}}
    table = fg_pool(site, "-list").stdout.splitlines()
    assert [line.split() for line in table] == [["POOL", "NODES", "SCHEDULER"],
                                                ["eucalyptus", "3", "-"], ["hpc", "1", "yes"],
                                                ["openstack", "2", "-"]]
    listed = json.loads(fg_pool(site, "--list", "--json").stdout)
    assert [(p["name"], p["nodes"], p["scheduler"]) for p in listed] == [
        ("eucalyptus", 3, False), ("hpc", 1, True), ("openstack", 2, False)]
    assert fg_pool(site, "-list", "eucalyptus").stdout == "n[003-005]\n"
    members = json.loads(fg_pool(site, "-list", "hpc", "-json").stdout)
    assert members == {"pool": "hpc", "nodeset": "n006", "count": 1, "nodes": ["n006"],
                       "scheduler": True}
    assert fg_pool(site, "-to", "hpc", "-resource", "n[001-005]").returncode == 0
    proc = fg_pool(site, "-list", "openstack")
    assert (proc.returncode, proc.stdout) == (0, "")  # empty pool: nothing to print
    assert fg_pool(site, "-delete", "openstack").stdout == "deleted pool openstack\n"
    assert fg_pool(site, "--delete", "eucalyptus").returncode == 0
    assert [r["action"] for r in audit.read(site.cfg.paths.state_dir)] == [
        "pool-create", "pool-create", "pool-move", "pool-move", "pool-move", "pool-move",
        "pool-delete", "pool-delete"]


@pytest.mark.parametrize("argv", [
    [], ["-list", "-create", "x"], ["-to", "cloud"], ["-resource", "n001"],
    ["-from", "hpc", "-resource", "n001"], ["-force", "-list"], ["-create"],
    ["-to", "cloud", "-resource", "n001", "extra"], ["-cr", "x"], ["--bogus"],
    ["-delete", "cloud", "-to", "hpc", "-resource", "n001"],
])
def test_usage_errors(four, argv):
    before = snapshot(four)
    proc = fg_pool(four, *argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fg-pool: ") and len(proc.stderr.splitlines()) == 1
    assert snapshot(four) == before


@pytest.mark.parametrize("argv,code,message", [
    (["-create", "a b"], 2, "invalid pool name 'a b'"),
    (["-create", "../x"], 2, "invalid pool name '../x'"),
    (["-create", "p\u00e9"], 2, "invalid pool name"),
    (["-to", "x/y", "-resource", "n001"], 2, "invalid pool name 'x/y'"),
    (["-from", "a;b", "-to", "cloud", "-resource", "n001"], 2, "invalid pool name 'a;b'"),
    (["-list", "{{x}}"], 2, "invalid pool name"),
    (["-delete", "$x"], 2, "invalid pool name '$x'"),
    (["-to", "openstack", "-resource", "n001"], 1, "unknown pool 'openstack'"),
    (["-from", "openstack", "-to", "cloud", "-resource", "n001"], 1, "unknown pool 'openstack'"),
    (["-list", "openstack"], 1, "unknown pool 'openstack'"),
    (["-delete", "openstack"], 1, "unknown pool 'openstack'"),
    (["-to", "cloud", "-resource", "n[003-006]"], 1, "unknown node(s): n[005-006]; nothing moved"),
    (["-to", "cloud", "-resource", "n[001-"], 2, "invalid node set"),
    (["-to", "cloud", "-resource", ""], 2, "empty node list"),
    (["-create", "other"], 1, "pool 'other' already exists"),
    (["-delete", "cloud"], 1, "pool 'cloud' is not empty (1 node(s): n004)"),
    (["-delete", "hpc"], 1, "scheduler's pool"),
    (["-from", "cloud", "-to", "other", "-resource", "n[003-004]"], 1,
     "1 node(s) not in pool 'cloud' (n003 in hpc); nothing moved"),
    (["-from", "hpc", "-to", "other", "-resource", "n[001-004]"], 1,
     "1 node(s) not in pool 'hpc' (n004 in cloud); nothing moved"),
    (["-to", "other", "-resource", "n[001-003]"], 1,
     "busy node(s) not moved without -force: n002 being provisioned (state booting); "
     "nothing moved"),
])
def test_bad_input_changes_nothing(four, argv, code, message):
    assert fg_pool(four, "-to", "cloud", "-resource", "n004").returncode == 0
    Inventory(four.cfg).update_state("n002", state="booting")
    before = snapshot(four)
    proc = fg_pool(four, *argv)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == f"fg-pool: {message}\n" or (
        message in proc.stderr and len(proc.stderr.splitlines()) == 1), proc.stderr
    assert proc.stdout == ""
    assert snapshot(four) == before


def test_missing_config_is_one_line(tmp_path):
    env = {**os.environ, "DYNPROV_CONFIG": str(tmp_path / "nope.toml")}
    proc = subprocess.run([sys.executable, "-m", "pxe.cli.fg_pool", "-list"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "configuration file not found" in proc.stderr


def test_move_to_current_pool_says_so(four):
    before = snapshot(four)
    proc = fg_pool(four, "-to", "hpc", "-resource", "n[001-004]")
    assert (proc.returncode, proc.stdout) == (0, "n[001-004] already in pool hpc: nothing to do\n")
    assert snapshot(four) == before
    proc = fg_pool(four, "-from", "hpc", "-to", "hpc", "-resource", "n001")
    assert (proc.returncode, proc.stdout) == (0, "n001 already in pool hpc: nothing to do\n")
    assert fg_pool(four, "-to", "cloud", "-resource", "n001").returncode == 0
    proc = fg_pool(four, "-to", "cloud", "-resource", "n[001-002]")
    assert proc.stdout == ("moved 1 node(s) to cloud: n002 from hpc\n"
                           "n001 already in pool cloud: nothing to do\n")


def test_busy_nodes_move_with_force(four):
    inv = Inventory(four.cfg)
    inv.update_state("n002", state="booting")
    inv.update_state("n003", used=1)
    proc = fg_pool(four, "-to", "cloud", "-resource", "n[001-003]")
    assert proc.returncode == 1
    assert proc.stderr == ("fg-pool: busy node(s) not moved without -force: n002 being "
                           "provisioned (state booting); n003 ran a job since its last "
                           "re-image; nothing moved\n")
    assert set(node_pools(four).values()) == {"hpc"}
    proc = fg_pool(four, "-to", "cloud", "-resource", "n[001-003]", "-force")
    assert proc.returncode == 0, proc.stderr
    assert "forced: n002 being provisioned (state booting); n003 ran a job" in proc.stdout
    record = audit.read(four.cfg.paths.state_dir)[-1]
    assert (record["nodes"], record["force"], record["forced"]) == ("n[001-003]", True,
                                                                    "n[002-003]")
    conn = db.connect(four.cfg.database)
    assert pools.usable_for_scheduler(four.cfg, conn) == {"n004"}
    conn.close()


# -- two movers at once --------------------------------------------------------------------
def _start(site, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    return subprocess.Popen([sys.executable, "-m", "pxe.cli.fg_pool", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_db_open(proc: subprocess.Popen, db_path: Path, limit: float = 30.0) -> None:
    """Until the process has the state database open (it then queues on the write lock)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mover finished while the write lock was held"
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            if any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(db_path) for fd in fds):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"mover {proc.pid} did not open {db_path} within {limit} s")


def _wait_until_queued(holder, procs: list[subprocess.Popen], limit: float = 60.0) -> None:
    """PostgreSQL: until every mover waits for the writers' advisory lock the holder has."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a mover finished while the lock was held"
        waiting = holder.execute("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' "
                                 "AND NOT granted").fetchone()[0]
        if waiting >= len(procs):
            return
        time.sleep(0.05)
    raise AssertionError(f"the movers did not queue on the write lock within {limit} s")


def _concurrently(site, *moves: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Start every mover while this test holds the write lock, then let them all go at once."""
    cfg = site.cfg
    holder = db.connect(cfg.database)
    holder.execute("BEGIN IMMEDIATE")
    procs: list[subprocess.Popen] = []
    try:
        procs = [_start(site, *argv) for argv in moves]
        if cfg.state.url:
            _wait_until_queued(holder, procs)
        for proc in procs if not cfg.state.url else ():
            _wait_until_db_open(proc, cfg.db_path)
        time.sleep(0.3)
        assert all(p.poll() is None for p in procs)  # all waiting on the same lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    results = []
    for proc, argv in zip(procs, moves, strict=True):
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return results


def _replay(start: dict[str, str], records: list[dict]) -> dict[str, str]:
    """Apply the audit log's moves in order, checking each 'from' against the replayed state."""
    where = dict(start)
    for record in records:
        if record["action"] != "pool-move":
            continue
        moved = expand(record["nodes"])
        sources = [n for pool, ns in record["from"].items() for n in expand(ns)]
        assert sorted(sources) == sorted(moved), record
        for pool, ns in record["from"].items():
            for node in expand(ns):
                assert where[node] == pool, f"audit says {node} left {pool}, it was in " \
                                            f"{where[node]}: {record}"
                where[node] = record["to"]
    return where


def test_two_moves_at_once_are_serialised(site):
    names = add_nodes(site, 20)
    for name in ("cloud", "other"):
        assert fg_pool(site, "-create", name).returncode == 0
    state_dir = site.cfg.paths.state_dir
    logged = len(audit.read(state_dir))
    start = node_pools(site)

    # plain moves of overlapping node sets: both succeed, one after the other
    results = _concurrently(site, ("-to", "cloud", "-resource", "n[001-020]"),
                            ("-to", "other", "-resource", "n[011-020]"))
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    records = audit.read(state_dir)[logged:]
    assert [r["action"] for r in records] == ["pool-move", "pool-move"]
    assert _replay(start, records) == node_pools(site)
    first = records[0]["to"]
    # whichever ran second saw the first one's result as its 'from'
    if first == "cloud":
        assert records[1]["from"] == {"cloud": "n[011-020]"}
    else:
        assert records[1]["from"] == {"hpc": "n[001-010]", "other": "n[011-020]"}

    # -from moves of the same nodes: exactly one wins, the other moves nothing
    assert fg_pool(site, "-to", "hpc", "-resource", "n[001-020]").returncode == 0
    logged = len(audit.read(state_dir))
    start = node_pools(site)
    results = _concurrently(site, ("-from", "hpc", "-to", "cloud", "-resource", "n[001-020]"),
                            ("-from", "hpc", "-to", "other", "-resource", "n[001-020]"))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [r.stderr for r in results]
    winner = next(r for r in results if r.returncode == 0).args[3]
    loser = next(r for r in results if r.returncode == 1)
    assert loser.stderr == (f"fg-pool: 20 node(s) not in pool 'hpc' (n[001-020] in {winner}); "
                            "nothing moved\n")
    records = audit.read(state_dir)[logged:]
    assert len(records) == 1 and records[0]["to"] == winner
    assert _replay(start, records) == node_pools(site) == dict.fromkeys(names, winner)
