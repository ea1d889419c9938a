"""A service node that dies (pxe/servers.py, pxe/serve/heartbeat.py), with two real `pxe-stage
serve` processes on 127.0.0.1 sharing one state database: the primary and segment east's. Killed
mid-run, east's run nodes are shown Down with the reason by the primary's watch, the primary's
own nodes are untouched; restarted, east's serve shows them in their step again and starts a
driver of its segment, which resumes east's runs (and only those)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from test_power_support import add_nodes
from test_run_support import add_images
from test_segments_support import serve_again, service_site
from test_serve_support import wait_for

from pxe import db, run, servers
from tests.conftest import Site

BEAT = {"heartbeat_seconds": 0.2, "stale_seconds": 1.5}


def _shown(conn, name: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    row = conn.execute("SELECT state, state_reason FROM nodes WHERE name = ?", (name,)).fetchone()
    return row[0], row[1]


@pytest.mark.integration
def test_a_dead_service_node_is_reported_and_resumes_on_restart(site: Site, tmp_path: Path
                                                                ) -> None:
    with open(site.config_path, "a") as fh:
        fh.write("\n[segment]\n" + "".join(f"{k} = {v}\n" for k, v in BEAT.items()))
    cfg = site.cfg
    add_images(cfg, tmp_path, centos5={})
    add_nodes(cfg, [{"name": "e001", "mac": "52:54:00:32:00:01"},
                    {"name": "p001", "mac": "52:54:00:32:00:02"}])
    site.run("nodes", "set", "e001", "--segment", "east", check=True)
    conn = db.connect(cfg.database)
    req = run.request(cfg, conn, ["e001", "p001"], "centos5")
    # A driver elsewhere holds e001 for now (a live lease): nobody else may drive it.
    conn.execute("INSERT INTO run_claims VALUES (?, 'e001', 'driver/elsewhere', ?)",
                 (req.run_id, time.time() + 3600))
    east = service_site(site, tmp_path / "east", None, name="east", **BEAT)
    try:
        with serve_again(site) as primary:
            with serve_again(east) as service:
                wait_for(lambda: "east" in {r["segment"] for r in servers.listing(conn)},
                         "east's heartbeat")
                assert _shown(conn, "e001")[0] == "requested"
                service.proc.send_signal(signal.SIGKILL)  # the service node dies
                service.proc.wait(10)
                died = time.monotonic()
                wait_for(lambda: _shown(conn, "e001")[0] == "failed", "e001 shown down",
                         timeout=30)
                noticed = time.monotonic() - died
            state, reason = _shown(conn, "e001")
            assert "boot server of segment east silent since" in reason
            assert _shown(conn, "p001")[0] == "requested"  # the other segment: unaffected
            # the run goes on (its deadline still applies); Slurm/Moab heard of it (the hook)
            assert {r["node"]: r["state"] for r in run._active_rows(conn)} == \
                {"e001": "requested", "p001": "requested"}
            assert noticed < req_timeout(conn, req.run_id)
            # restarted: the step is shown again; once the lease is free east's driver resumes
            with serve_again(east) as service:
                wait_for(lambda: _shown(conn, "e001")[0] == "requested", "e001 back", timeout=30)
                assert "segment east back" in _shown(conn, "e001")[1]
                conn.execute("DELETE FROM run_claims")  # the driver elsewhere is gone
                wait_for(lambda: run.latest(conn, ["e001"])["e001"]["state"] in run.FINAL,
                         "east's driver acted", timeout=60)
                # e001 has no BMC: the driver of segment east tried to power it, and said so
                row = run.latest(conn, ["e001"])["e001"]
                assert row["state"] == "failed" and "power netboot" in row["reason"]
                drivers = [r for r in servers.listing(conn) if r["role"] == "driver"]
                assert {r["segment"] for r in drivers} == {"east"}
                # the primary's node was not driven by east's driver
                assert run.latest(conn, ["p001"])["p001"]["state"] == "requested"
                assert primary.proc.poll() is None
    finally:
        run.cancel(cfg, conn, ["e001", "p001"])
        wait_for(lambda: not run.driver_running(cfg, "east"), "east's driver exits")
        conn.close()


def req_timeout(conn, run_id: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds from the request to the run's deadline."""
    created = conn.execute("SELECT created FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    deadline = conn.execute("SELECT MIN(deadline) FROM run_nodes WHERE run_id = ?",
                            (run_id,)).fetchone()[0]
    return deadline - created
