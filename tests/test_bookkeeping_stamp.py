"""Heartbeats and claim leases are bookkeeping: they must not move the change stamp that boot
configs (pxe-stage serve) and Moab's report (cluster-query) key on, or every beat makes the
next poll cold. A real node change still moves it. Runs on both backends
(DYNPROV_TEST_STATE=postgresql)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_power_support import add_nodes
from test_run_support import add_images

from msm_plugin import wiki
from pxe import claims, db, run, servers, states
from pxe.power import agent
from pxe.serve.bootconfigs import BootConfigs
from tests.conftest import Site

MACS = {"n001": "52:54:00:32:00:01", "n002": "52:54:00:32:00:02"}


@pytest.mark.unit
def test_heartbeats_and_leases_leave_the_stamp_and_the_report_warm(site: Site, tmp_path: Path
                                                                   ) -> None:
    cfg = site.cfg
    add_nodes(cfg, [{"name": n, "mac": m} for n, m in MACS.items()])
    add_images(cfg, tmp_path, centos5={})
    conn = db.connect(cfg.database)
    req = run.request(cfg, conn, list(MACS), "centos5")
    keys = [(req.run_id, n) for n in MACS]
    report = wiki.refresh(cfg.database, cfg.paths.state_dir, cfg.groups.scheduler_pool, cfg.path)
    configs = BootConfigs(cfg)
    configs.lookup("pxelinux.cfg/01-52-54-00-32-00-01")
    stamp, key = db.read_stamp(cfg.database), configs._current_key()
    assert stamp
    driver = "driver/test"
    # Heartbeats of a serve and a driver, and the driver's claims and renewals, over
    # twelve beats of 5 s (explicit clock: no sleeping).
    for beat in range(12):
        now = 1_000_000.0 + 5 * beat
        servers.beat(conn, "serve/test", servers.SERVE, "", now)
        servers.beat(conn, driver, servers.DRIVER, "", now)
        assert claims.claim(conn, driver, keys, 30, now) == set(keys)
        assert claims.renew(conn, driver, 30, now) == len(keys)
        assert servers.watch(conn, 30, now) == ([], [])
    # A booted image's agent polls every few seconds too.
    with db.transaction(conn):
        agent.adopt(conn, "n002", "agent-token", 1_000_000.0)
    stamp, key = db.read_stamp(cfg.database), configs._current_key()
    report = wiki.refresh(cfg.database, cfg.paths.state_dir, cfg.groups.scheduler_pool, cfg.path)
    for seq in range(1, 13):
        assert agent.poll(conn, "n002", "agent-token", seq) == "ok"
    assert agent.heartbeat_age(conn, "n002") is not None  # the polls were written
    assert conn.execute("SELECT heartbeat FROM servers WHERE name = ?", (driver,)).fetchone()[0] \
        == 1_000_055.0  # the beats were written
    assert db.read_stamp(cfg.database) == stamp
    assert configs._current_key() == key
    # Moab's next poll is the cached report, byte for byte (the same ``made=`` header).
    assert wiki.refresh(cfg.database, cfg.paths.state_dir, cfg.groups.scheduler_pool,
                        cfg.path) == report
    # A real node change moves the stamp, and the report and boot configs follow it.
    with db.transaction(conn):
        states.transition(conn, req.run_id, "n001", states.FAILED, "test")
    assert db.read_stamp(cfg.database) != stamp
    assert configs._current_key() != key
    assert wiki.refresh(cfg.database, cfg.paths.state_dir, cfg.groups.scheduler_pool,
                        cfg.path) != report
    conn.close()


def _wiki_line(cfg, name: str) -> str:
    text = wiki.refresh(cfg.database, cfg.paths.state_dir, cfg.groups.scheduler_pool, cfg.path)
    return next(line for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.unit
def test_moab_hears_why_a_silent_segments_run_node_is_down(site: Site, tmp_path: Path) -> None:
    cfg = site.cfg
    add_nodes(cfg, [{"name": n, "mac": m} for n, m in MACS.items()])
    add_images(cfg, tmp_path, centos5={})
    site.run("nodes", "set", "n001", "--segment", "east", check=True)
    conn = db.connect(cfg.database)
    req = run.request(cfg, conn, list(MACS), "centos5")
    now = 2_000_000_000.0  # later than the run's deadline is far (explicit clock)
    servers.beat(conn, "serve/east", servers.SERVE, "east", now - 100)
    servers.beat(conn, "serve/primary", servers.SERVE, "", now)
    assert servers.watch(conn, 30, now)[0] == ["n001"]
    line = _wiki_line(cfg, "n001")
    assert "STATE=Down" in line and "boot server of segment east silent since" in line, line
    assert "provisioning centos5" not in line
    assert f"provisioning centos5\\: requested (run {req.run_id})" in _wiki_line(cfg, "n002")
    servers.beat(conn, "serve/east2", servers.SERVE, "east", now + 1)  # back
    assert servers.watch(conn, 30, now + 1)[1] == ["n001"]
    line = _wiki_line(cfg, "n001")
    assert f"provisioning centos5\\: requested (run {req.run_id})" in line, line
    conn.close()


def _bookkeeping(conn, driver: str, keys, now: float) -> None:
    """A serve's and a driver's heartbeats, the driver's claims and lease renewal."""
    servers.beat(conn, "serve/test", servers.SERVE, "", now)
    servers.beat(conn, driver, servers.DRIVER, "", now)
    claims.claim(conn, driver, keys, 30, now)
    claims.renew(conn, driver, 30, now)


@pytest.mark.unit
def test_the_drivers_announcement_key_moves_with_content_only(site: Site, tmp_path: Path
                                                               ) -> None:
    """pxe.run.drive announces to the faces (Moab's report file) when db.content_stamp moves:
    its own heartbeats and leases (same connection) and other processes' must not move it;
    a content commit on either connection must."""
    cfg = site.cfg
    add_nodes(cfg, [{"name": n, "mac": m} for n, m in MACS.items()])
    add_images(cfg, tmp_path, centos5={})
    mine, other = db.connect(cfg.database), db.connect(cfg.database)
    req = run.request(cfg, mine, list(MACS), "centos5")
    keys = [(req.run_id, n) for n in MACS]
    key = db.content_stamp(mine)
    for beat in range(6):
        _bookkeeping(mine if beat % 2 else other, "driver/test", keys, 1_000_000.0 + 5 * beat)
        assert db.content_stamp(mine) == key
    with db.transaction(other):  # another process's content change
        states.transition(other, req.run_id, "n001", states.FAILED, "test")
    assert db.content_stamp(mine) != key
    key = db.content_stamp(mine)
    with db.transaction(mine):  # the driver's own
        states.transition(mine, req.run_id, "n002", states.FAILED, "test")
    assert db.content_stamp(mine) != key
    mine.close()
    other.close()


@pytest.mark.unit
def test_the_apis_cached_answers_stay_warm_through_heartbeats(site: Site, tmp_path: Path
                                                              ) -> None:
    from pxe.api.common import JsonCache

    cfg = site.cfg
    add_nodes(cfg, [{"name": n, "mac": m} for n, m in MACS.items()])
    add_images(cfg, tmp_path, centos5={})
    conn = db.connect(cfg.database)
    req = run.request(cfg, conn, list(MACS), "centos5")
    with db.transaction(conn):
        agent.adopt(conn, "n002", "agent-token", 1_000_000.0)
    cache = JsonCache(max_age=3600.0)
    builds: list[int] = []

    def build() -> dict[str, int]:
        builds.append(len(builds))
        return {"build": len(builds)}

    assert cache.get(cfg, "nodes:*", build) == b'{"build":1}'
    for beat in range(6):  # heartbeats, leases and agent polls: no answer shows them
        _bookkeeping(conn, "driver/test", [(req.run_id, "n001")], 1_000_000.0 + 5 * beat)
        assert agent.poll(conn, "n002", "agent-token", beat + 1) == "ok"
        assert cache.get(cfg, "nodes:*", build) == b'{"build":1}'
    assert len(builds) == 1
    run.set_mode(conn, "perjob")  # a content change: the next answer is built anew
    assert cache.get(cfg, "nodes:*", build) == b'{"build":2}'
    assert cache.get(cfg, "nodes:*", build) == b'{"build":2}'
    conn.close()
