"""The provisioning run (pxe/run.py) and the Moab face's WIKI report (msm_plugin/wiki.py).

Unit tests drive request/cancel/expire and the report builder in-process; integration tests run
the real driver against virtual IPMI BMCs on 127.0.0.1, with nodes that call home (or not).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from moab_standin import parse_wiki
from test_power_support import add_nodes
from test_run_support import (
    add_images,
    cluster,
    configure,
    driver_held,
    node_row,
    run_nodes,
    stop_runs,
    wait_for,
)

from msm_plugin import wiki
from pxe import db, run
from pxe.config import Config
from pxe.errors import InputError, NotFound
from pxe.reports import record_report
from tests.conftest import Site


def _site(site: Site, tmp_path: Path, count: int = 4, **images: dict) -> Config:
    cfg = configure(site)
    add_images(cfg, tmp_path, **(images or {"centos5": {}, "sles11": {},
                                             "armos": {"arch": "aarch64"}}))
    add_nodes(cfg, [{"name": f"n{i:03d}", "mac": f"52:54:00:20:00:{i:02x}"}
                    for i in range(1, count + 1)])
    return cfg


def _report(cfg: Config, **kw) -> dict[str, dict[str, str]]:
    conn = db.connect(cfg.database)
    try:
        return parse_wiki(wiki.build(conn, cfg.groups.scheduler_pool, **kw).text)
    finally:
        conn.close()


# -- wiki -------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("raw, expected", [
    ("centos5", "centos5"),
    ("a;b#c:d", "a\\;b\\#c\\:d"),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", "back\\\\slash"),
    ("two\nlines\ttab", '"two lines tab"'),
])
def test_wiki_escape(raw: str, expected: str) -> None:
    assert wiki.escape(raw) == expected


@pytest.mark.unit
def test_wiki_line_round_trips_through_the_strict_parser() -> None:
    text = wiki.line("n001", {wiki.STATE: "Down", wiki.OS: "x", wiki.MESSAGE: 'a;b: c#d "e" \\',
                              wiki.POWER: None}) + "\n"
    assert parse_wiki(text) == {"n001": {"STATE": "Down", "OS": "x",
                                         "MESSAGE": 'a;b: c#d "e" \\'}}


@pytest.mark.unit
@pytest.mark.parametrize("bad", [
    "n001 STATE=Idle;FOO=1",                 # unknown attribute
    "n001 STATE=Idle;MESSAGE=a:b",           # unescaped ':'
    'n001 STATE=Idle;MESSAGE="open',         # unbalanced quotes
    "n001 STATE=Idle;MESSAGE=a\\b",          # stray backslash
    "n001 STATE=Idle;;OS=x",                 # empty item
    "n001 STATE=Idle OS=x extra",            # whitespace read as ';' -> not ATTR=VALUE
    "n001",                                  # no attributes
    "n001 STATE=Sleeping",                   # unknown state
])
def test_strict_parser_rejects(bad: str) -> None:
    from moab_standin import WikiError

    with pytest.raises(WikiError):
        parse_wiki(bad + "\n")


@pytest.mark.unit
def test_report_states(site: Site, tmp_path: Path) -> None:
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    conn.execute("INSERT INTO pools(name, created) VALUES ('cloud', 0)")
    conn.execute("UPDATE nodes SET pool = 'cloud' WHERE name = 'n004'")
    conn.execute("UPDATE nodes SET state = 'ready', current_os = 'centos5', used = 1 "
                 "WHERE name = 'n001'")
    conn.execute("UPDATE nodes SET state = 'failed', state_reason = 'disk: I/O error; bad' "
                 "WHERE name = 'n002'")
    conn.execute("UPDATE nodes SET state = 'off', current_os = 'sles11' WHERE name = 'n003'")
    view = _report(cfg)
    assert view["n001"]["STATE"] == "Idle" and view["n001"]["OS"] == "centos5"
    assert view["n001"]["OSLIST"] == "centos5,sles11" and view["n001"]["ARCH"] == "x86_64"
    assert view["n002"] == {**view["n002"], "STATE": "Down", "MESSAGE": "disk: I/O error; bad"}
    assert view["n003"]["POWER"] == "Off" and view["n003"]["OS"] == "_none"  # stateless: gone while off
    assert view["n004"]["STATE"] == "Drained" and "cloud" in view["n004"]["MESSAGE"]
    # per-job mode: a node that ran a job reports an OS that matches no OSLIST entry
    run.set_mode(conn, "perjob")
    view = _report(cfg)
    assert view["n001"]["OS"] == "_used-centos5"
    assert view["n001"]["OS"] not in view["n001"]["OSLIST"].split(",")


# -- request: the checks Moab's blocking call relies on --------------------------------------------
@pytest.mark.unit
def test_request_refusals_and_idempotence(site: Site, tmp_path: Path) -> None:
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    with driver_held(cfg):
        req = run.request(cfg, conn, ["n001", "n002", "n099"], "centos5", pool="hpc")
        assert req.started == ["n001", "n002"] and req.run_id
        assert [(r.node, r.reason) for r in req.refused] == [("n099", "unknown node")]
        # the same request again: accepted, no second run
        again = run.request(cfg, conn, ["n001"], "centos5")
        assert again.joined == {"n001": req.run_id} and again.run_id is None
        # another OS for a node in a run: refused, clearly
        other = run.request(cfg, conn, ["n001", "n003"], "sles11")
        assert other.started == ["n003"]
        assert other.refused[0].node == "n001"
        assert f"run {req.run_id} for centos5" in other.refused[0].reason
        # an OS not in the node's OSLIST (another architecture), an unknown label
        arm = run.request(cfg, conn, ["n004"], "armos")
        assert "not in this node's OSLIST (centos5,sles11)" in arm.refused[0].reason
        unknown = run.request(cfg, conn, ["n004"], "nosuch")
        assert "unknown OS label" in unknown.refused[0].reason
        with pytest.raises(InputError):
            run.request(cfg, conn, [], "centos5")
        rows = run_nodes(cfg)
        assert sorted((r["node"], r["label"]) for r in rows) == [
            ("n001", "centos5"), ("n002", "centos5"), ("n003", "sles11")]
        assert all(r["state"] == "requested" for r in rows)
        assert node_row(cfg, "n001")["state"] == "requested"
        run.cancel(cfg, conn, ["n001", "n002", "n003"])


@pytest.mark.unit
def test_plan_ondemand_vs_perjob(site: Site, tmp_path: Path) -> None:
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    conn.execute("UPDATE nodes SET state = 'ready', current_os = 'centos5' "
                 "WHERE name IN ('n001', 'n002')")
    conn.execute("UPDATE nodes SET state = 'failed', current_os = 'centos5' WHERE name = 'n003'")
    with driver_held(cfg):
        req = run.request(cfg, conn, ["n001", "n002", "n003", "n004"], "centos5")
        assert req.current == ["n001", "n002"]  # running it and healthy: nothing to do
        assert req.started == ["n003", "n004"]  # unhealthy, or another OS
        run.cancel(cfg, conn, req.started)
        run.set_mode(conn, "perjob")
        req = run.request(cfg, conn, ["n001", "n002"], "centos5")
        assert req.started == ["n001", "n002"]  # per-job: everyone is re-imaged
        run.cancel(cfg, conn, req.started)


@pytest.mark.unit
def test_pool_outside_scheduler_refused(site: Site, tmp_path: Path) -> None:
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    conn.execute("INSERT INTO pools(name, created) VALUES ('cloud', 0)")
    conn.execute("UPDATE nodes SET pool = 'cloud' WHERE name = 'n002'")
    with driver_held(cfg):
        req = run.request(cfg, conn, ["n001", "n002"], "centos5", pool=cfg.groups.scheduler_pool)
        assert req.started == ["n001"]
        assert "pool cloud" in req.refused[0].reason
        run.cancel(cfg, conn, req.started)


@pytest.mark.unit
def test_timeout_found_by_whoever_looks_next(site: Site, tmp_path: Path) -> None:
    """No driver: the deadline passes; the report shows it at once, the next writer records it."""
    cfg = _site(site, tmp_path, centos5={"prov_seconds": 1})
    conn = db.connect(cfg.database)
    with driver_held(cfg):
        req = run.request(cfg, conn, ["n001"], "centos5")
        deadline = run_nodes(cfg)[0]["deadline"]
        view = _report(cfg, now=deadline - 0.5)
        assert view["n001"]["STATE"] == "Down" and view["n001"]["OS"] == "_none"
        assert "requested" in view["n001"]["MESSAGE"]
        view = _report(cfg, now=deadline + 0.1)  # a reader: derived, nothing written
        assert "timed out" in view["n001"]["MESSAGE"]
        assert run_nodes(cfg)[0]["state"] == "requested"
        assert run.expire(cfg, conn, now=deadline + 0.1) == ["n001"]
        row = run_nodes(cfg)[0]
        assert row["state"] == "timed out" and "no report within" in row["reason"]
        assert node_row(cfg, "n001")["state"] == "timed out"
        assert conn.execute("SELECT state FROM runs WHERE id = ?",
                            (req.run_id,)).fetchone()[0] == "failed"
        # and the node can be requested again
        assert run.request(cfg, conn, ["n001"], "centos5").started == ["n001"]
        run.cancel(cfg, conn, ["n001"])


@pytest.mark.unit
def test_max_seconds_caps_the_deadline(site: Site, tmp_path: Path) -> None:
    cfg = _site(site, tmp_path, centos5={"prov_seconds": 3600})
    conn = db.connect(cfg.database)
    with driver_held(cfg):
        before = time.time()
        run.request(cfg, conn, ["n001"], "centos5", max_seconds=540)
        assert run_nodes(cfg)[0]["deadline"] <= time.time() + 540
        assert run_nodes(cfg)[0]["deadline"] >= before + 539
        run.cancel(cfg, conn, ["n001"])


@pytest.mark.unit
def test_mark_used_and_ready_clears_it(site: Site, tmp_path: Path) -> None:
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    run.mark_used(conn, ["n001"], "42.server")
    assert node_row(cfg, "n001")["used"] == 1
    with pytest.raises(NotFound):
        run.mark_used(conn, ["n404"])
    with driver_held(cfg):
        run.request(cfg, conn, ["n001"], "centos5")
        from pxe.setboot import set_boot

        token = set_boot(cfg, ["n001"], "centos5")[0].boot_token
        record_report(conn, "n001", token, "ready")
        assert node_row(cfg, "n001")["boot_target"] == "os"  # recorded only; nobody acted yet
        assert run.follow_ups(cfg, conn) == ["n001"]  # the driver's step
        assert run.follow_ups(cfg, conn) == []
    row = node_row(cfg, "n001")
    assert row["used"] == 0 and row["current_os"] == "centos5" and row["state"] == "ready"
    assert row["boot_target"] == "local"  # the safe default again
    assert run_nodes(cfg)[0]["state"] == "ready"
    assert conn.execute("SELECT state FROM runs").fetchone()[0] == "done"


@pytest.mark.unit
def test_mode_setting(site: Site, tmp_path: Path) -> None:
    cfg = _site(site, tmp_path)
    conn = db.connect(cfg.database)
    assert run.get_mode(conn) == "ondemand"
    run.set_mode(conn, "perjob")
    assert run.get_mode(conn) == "perjob"
    with pytest.raises(InputError):
        run.set_mode(conn, "sometimes")


# -- the driver against virtual BMCs ----------------------------------------------------------------
@pytest.mark.integration
def test_run_to_ready_and_back_to_safe_default(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 3) as c:
        conn = db.connect(c.cfg.database)
        req = run.request(c.cfg, conn, c.names, "centos5")
        assert run.spawn_driver(c.cfg) is not None
        rows = run.wait(c.cfg, conn, c.names)
        assert {r["state"] for r in rows.values()} == {"ready"}
        kinds = [e["kind"] for e in run.history(conn, req.run_id) if e["node"] == "n001"]
        # every step is in the history; a simulated node may call home before the BMC's
        # answer is recorded, so only the reports' order is fixed
        assert kinds[0] == "run-requested" and sorted(kinds[1:]) == \
            ["report-booting", "report-ready", "run-power-cycled"]
        assert kinds.index("report-booting") < kinds.index("report-ready")
        for name in c.names:
            assert c.node(name).boots == ["image:centos5"]
            row = node_row(c.cfg, name)
            assert (row["state"], row["current_os"], row["boot_target"]) == \
                ("ready", "centos5", "local")
            assert "LOCALBOOT" in c.sim.boot_file(c.node(name))
        assert conn.execute("SELECT state FROM runs WHERE id = ?",
                            (req.run_id,)).fetchone()[0] == "done"
        # the driver's last report is the final one (file:// readers see every node ready)
        wait_for(lambda: not run.driver_running(c.cfg))
        view = parse_wiki((c.cfg.paths.state_dir / wiki.REPORT_NAME).read_text())
        assert all((view[n]["STATE"], view[n]["OS"]) == ("Idle", "centos5") for n in c.names)


@pytest.mark.integration
def test_bmc_failing_mid_run_others_proceed(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 3, dead=["n002"]) as c:
        conn = db.connect(c.cfg.database)
        run.request(c.cfg, conn, c.names, "centos5")
        run.spawn_driver(c.cfg)
        rows = run.wait(c.cfg, conn, c.names)
        assert rows["n001"]["state"] == rows["n003"]["state"] == "ready"
        assert rows["n002"]["state"] == "failed"
        assert "power netboot failed" in rows["n002"]["reason"]
        view = _report(c.cfg)
        assert view["n002"]["STATE"] == "Down" and "power netboot" in view["n002"]["MESSAGE"]
        assert node_row(c.cfg, "n002")["boot_target"] == "local"  # no install left armed


@pytest.mark.integration
def test_node_reports_failure_with_its_reason(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 2, behaviours={"n002": "fail:no disk found"}) as c:
        conn = db.connect(c.cfg.database)
        run.request(c.cfg, conn, c.names, "centos5")
        run.spawn_driver(c.cfg)
        rows = run.wait(c.cfg, conn, c.names)
        assert rows["n001"]["state"] == "ready"
        assert (rows["n002"]["state"], rows["n002"]["reason"]) == ("failed", "no disk found")
        view = _report(c.cfg)
        assert view["n002"]["STATE"] == "Down" and view["n002"]["MESSAGE"] == "no disk found"


@pytest.mark.integration
def test_node_never_calls_home_times_out(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 2, behaviours={"n002": "silent"},
                 images={"centos5": {"prov_seconds": 3}}) as c:
        conn = db.connect(c.cfg.database)
        run.request(c.cfg, conn, c.names, "centos5")
        run.spawn_driver(c.cfg)
        # the driver records the timeout by itself (nobody else looks here)
        wait_for(lambda: all(r["state"] in run.FINAL
                             for r in run.latest(conn, c.names).values()))
        rows = run.latest(conn, c.names)
        assert rows["n001"]["state"] == "ready"
        assert rows["n002"]["state"] == "timed out"
        assert "no report within" in rows["n002"]["reason"]
        assert c.node("n002").boots == ["image:centos5"]
        view = _report(c.cfg)
        assert view["n002"]["STATE"] == "Down" and "timed out" in view["n002"]["MESSAGE"]
        assert node_row(c.cfg, "n002")["boot_target"] == "local"


@pytest.mark.integration
def test_stateful_installed_then_disk(site: Site, tmp_path: Path) -> None:
    with cluster(site, tmp_path, 1, behaviours={"n001": "stateful"},
                 images={"rhel": {"mode": "stateful"}}) as c:
        conn = db.connect(c.cfg.database)
        run.request(c.cfg, conn, ["n001"], "rhel")
        run.spawn_driver(c.cfg)
        assert run.wait(c.cfg, conn, ["n001"])["n001"]["state"] == "ready"
        kinds = [e["kind"] for e in run.history(conn, 1)]
        assert kinds.index("report-installed") < kinds.index("report-ready")
        # "installed" sent the next boot to the disk, through the boot files and the BMC
        events = [e for e in (c.journal.read_text().splitlines()) if '"set-boot"' in e]
        assert any('"device": "disk"' in e for e in events)
        row = node_row(c.cfg, "n001")
        assert (row["current_os"], row["boot_target"]) == ("rhel", "local")


@pytest.mark.integration
def test_driver_death_leaves_no_stale_lock(site: Site, tmp_path: Path) -> None:
    """A request whose driver never ran is picked up by the driver the next request starts."""
    with cluster(site, tmp_path, 2) as c:
        conn = db.connect(c.cfg.database)
        with driver_held(c.cfg):  # as if a driver held the lock, then died (lock released)
            run.request(c.cfg, conn, ["n001"], "centos5")
        assert not run.driver_running(c.cfg)
        req = run.request(c.cfg, conn, ["n001", "n002"], "centos5")
        assert req.joined and req.started == ["n002"]
        assert run.spawn_driver(c.cfg) is not None
        rows = run.wait(c.cfg, conn, c.names)
        assert {r["state"] for r in rows.values()} == {"ready"}
        stop_runs(c.cfg)
