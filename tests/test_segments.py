"""Segments and service nodes (pxe/segments.py, pxe/claims.py, pxe/servers.py): membership and
its commands, what a service node renders and answers, run-node claims, the watch over silent
boot servers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_power_support import add_nodes
from test_run_support import add_images

from pxe import claims, db, run, segments, servers, states
from pxe.config import Config
from pxe.errors import InputError
from pxe.serve import files
from pxe.serve.bootconfigs import BootConfigs
from tests.conftest import Site

MACS = {"n001": "52:54:00:31:00:01", "n002": "52:54:00:31:00:02", "n003": "52:54:00:31:00:03"}


def _nodes(site: Site) -> Config:
    cfg = site.cfg
    add_nodes(cfg, [{"name": n, "mac": m} for n, m in MACS.items()])
    return cfg


def _segment_of(cfg: Config) -> dict[str, str]:
    conn = db.connect(cfg.database)
    try:
        return segments.of_nodes(conn, MACS)
    finally:
        conn.close()


# -- membership and its commands ---------------------------------------------------------------
@pytest.mark.unit
def test_nodes_add_and_set_segment(site: Site) -> None:
    cfg = _nodes(site)
    site.run("nodes", "add", "n004", "--mac", "52:54:00:31:00:04", "--segment", "east",
             check=True)
    conn = db.connect(cfg.database)
    assert segments.of_nodes(conn, ["n004"]) == {"n004": "east"}
    out = site.run("nodes", "set", "n[001-002]", "--segment", "east", check=True)
    assert "2 node(s) now in segment east" in out.stdout
    assert _segment_of(cfg) == {"n001": "east", "n002": "east", "n003": ""}
    assert segments.members(conn, "east") == {"n001", "n002", "n004"}
    assert segments.members(conn, "") == {"n003"}
    site.run("nodes", "set", "n001", "--segment", "", check=True)  # back to the primary's
    assert _segment_of(cfg)["n001"] == ""
    shown = site.run("nodes", "show", "n002", "--json", check=True).stdout
    assert '"segment": "east"' in shown
    # an export carries the segment, so an import round trip keeps it
    exported = site.run("nodes", "export", check=True).stdout
    assert exported.splitlines()[0].endswith(",segment")
    assert any(line.startswith("n002,") and line.endswith(",east")
               for line in exported.splitlines())


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["-east", "a b", "../x", "e;st", "x" * 65, "a..b"])
def test_bad_segment_names_are_refused_and_nothing_changes(site: Site, bad: str) -> None:
    cfg = _nodes(site)
    before = site.snapshot()
    proc = site.run("nodes", "set", "n001", f"--segment={bad}")
    assert proc.returncode == 2 and "invalid segment" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = site.run("nodes", "add", "n009", "--mac", "52:54:00:31:00:09", f"--segment={bad}")
    assert proc.returncode == 2 and "invalid segment" in proc.stderr
    assert site.snapshot() == before
    assert _segment_of(cfg)["n001"] == ""


@pytest.mark.unit
def test_set_segment_of_an_unknown_node_changes_nothing(site: Site) -> None:
    cfg = _nodes(site)
    before = site.snapshot()
    proc = site.run("nodes", "set", "n[001-005]", "--segment", "east")
    assert proc.returncode == 1 and "unknown node" in proc.stderr
    assert site.snapshot() == before
    assert set(_segment_of(cfg).values()) == {""}


@pytest.mark.unit
def test_segment_settings_are_checked(site: Site) -> None:
    with open(site.config_path, "a") as fh:
        fh.write('\n[segment]\nname = "east"\nprimary_url = "http://127.0.0.1:8080/"\n')
    seg = segments.load(site.cfg)
    assert (seg.name, seg.primary_url) == ("east", "http://127.0.0.1:8080")
    assert segments.load(site.cfg, "west").name == "west"  # --segment wins
    for bad in ("ftp://h", "http://h/x", "http://u:p@h", "http://h?x=1", "http://"):
        with pytest.raises(InputError, match="primary_url"):
            segments.check_url(bad, "primary_url")
    with open(site.config_path, "a") as fh:
        fh.write("stale_seconds = 1\n")
    with pytest.raises(InputError, match="stale_seconds"):
        segments.load(site.cfg)
    proc = site.run("serve", "--segment", "no/pe", "--check")
    assert proc.returncode == 2 and "invalid segment" in proc.stderr


# -- what a service node renders and answers -------------------------------------------------------
@pytest.mark.unit
def test_render_segment_writes_only_that_segments_dhcp_entries(site: Site) -> None:
    cfg = _nodes(site)
    site.run("nodes", "set", "n[001-002]", "--segment", "east", check=True)
    site.run("render", "--segment", "east", "--no-reload", check=True)
    text = cfg.dhcp.config_file.read_text()
    assert MACS["n001"] in text and MACS["n002"] in text and MACS["n003"] not in text
    site.run("render", "--no-reload", check=True)  # the primary's own nodes
    text = cfg.dhcp.config_file.read_text()
    assert MACS["n003"] in text and MACS["n001"] not in text


@pytest.mark.unit
def test_a_service_node_answers_boot_configs_of_its_segment_only(site: Site, tmp_path: Path
                                                                 ) -> None:
    cfg = _nodes(site)
    add_images(cfg, tmp_path, centos5={})
    site.run("nodes", "set", "n001", "--segment", "east", check=True)
    site.run("set-boot", "n[001-003]", "--os", "centos5", check=True)
    east = BootConfigs(segments.pinned(cfg, "east"))
    primary = BootConfigs(cfg)
    name = "pxelinux.cfg/01-" + MACS["n001"].replace(":", "-")
    other = "pxelinux.cfg/01-" + MACS["n003"].replace(":", "-")
    assert b"blobs/" in east.lookup(name)
    with pytest.raises(files.Missing):
        east.lookup(other)
    with pytest.raises(files.Missing):
        primary.lookup(name)
    assert b"blobs/" in primary.lookup(other)


# -- claims ---------------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_claim_is_held_by_one_driver_until_its_lease_runs_out(site: Site, tmp_path: Path
                                                                ) -> None:
    cfg = _nodes(site)
    add_images(cfg, tmp_path, centos5={})
    conn = db.connect(cfg.database)
    req = run.request(cfg, conn, list(MACS), "centos5")
    keys = [(req.run_id, n) for n in MACS]
    now = 1000.0
    a, b = "driver/a", "driver/b"
    assert claims.claim(conn, a, keys[:2], 30, now) == set(keys[:2])
    assert claims.claim(conn, b, keys, 30, now + 1) == {keys[2]}  # only what nobody holds
    assert claims.claim(conn, a, keys, 30, now + 2) == set(keys[:2])  # renewing its own
    assert claims.holders(conn, keys, now + 3) == {keys[0]: a, keys[1]: a, keys[2]: b}
    # a's lease runs out (it died): b takes its nodes over
    assert claims.claim(conn, b, keys, 30, now + 40) == set(keys)
    # the run ends for one node: renew() drops that claim
    with db.transaction(conn):
        states.transition(conn, req.run_id, "n001", states.FAILED, "test")
    assert claims.renew(conn, b, 30, now + 41) == 2
    claims.release(conn, b)
    assert claims.holders(conn, keys, now + 41) == {}


# -- the watch over silent boot servers -------------------------------------------------------------
@pytest.mark.unit
def test_a_silent_segment_shows_its_run_nodes_down_and_back(site: Site, tmp_path: Path) -> None:
    cfg = _nodes(site)
    add_images(cfg, tmp_path, centos5={})
    site.run("nodes", "set", "n[001-002]", "--segment", "east", check=True)
    conn = db.connect(cfg.database)
    req = run.request(cfg, conn, list(MACS), "centos5")
    now = time.time()
    servers.beat(conn, "serve/east", servers.SERVE, "east", now - 100)
    servers.beat(conn, "serve/primary", servers.SERVE, "", now)
    down, back = servers.watch(conn, 30, now)
    assert sorted(down) == ["n001", "n002"] and back == []

    def shown(name: str) -> tuple[str, str]:
        row = conn.execute("SELECT state, state_reason FROM nodes WHERE name = ?",
                           (name,)).fetchone()
        return row[0], row[1]

    assert shown("n001")[0] == "failed"
    assert "boot server of segment east silent since" in shown("n001")[1]
    assert shown("n003") == ("requested", f"run {req.run_id}: centos5 requested")
    # the run itself goes on (the deadline still applies)
    assert {r["state"] for r in run._active_rows(conn)} == {"requested"}
    assert servers.watch(conn, 30, now) == ([], [])  # once
    servers.beat(conn, "serve/east2", servers.SERVE, "east", now + 1)  # restarted
    down, back = servers.watch(conn, 30, now + 1)
    assert down == [] and sorted(back) == ["n001", "n002"]
    assert shown("n001")[0] == "requested" and "segment east back" in shown("n001")[1]
    # a cleanly stopped serve counts as silent at once
    servers.stopped(conn, "serve/east2", now + 2)
    assert servers.silent_segments(conn, 30, now + 2) == {"east": now + 1}
    kinds = [r[0] for r in conn.execute("SELECT kind FROM events WHERE node = 'n001' ORDER BY id")]
    assert kinds.count("segment-down") == 1 and kinds.count("segment-up") == 1


@pytest.mark.unit
def test_segments_lists_nodes_and_the_servers_heartbeats(site: Site) -> None:
    cfg = _nodes(site)
    site.run("nodes", "set", "n[001-002]", "--segment", "east", check=True)
    conn = db.connect(cfg.database)
    now = time.time()
    servers.beat(conn, "serve/a", servers.SERVE, "", now)
    servers.beat(conn, "serve/b", servers.SERVE, "east", now - 100)  # silent
    servers.beat(conn, "serve/c", servers.SERVE, "west", now)
    servers.stopped(conn, "serve/c", now)
    out = site.run("segments", check=True).stdout.splitlines()
    assert out[0].split() == ["SEGMENT", "NODES", "SERVED", "BY", "SERVE", "LAST", "HEARD",
                              "DRIVERS"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert rows["(primary)"][1:4] == ["1", rows["(primary)"][2], "alive"]
    assert rows["east"][1:4] == ["2", "-", "silent"]
    assert rows["west"][1:4] == ["0", "-", "silent"]  # stopped: nobody serves it
    import json

    data = json.loads(site.run("segments", "--json", check=True).stdout)
    west = next(s for s in data if s["segment"] == "west")
    assert west["servers"][0]["status"] == "stopped"
