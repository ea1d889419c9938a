"""Run drivers on several servers share the nodes through database claims (pxe/claims.py), never
a file lock: two real drivers (`python -m pxe.run drive`, each with its own lock) race over the
same requested nodes behind virtual IPMI BMCs on 127.0.0.1, and no node is driven twice."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_run_support import cluster, wait_for

from pxe import db, run
from tests.conftest import ROOT, Site


def _driver(cfg_path: Path, instance: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "pxe.run", "--config", str(cfg_path), "--instance", instance,
             "drive"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


@pytest.mark.integration
def test_two_drivers_racing_over_the_same_nodes_drive_each_node_once(site: Site,
                                                                     tmp_path: Path) -> None:
    count = 8
    with cluster(site, tmp_path, count) as c:
        conn = db.connect(c.cfg.database)
        with run._driver_lock(c.cfg) as mine:  # no request-started driver joins: exactly two race
            assert mine
            req = run.request(c.cfg, conn, c.names, "centos5")
            drivers = [_driver(site.config_path, name, tmp_path / f"driver-{name}.log")
                       for name in ("a", "b")]
            try:
                wait_for(lambda: all(r["state"] in run.FINAL
                                     for r in run.latest(conn, c.names).values()), limit=120)
                for proc in drivers:
                    proc.wait(60)
            finally:
                for proc in drivers:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
        rows = run.latest(conn, c.names)
        assert {r["state"] for r in rows.values()} == {"ready"}
        # each node was power-cycled by one driver, once, and booted once
        cycled = Counter(e["node"] for e in run.history(conn, req.run_id)
                         if e["kind"] == "run-power-cycled")
        assert cycled == {n: 1 for n in c.names}
        for name in c.names:
            assert c.node(name).boots == ["image:centos5"], name
        # both drivers took part in the race and said who they are; nothing is left claimed
        names = {r[0] for r in conn.execute("SELECT name FROM servers WHERE role = 'driver'")}
        assert len(names) == 2
        assert conn.execute("SELECT COUNT(*) FROM run_claims").fetchone()[0] == 0
        assert [p.returncode for p in drivers] == [0, 0]


@pytest.mark.integration
def test_a_node_power_cycled_during_its_segments_outage_is_netbooted_again(site: Site,
                                                                          tmp_path: Path) -> None:
    """Its PXE had no boot server to talk to: when the segment's serve is back (the watch's
    ``segment-up``), the driver holding it sends it to the network once more."""
    with cluster(site, tmp_path, 2, behaviours={"n001": "silent", "n002": "silent"}) as c:
        conn = db.connect(c.cfg.database)
        req = run.request(c.cfg, conn, c.names, "centos5")
        assert run.spawn_driver(c.cfg) is not None
        wait_for(lambda: {r["state"] for r in run.latest(conn, c.names).values()}
                 == {"power-cycled"})
        wait_for(lambda: len(c.node("n001").boots) == 1)
        with db.transaction(conn):  # what pxe.servers.watch records when the serve beats again
            db.log_event(conn, "segment-up", "n001", "test", req.run_id)
        wait_for(lambda: len(c.node("n001").boots) == 2)
        retried = [e for e in run.history(conn, req.run_id) if e["kind"] == "run-power-retried"]
        assert [e["node"] for e in retried] == ["n001"]
        assert "netboot again" in retried[0]["detail"]
        assert run.latest(conn, ["n001"])["n001"]["state"] == "power-cycled"  # same step
        # once only, and n002 (no outage seen) is left alone
        time.sleep(2 * run.POLL)
        assert len(c.node("n001").boots) == 2 and len(c.node("n002").boots) == 1
