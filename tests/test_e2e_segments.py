"""e2e: two segments, each with its own boot server, on one PostgreSQL state database.

Two labs (lab/: a network namespace each, with its own dnsmasq, `pxe-stage serve` and virtual
BMC) share one throw-away PostgreSQL cluster; lab B's site is the service node of segment east
(`[segment] name = "east"`). One QEMU node in each segment is switched to another OS at the same
time (one os-switch); B's serve is killed (SIGKILL) as the run starts: the primary's serve
shows e1 Down with the reason within [segment] stale_seconds, a1 (the other segment) comes up
regardless; B's serve started again resumes its segment's run and e1 comes up too.

The two labs share the TFTP/HTTP roots (the namespaces cannot reach each other, so the blob
cache's fetch from the primary is proven on loopback in tests/test_blobcache.py). Two TCG VMs
at once on 2 cores: about a minute per boot.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pg_support
import pytest
from test_e2e_support import build_test_image, lab_config, need_root_tools, serial_logs_on_failure

from lab import cluster, netns
from pxe import config, db
from tests.conftest import ROOT, Site

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 300  # two TCG VMs at once on 2 cores
BEAT = 'heartbeat_seconds = 0.5\nstale_seconds = 3\n'
A_NODES = '  {name = "a1", mac = "52:54:00:e5:01:01", ip = "198.18.0.11", power = "ipmi"},'
E_NODES = '  {name = "e1", mac = "52:54:00:e5:02:01", ip = "198.18.0.21", power = "ipmi"},'


def _site(root: Path, url: str, lab: str, *, roots_of: Path | None = None,
          segment: str = "") -> Site:
    root.mkdir(parents=True)
    text = config.example(root)
    if roots_of is not None:  # the service node serves the same files (see the docstring)
        for key in ("tftp", "http"):
            text = text.replace(f'{key}_root = "{root / key}"', f'{key}_root = "{roots_of / key}"')
    text += '\n[hooks]\nsubscribers = ["msm_plugin.wiki:on_event"]\n'
    text += f'\n[state]\nurl = "{url}"\n'
    text += "\n[segment]\n" + (f'name = "{segment}"\n' if segment else "") + BEAT
    text += lab
    path = root / "dynprov.toml"
    path.write_text(text)
    return Site(root=root, config_path=path)


def _shown(conn, node: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    row = conn.execute("SELECT state, state_reason FROM nodes WHERE name = ?", (node,)).fetchone()
    return row[0], row[1]


def _step(conn, node: str) -> str:  # type: ignore[no-untyped-def]
    row = conn.execute("SELECT state FROM run_nodes WHERE node = ? ORDER BY run_id DESC LIMIT 1",
                       (node,)).fetchone()
    return row[0] if row else ""


def _until(check, what: str, timeout: float, every: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


@contextlib.contextmanager
def _lab(site: Site):  # type: ignore[no-untyped-def]
    up = site.lab("up")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield
    finally:
        down = site.lab("down")
        assert down.returncode == 0, down.stdout + down.stderr


def test_two_segments_one_service_node_dies_and_resumes(tmp_path: Path) -> None:
    need_root_tools()
    images = build_test_image(tmp_path / "images", "centos5")
    pg = pg_support.shared()
    url = pg.url(pg.create_database())
    tag = uuid.uuid4().hex[:6]
    a = _site(tmp_path / "a", url, lab_config(A_NODES, f"dsa-{tag}"))
    b = _site(tmp_path / "b", url, lab_config(E_NODES, f"dsb-{tag}"), roots_of=tmp_path / "a",
              segment="east")
    logs = [cluster.lab_dir(s.cfg) / "serial" for s in (a, b)] + \
        [cluster.lab_dir(s.cfg) for s in (a, b)] + [s.cfg.paths.state_dir for s in (a, b)]
    restarted: subprocess.Popen | None = None
    conn = db.connect(url)
    with serial_logs_on_failure(logs), _lab(a), _lab(b):
        try:
            a.run("nodes", "set", "e1", "--segment", "east", check=True)
            a.run("render", check=True)   # the primary's DHCP: a1 only
            b.run("render", check=True)   # east's: e1 (the lab restarts its dnsmasq)
            a.run("images", "add", "centos5", "--kernel", str(images["kernel"]), "--initrd",
                  str(images["initrd"]), "--rootfs", str(images["rootfs"]), "--cmdline",
                  "console=ttyS0,115200", "--prov-seconds", "600", check=True)
            _until(lambda: {"", "east"} <= {r[0] for r in conn.execute(
                "SELECT segment FROM servers WHERE role = 'serve' AND stopped IS NULL")},
                "both servers' heartbeats", 30)
            time.sleep(2)  # both dnsmasqs re-read their rendered configs

            t0 = time.monotonic()
            sw = a.lab("exec", "--", "os-switch", "a1,e1", "--set", "OS=centos5")
            assert sw.returncode == 0, sw.stdout + sw.stderr
            serve_b = cluster.read_state(b.cfg)["services"]["serve"]["pid"]
            os.kill(serve_b, signal.SIGKILL)  # east's boot server dies as the run starts
            killed = time.monotonic()
            _until(lambda: _shown(conn, "e1")[0] == "failed", "e1 shown Down", 60)
            noticed = time.monotonic() - killed
            assert "boot server of segment east silent since" in _shown(conn, "e1")[1]
            assert noticed < 600, noticed  # well within the run's timeout
            print(f"e1 shown Down {noticed:.1f} s after its boot server died")

            # the other segment is unaffected
            assert _until(lambda: _step(conn, "a1") in ("ready", "failed", "timed out")
                          and _step(conn, "a1"), "a1 final", BOOT_TIMEOUT) == "ready"
            print(f"a1 ready {time.monotonic() - t0:.1f} s after os-switch")
            assert _step(conn, "e1") in ("requested", "power-cycled")

            # east's boot server comes back: e1's run resumes and finishes
            log = open(b.cfg.paths.state_dir / "serve-restarted.log", "ab")  # noqa: SIM115
            with log:
                restarted = subprocess.Popen(
                    ["ip", "netns", "exec", f"dsb-{tag}", sys.executable, "-m", "pxe.cli.main",
                     "--config", str(b.config_path), "serve"], stdout=log, stderr=log,
                    cwd=ROOT, start_new_session=True)
            t1 = time.monotonic()
            # Read once: the resumed run moves on at once (east netboots e1 again), so a second
            # read may already show the next step (power-cycled).
            state, reason = _until(lambda: _shown(conn, "e1")[0] != "failed" and _shown(conn, "e1"),
                                   "e1 shown in its step again", 60)
            assert "segment east back" in reason or \
                state in ("power-cycled", "booting", "ready"), (state, reason)
            assert _until(lambda: _step(conn, "e1") in ("ready", "failed", "timed out")
                          and _step(conn, "e1"), "e1 final", BOOT_TIMEOUT) == "ready"
            print(f"e1 ready {time.monotonic() - t1:.1f} s after its boot server came back")
            drivers = {r[0] for r in conn.execute(
                "SELECT segment FROM servers WHERE role = 'driver'")}
            assert drivers == {"", "east"}
            events = [r[0] for r in conn.execute(
                "SELECT kind FROM events WHERE node = 'a1' ORDER BY id")]
            assert "segment-down" not in events
        finally:
            if restarted is not None and restarted.poll() is None:
                restarted.send_signal(signal.SIGTERM)
                try:
                    restarted.wait(30)
                except subprocess.TimeoutExpired:
                    restarted.kill()
                    restarted.wait(10)
            with contextlib.suppress(Exception):
                a.run("run", "cancel", "a1,e1")
    conn.close()
    assert not netns.exists(f"dsa-{tag}") and not netns.exists(f"dsb-{tag}")
