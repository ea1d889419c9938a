"""Run drivers on several servers share the nodes through database claims (pxe/claims.py), never
a file lock: two real drivers (`python -m pxe.run drive`, each with its own lock) race over the
same requested nodes behind virtual IPMI BMCs on 127.0.0.1, and no node is driven twice."""

from __future__ import annotations

import subprocess
import sys
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
