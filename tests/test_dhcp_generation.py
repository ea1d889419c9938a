"""The DHCP-facts generation (pxe.db migration 8, pxe.dhcpinputs): every write a DHCP config
depends on replaces it, by whichever path (inventory, pools, segments, raw SQL); a set-boot, a
call-home, a state change or a heartbeat never does. On the site's store: SQLite, or
PostgreSQL under DYNPROV_TEST_STATE=postgresql (its own trigger functions)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pxe import db, dhcpinputs, pools, segments, servers, states
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from pxe.power import agent
from pxe.reports import record_report
from pxe.setboot import set_boot
from tests.conftest import Site, fake_bzimage

pytestmark = pytest.mark.unit


def _site(site: Site, tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": f"n0{i}", "mac": f"52:54:00:dd:00:0{i}",
                                    "ip": f"198.18.0.{20 + i}"}) for i in range(1, 4)])
    Catalog(cfg).add("centos5", fake_bzimage(tmp_path / "vmlinuz", b"k" * 512))
    return cfg


def _replace(field: str, value: object) -> Callable:
    """`nodes import` over an existing node (Inventory.add, replace_existing) with one fact changed."""
    def write(cfg, conn) -> None:  # type: ignore[no-untyped-def]
        inv = Inventory(cfg, conn)
        inv.add([dataclasses.replace(inv.get("n01"), **{field: value})], replace_existing=True)
    return write


def _raw(sql: str) -> Callable:
    def write(cfg, conn) -> None:  # type: ignore[no-untyped-def]
        with db.transaction(conn):
            conn.execute(sql)
    return write


def _pool_move(cfg, conn) -> None:  # type: ignore[no-untyped-def]
    pools.create(cfg, conn, "gpu", user="root")
    pools.move(cfg, conn, "n01", "gpu", user="root")


FACT_WRITES = {
    "node added": lambda cfg, conn: Inventory(cfg, conn).add(
        [build(cfg, {"name": "n09", "mac": "52:54:00:dd:00:09"})]),
    "node removed": lambda cfg, conn: Inventory(cfg, conn).remove(["n02"]),
    "set ip": _replace("ip", "198.18.0.99"),
    "set mac": _replace("macs", ("52:54:00:dd:00:99",)),
    "set second mac": _replace("macs", ("52:54:00:dd:00:01", "52:54:00:dd:00:98")),
    "set groups": _replace("groups", ("gpu",)),
    "set arch": _replace("arch", "aarch64"),
    "set firmware": _replace("firmware", "uefi"),
    "set bmc": _replace("bmc_address", "127.0.0.9"),
    "set bmc type": _replace("bmc_type", "wol"),
    "pool move": _pool_move,
    "segment move": lambda cfg, conn: segments.assign(conn, ["n01"], "rack1"),
    "raw UPDATE nodes.ip": _raw("UPDATE nodes SET ip = '198.18.0.77' WHERE name = 'n01'"),
    "raw UPDATE macs": _raw("UPDATE macs SET mac = '52:54:00:dd:00:77' WHERE node = 'n01'"),
    "raw DELETE macs": _raw("DELETE FROM macs WHERE node = 'n01'"),
    "raw UPDATE nodes.groups": _raw("UPDATE nodes SET groups = 'a,b' WHERE name = 'n03'"),
}


@pytest.mark.parametrize("what", FACT_WRITES)
def test_every_dhcp_facts_write_changes_the_generation(site: Site, tmp_path: Path, what: str):
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    before = dhcpinputs.generation(conn)
    assert re.fullmatch(r"[0-9a-f]{16,32}", before)
    rows_before = dhcpinputs.read(conn).rows, dhcpinputs.read(conn).macs
    FACT_WRITES[what](cfg, conn)
    after = dhcpinputs.read(conn)
    assert (after.rows, after.macs) != rows_before or what == "segment move"
    assert after.generation == dhcpinputs.generation(conn) != before
    conn.close()


def _set_boot_both_ways(cfg, conn) -> None:  # type: ignore[no-untyped-def]
    set_boot(cfg, "n[01-03]", "centos5", Inventory(cfg, conn))
    set_boot(cfg, "n[01-02]", None, Inventory(cfg, conn), keep_tokens=True)
    set_boot(cfg, "n03", None, Inventory(cfg, conn))


def _call_home_and_heartbeats(cfg, conn) -> None:  # type: ignore[no-untyped-def]
    token = {b.name: b.boot_token for b in set_boot(cfg, "n[01-03]", "centos5",
                                                     Inventory(cfg, conn))}
    record_report(conn, "n01", token["n01"], "booting")
    record_report(conn, "n01", token["n01"], "ready")  # adopts an agent
    agent.poll(conn, "n01", token["n01"], 1)  # the agent's heartbeat
    servers.beat(conn, "serve/test/1", servers.SERVE, "")  # a server's heartbeat


def _states(cfg, conn) -> None:  # type: ignore[no-untyped-def]
    with db.transaction(conn):
        states.set_node(conn, "n02", state="failed", state_reason="test")
    Inventory(cfg, conn).update_state("n03", state="ready", current_os="centos5", used=1)


OTHER_WRITES = {"set-boot": _set_boot_both_ways, "call-home and heartbeats": _call_home_and_heartbeats,
                "state changes": _states,
                "same ip again": _raw("UPDATE nodes SET ip = ip, state = 'off' WHERE name = 'n01'")}


@pytest.mark.parametrize("what", OTHER_WRITES)
def test_what_no_dhcp_config_shows_keeps_the_generation(site: Site, tmp_path: Path, what: str):
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    before = dhcpinputs.generation(conn)
    OTHER_WRITES[what](cfg, conn)
    assert dhcpinputs.generation(conn) == before
    conn.close()


def test_a_failed_write_keeps_the_generation(site: Site, tmp_path: Path):
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    before = dhcpinputs.generation(conn)
    with pytest.raises(RuntimeError), db.transaction(conn):
        conn.execute("UPDATE nodes SET ip = '198.18.0.55' WHERE name = 'n01'")
        raise RuntimeError("rolled back")
    assert dhcpinputs.generation(conn) == before
    conn.close()


def test_the_triggers_watch_exactly_the_dhcp_host_columns(tmp_path: Path):
    """A new DHCP fact (dhcpinputs.HOST_COLUMNS) needs a migration that watches it too."""
    conn = db.connect(tmp_path / "state.db")
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' "
                       "AND name = 'dhcp_generation_node_changed'").fetchone()[0]
    watched = re.search(r"UPDATE OF (.*?) ON nodes", sql).group(1)
    assert tuple(c.strip() for c in watched.split(",")) == dhcpinputs.HOST_COLUMNS
    from pxe import dbbackend_pg

    assert dbbackend_pg._FACTS == dhcpinputs.HOST_COLUMNS
    conn.close()


@pytest.mark.integration
def test_postgresql_upgrade_from_7_backfills_boot_set_and_keeps_a_generation(monkeypatch):
    """PostgreSQL's own text of migration 8 on a version-7 database with data."""
    import pg_support

    cluster = pg_support.shared()
    url = cluster.new_store()
    try:
        with monkeypatch.context() as m:
            m.setattr(db, "MIGRATIONS", db.MIGRATIONS[:7])
            m.setattr(db, "SCHEMA_VERSION", 7)
            conn = db.connect(url)
            with db.transaction(conn):
                conn.execute("INSERT INTO nodes(name, ip) VALUES ('n001', '10.0.0.1'), "
                             "('n002', NULL)")
                conn.execute("INSERT INTO events(ts, node, kind) VALUES (5.0, 'n001', 'set-boot'), "
                             "(6.0, 'n001', 'set-boot'), (7.0, 'n002', 'report-ready')")
            conn.close()
        conn = db.connect(url)
        from pxe import dbbackend_pg

        assert dbbackend_pg.schema_version(conn) == db.SCHEMA_VERSION >= 8
        assert [tuple(r) for r in conn.execute("SELECT name, boot_set FROM nodes ORDER BY 1")] \
            == [("n001", 6.0), ("n002", None)]
        first = dhcpinputs.generation(conn)
        assert re.fullmatch(r"[0-9a-f]{32}", first)
        with db.transaction(conn):
            conn.execute("UPDATE nodes SET boot_set = 9.0, state = 'off'")  # not a DHCP fact
        assert dhcpinputs.generation(conn) == first
        with db.transaction(conn):
            conn.execute("UPDATE nodes SET ip = '10.0.0.2' WHERE name = 'n002'")
        assert dhcpinputs.generation(conn) != first
        conn.close()
    finally:
        cluster.drop_store(url)
