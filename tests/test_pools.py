"""pxe.pools in-process: create/list/members/move/delete, busy nodes, the scheduler's view."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pxe import audit, db, pools
from pxe.config import Config
from pxe.errors import DynprovError, InputError, NotFound
from pxe.inventory import Inventory, build

pytestmark = pytest.mark.unit

USER = "tester"


def add_nodes(cfg: Config, conn: sqlite3.Connection, count: int, prefix: str = "n",
              width: int = 3) -> list[str]:
    names = [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]
    Inventory(cfg, conn).add([build(cfg, {"name": n, "macs": [f"52:54:00:00:{i // 256:02x}:"
                                                               f"{i % 256:02x}"]})
                              for i, n in enumerate(names, start=1)])
    return names


def pool_of(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT name, pool FROM nodes").fetchall())


def state(cfg: Config, conn: sqlite3.Connection) -> tuple:
    """Everything a pool operation may change: pools, node pools, events, the audit log."""
    return (conn.execute("SELECT name FROM pools ORDER BY name").fetchall(),
            sorted(pool_of(conn).items()),
            conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'pool-move'").fetchone()[0],
            audit.read(cfg.paths.state_dir))


@pytest.fixture
def cfg(site) -> Config:
    return site.cfg


@pytest.fixture
def conn(cfg: Config) -> Iterator[sqlite3.Connection]:
    connection = db.connect(cfg.database)
    yield connection
    connection.close()


@pytest.fixture
def four(cfg: Config, conn: sqlite3.Connection) -> list[str]:
    """n001-n004 in hpc, and an empty pool 'cloud'."""
    names = add_nodes(cfg, conn, 4)
    pools.create(cfg, conn, "cloud", user=USER)
    return names


def test_scheduler_view_follows_moves(cfg, conn, four):
    assert pools.usable_for_scheduler(cfg, conn) == set(four)
    result = pools.move(cfg, conn, "n[001-002]", "cloud", user=USER)
    assert result.moved == ("n001", "n002") and result.sources == {"hpc": ("n001", "n002")}
    assert pools.usable_for_scheduler(cfg, conn) == {"n003", "n004"}
    assert pools.is_usable_for_scheduler(cfg, "hpc")
    assert not pools.is_usable_for_scheduler(cfg, "cloud")
    pools.move(cfg, conn, ["n001", "n002"], "hpc", user=USER)
    assert pools.usable_for_scheduler(cfg, conn) == set(four)
    listed = {p.name: p for p in pools.list_pools(cfg, conn)}
    assert (listed["hpc"].nodes, listed["hpc"].scheduler) == (4, True)
    assert (listed["cloud"].nodes, listed["cloud"].scheduler) == (0, False)
    assert pools.members(cfg, conn, "hpc") == four
    events = conn.execute("SELECT node, detail FROM events WHERE kind = 'pool-move' "
                          "ORDER BY id").fetchall()
    assert [tuple(e) for e in events] == [
        ("n001", f"hpc -> cloud by {USER}"), ("n002", f"hpc -> cloud by {USER}"),
        ("n001", f"cloud -> hpc by {USER}"), ("n002", f"cloud -> hpc by {USER}")]


def test_audit_records_who_when_nodes_from_to(cfg, conn, four):
    pools.move(cfg, conn, "n[001-003]", "cloud", user=USER)
    pools.create(cfg, conn, "nimbus", user="alice")
    pools.move(cfg, conn, "n[002-004]", "nimbus", user="alice")
    records = audit.read(cfg.paths.state_dir)
    assert [r["action"] for r in records] == ["pool-create", "pool-move", "pool-create",
                                              "pool-move"]
    move2 = records[-1]
    assert move2["user"] == "alice" and move2["ts"]
    assert move2["nodes"] == "n[002-004]" and move2["to"] == "nimbus"
    assert move2["from"] == {"cloud": "n[002-003]", "hpc": "n004"}
    assert move2["force"] is False and move2["forced"] == ""


def test_scheduler_pool_from_config_is_created(site):
    with open(site.config_path, "a") as fh:
        fh.write('\n[groups]\nscheduler_pool = "batch"\n')
    cfg = site.cfg
    conn = db.connect(cfg.database)
    listed = {p.name: p for p in pools.list_pools(cfg, conn)}
    assert listed["batch"].scheduler and listed["batch"].created is None  # listing writes nothing
    assert not pools.exists(conn, "batch")
    assert pools.members(cfg, conn, "batch") == []
    assert pools.ensure_scheduler_pool(cfg, conn, USER)
    assert pools.exists(conn, "batch")
    add_nodes(cfg, conn, 2, prefix="c")
    assert not pools.ensure_scheduler_pool(cfg, conn, USER)  # once only
    assert pools.usable_for_scheduler(cfg, conn) == {"c001", "c002"}  # nodes default to it
    created = [r for r in audit.read(cfg.paths.state_dir) if r["action"] == "pool-create"]
    assert created == [{**created[0], "pool": "batch", "auto": True}]
    with pytest.raises(DynprovError, match="scheduler's pool"):
        pools.delete(cfg, conn, "batch", user=USER)
    pools.delete(cfg, conn, "hpc", user=USER)  # no longer special once empty
    conn.close()


@pytest.mark.parametrize("name", ["a b", "x/y", "../etc", "..", "-x", ".hidden", "a;b", "a$b",
                                  "p\u00e9", "a\nb", "hpc\n", "", "x" * 65, "{{x}}", "a:b"])
def test_bad_pool_names_refused(cfg, conn, four, name):
    before = state(cfg, conn)
    calls = [lambda: pools.create(cfg, conn, name, user=USER),
             lambda: pools.move(cfg, conn, "n001", name, user=USER),
             lambda: pools.move(cfg, conn, "n001", "cloud", user=USER, from_pool=name),
             lambda: pools.members(cfg, conn, name),
             lambda: pools.delete(cfg, conn, name, user=USER)]
    for call in calls:
        with pytest.raises(InputError, match="invalid pool name"):
            call()
    assert state(cfg, conn) == before


def test_unknown_pool(cfg, conn, four):
    before = state(cfg, conn)
    with pytest.raises(NotFound, match="unknown pool 'openstack'"):
        pools.move(cfg, conn, "n001", "openstack", user=USER)
    with pytest.raises(NotFound, match="unknown pool 'openstack'"):
        pools.move(cfg, conn, "n001", "cloud", user=USER, from_pool="openstack")
    with pytest.raises(NotFound, match="unknown pool 'openstack'"):
        pools.members(cfg, conn, "openstack")
    with pytest.raises(NotFound, match="unknown pool 'openstack'"):
        pools.delete(cfg, conn, "openstack", user=USER)
    assert state(cfg, conn) == before


def test_unknown_nodes_named_and_nothing_moves(cfg, conn, four):
    before = state(cfg, conn)
    with pytest.raises(NotFound, match=r"unknown node\(s\): n\[404-405\],x1; nothing moved"):
        pools.move(cfg, conn, "n[001-002],n[404-405],x1", "cloud", user=USER)
    with pytest.raises(InputError, match="invalid node set"):
        pools.move(cfg, conn, "n[001-", "cloud", user=USER)
    with pytest.raises(InputError, match="empty node list"):
        pools.move(cfg, conn, " ", "cloud", user=USER)
    assert state(cfg, conn) == before


def test_move_to_current_pool_is_a_noop(cfg, conn, four):
    before = state(cfg, conn)
    result = pools.move(cfg, conn, "n[001-004]", "hpc", user=USER)
    assert result.moved == () and result.already == tuple(four)
    assert state(cfg, conn) == before  # no audit record, no event: nothing changed
    # a mixed request moves the rest and reports the no-ops
    pools.move(cfg, conn, "n001", "cloud", user=USER)
    result = pools.move(cfg, conn, "n[001-002]", "cloud", user=USER)
    assert result.moved == ("n002",) and result.already == ("n001",)


def test_from_mismatch_is_all_or_nothing(cfg, conn, four):
    pools.create(cfg, conn, "other", user=USER)
    pools.move(cfg, conn, "n003", "cloud", user=USER)
    pools.move(cfg, conn, "n004", "other", user=USER)
    before = state(cfg, conn)
    with pytest.raises(DynprovError) as err:
        pools.move(cfg, conn, "n[001-004]", "other", user=USER, from_pool="hpc")
    assert str(err.value) == ("2 node(s) not in pool 'hpc' (n003 in cloud; n004 in other); "
                              "nothing moved")
    assert state(cfg, conn) == before
    result = pools.move(cfg, conn, "n[001-002]", "other", user=USER, from_pool="hpc")
    assert result.moved == ("n001", "n002")


def _start_run(conn: sqlite3.Connection, node: str, node_state: str = "power-cycled",
               finished: float | None = None) -> int:
    cur = conn.execute("INSERT INTO runs(label, mode, created, finished) VALUES "
                       "('centos', 'ondemand', ?, ?) RETURNING id", (time.time(), finished))
    run_id = int(cur.fetchone()[0])
    conn.execute("INSERT INTO run_nodes(run_id, node, state, updated) VALUES (?, ?, ?, ?)",
                 (run_id, node, node_state, time.time()))
    return run_id


@pytest.mark.parametrize("make_busy,reason", [
    (lambda c: _start_run(c, "n002"), r"n002 in provisioning run \d+ \(power-cycled\)"),
    (lambda c: c.execute("UPDATE nodes SET state = 'booting' WHERE name = 'n002'"),
     r"n002 being provisioned \(state booting\)"),
    (lambda c: c.execute("UPDATE nodes SET state = 'requested' WHERE name = 'n002'"),
     r"n002 being provisioned \(state requested\)"),
    (lambda c: c.execute("UPDATE nodes SET state = 'power-cycled' WHERE name = 'n002'"),
     r"n002 being provisioned \(state power-cycled\)"),
    (lambda c: c.execute("UPDATE nodes SET state = 'busy' WHERE name = 'n002'"),
     r"n002 running a job \(state busy\)"),
    (lambda c: c.execute("UPDATE nodes SET used = 1 WHERE name = 'n002'"),
     r"n002 ran a job since its last re-image"),
], ids=["run", "booting", "requested", "power-cycled", "job", "used"])
def test_busy_node_needs_force(cfg, conn, four, make_busy, reason):
    make_busy(conn)
    before = state(cfg, conn)
    with pytest.raises(DynprovError, match=f"not moved without -force: {reason}; nothing moved"):
        pools.move(cfg, conn, "n[001-003]", "cloud", user=USER)
    assert state(cfg, conn) == before  # n001 and n003 are idle, yet nothing moved
    result = pools.move(cfg, conn, "n[001-003]", "cloud", user=USER, force=True)
    assert result.moved == ("n001", "n002", "n003") and list(result.forced) == ["n002"]
    record = audit.read(cfg.paths.state_dir)[-1]
    assert record["force"] is True and record["forced"] == "n002"
    detail = conn.execute("SELECT detail FROM events WHERE kind = 'pool-move' AND node = 'n002' "
                          "ORDER BY id DESC").fetchone()[0]
    assert "forced" in detail


def test_finished_runs_do_not_make_nodes_busy(cfg, conn, four):
    _start_run(conn, "n001", "power-cycled", finished=time.time())  # run over
    _start_run(conn, "n002", "ready")  # run still going, but this node is done
    _start_run(conn, "n003", "timed out")
    conn.execute("UPDATE nodes SET state = 'ready' WHERE name = 'n004'")
    assert pools.busy(conn, four) == {}
    assert pools.move(cfg, conn, "n[001-004]", "cloud", user=USER).moved == tuple(four)


def test_busy_nodes_already_in_target_are_not_a_problem(cfg, conn, four):
    pools.move(cfg, conn, "n001", "cloud", user=USER)
    conn.execute("UPDATE nodes SET state = 'booting' WHERE name = 'n001'")
    result = pools.move(cfg, conn, "n[001-002]", "cloud", user=USER)
    assert result.moved == ("n002",) and result.already == ("n001",)


def test_create_and_delete(cfg, conn, four):
    with pytest.raises(DynprovError, match="pool 'cloud' already exists"):
        pools.create(cfg, conn, "cloud", user=USER)
    pools.move(cfg, conn, "n[001-003]", "cloud", user=USER)
    before = state(cfg, conn)
    with pytest.raises(DynprovError, match=r"pool 'cloud' is not empty \(3 node\(s\): "
                                           r"n\[001-003\]\)"):
        pools.delete(cfg, conn, "cloud", user=USER)
    assert state(cfg, conn) == before
    with pytest.raises(DynprovError, match="scheduler's pool"):
        pools.delete(cfg, conn, "hpc", user=USER)
    pools.move(cfg, conn, "n[001-003]", "hpc", user=USER)
    pools.delete(cfg, conn, "cloud", user=USER)
    assert not pools.exists(conn, "cloud")
    assert audit.read(cfg.paths.state_dir)[-1] == {
        **audit.read(cfg.paths.state_dir)[-1], "action": "pool-delete", "pool": "cloud",
        "user": USER}


def test_large_move_is_one_transaction(cfg, conn):
    names = add_nodes(cfg, conn, 1200, width=4)
    pools.create(cfg, conn, "cloud", user=USER)
    conn.execute("UPDATE nodes SET state = 'booting' WHERE name = 'n1200'")
    with pytest.raises(DynprovError, match="n1200 being provisioned"):
        pools.move(cfg, conn, "n[0001-1200]", "cloud", user=USER)
    assert set(pool_of(conn).values()) == {"hpc"}
    result = pools.move(cfg, conn, names[:1199], "cloud", user=USER)
    assert len(result.moved) == 1199
    assert pools.usable_for_scheduler(cfg, conn) == {"n1200"}
    assert audit.read(cfg.paths.state_dir)[-1]["nodes"] == "n[0001-1199]"


def test_scheduler_helpers_import_nothing_heavy():
    code = ("import sys, pxe.pools; "
            "print(','.join(m for m in ('ClusterShell', 'jinja2', 'netaddr', 'pyghmi', 'yaml') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == ""


def test_scheduler_helpers_take_the_pool_name(cfg, conn, four):
    """The Moab face reads only the pool's name from the config (tomllib): no Config needed."""
    pools.move(cfg, conn, "n001", "cloud", user=USER)
    assert pools.usable_for_scheduler("hpc", conn) == {"n002", "n003", "n004"}
    assert pools.usable_for_scheduler("cloud", conn) == {"n001"}
    assert pools.is_usable_for_scheduler("hpc", "hpc")


def test_move_rewrites_the_node_report_at_once(cfg, conn, four):
    from msm_plugin import wiki

    wiki.refresh_cfg(cfg)
    report = wiki.report_path(cfg.paths.state_dir)

    def line(node: str) -> str:
        return next(ln for ln in report.read_text().splitlines() if ln.startswith(node + " "))

    assert "STATE=Drained" not in line("n001")
    pools.move(cfg, conn, "n001", "cloud", user=USER)
    assert "STATE=Drained" in line("n001") and "STATE=Drained" not in line("n002")
    pools.move(cfg, conn, "n001", "hpc", user=USER)
    assert "STATE=Drained" not in line("n001")


def test_no_report_file_is_created_for_sites_without_one(cfg, conn, four):
    from msm_plugin import wiki

    pools.move(cfg, conn, "n001", "cloud", user=USER)
    assert not wiki.report_path(cfg.paths.state_dir).exists()


def test_state_words_match_the_run_and_the_report():
    """One vocabulary: what pxe.run writes and the Moab report reads is what the busy check
    knows (pxe.states)."""
    from msm_plugin import wiki
    from pxe import states

    assert pools.PROVISIONING_STATES == wiki.RUN_ACTIVE == states.ACTIVE
    assert pools.RUN_FINAL_STATES == wiki.RUN_FINAL == states.FINAL
