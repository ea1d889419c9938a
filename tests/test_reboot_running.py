"""Re-imaging a machine that is on: the agent channel (POST /agent to a real `pxe-stage serve`),
the soft reboot command (bounded), and the refusal when a running Wake-on-LAN machine has neither.
The boots themselves are in test_e2e_school.py."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from test_serve_support import serve_process

from pxe import db
from pxe.inventory import Inventory
from pxe.power import agent, reboot
from pxe.power.settings import Settings
from tests.conftest import fake_bzimage, make_site

MSG = "running, no way to reboot it (Wake-on-LAN only wakes a machine that is off)"


def wol_site(tmp_path, power: str = ""):
    site = make_site(tmp_path / "site")
    with open(site.config_path, "a") as fh:
        fh.write(f'\n[power]\nwol_broadcast = "127.255.255.255"\ntimeout = 2\n{power}')
    kernel = fake_bzimage(site.root / "vmlinuz", os.urandom(500))
    site.run("images", "add", "img1", "--kernel", str(kernel), check=True)
    site.run("images", "add", "exam", "--kernel", str(kernel), check=True)
    for i, name in enumerate(("w1", "w2"), start=1):
        site.run("nodes", "add", name, "--mac", f"52:54:00:5c:03:0{i}", "--ip",
                 f"198.18.0.{10 + i}", "--bmc-type", "wol", check=True)
    return site


def boot_ready(site, name: str, label: str = "img1") -> str:
    """set-boot + the image's own ready report, as a booted node would send it."""
    from pxe.reports import record_report

    site.run("set-boot", name, "--os", label, check=True)
    token = Inventory(site.cfg).get(name).boot_token
    conn = db.connect(site.cfg.database)
    record_report(conn, name, token, "ready", label)
    conn.close()
    return token


def age_agent(site) -> None:
    """The ready report was a while ago: no agent first poll is due any more."""
    conn = db.connect(site.cfg.database)
    conn.execute("UPDATE agents SET adopted = adopted - 60")
    conn.close()


def form(**fields) -> dict:
    return {"content": "&".join(f"{k}={v}" for k, v in fields.items()),
            "headers": {"content-type": "application/x-www-form-urlencoded"}}


@pytest.mark.integration
def test_the_way_to_reboot_is_decided_from_agent_heartbeat_and_call_home(tmp_path):
    site = wol_site(tmp_path)
    conn = db.connect(site.cfg.database)
    row = lambda n: conn.execute("SELECT name, bmc_type, state, current_os FROM nodes "  # noqa: E731
                                 "WHERE name = ?", (n,)).fetchone()
    plain, soft = Settings(), Settings(soft_reboot_command=("true",))
    assert reboot.decide(conn, plain, row("w1")).kind == "wake"  # never booted: wake it
    token = boot_ready(site, "w1")
    assert reboot.decide(conn, plain, row("w1")).kind == "agent"  # first poll due
    conn.execute("UPDATE agents SET adopted = adopted - 60")
    assert reboot.decide(conn, plain, row("w1")) == reboot.Way("none", MSG)
    assert reboot.decide(conn, soft, row("w1")).kind == "soft"
    assert agent.poll(conn, "w1", token, 1) == "ok"
    assert reboot.decide(conn, plain, row("w1")).kind == "agent"
    conn.execute("UPDATE agents SET last_seen = last_seen - 120")
    assert reboot.decide(conn, plain, row("w1")).kind == "wake"  # the agent went silent: off


@pytest.mark.integration
def test_agent_polls_are_authenticated_and_take_a_reboot_once(tmp_path):
    site = wol_site(tmp_path)
    token = boot_ready(site, "w1")
    with serve_process(site) as srv:
        url = f"{srv.url}/agent"
        assert httpx.post(url, **form(node="w1", token=token, seq=5)).text == "ok"
        replay = httpx.post(url, **form(node="w1", token=token, seq=5))
        assert (replay.status_code, replay.text) == (403, "refused\n")
        assert httpx.post(url, **form(node="w1", token="forged", seq=6)).status_code == 403
        assert httpx.post(url, **form(node="w2", token=token, seq=7)).status_code == 403
        assert httpx.post(url, **form(node="nobody", token=token, seq=8)).status_code == 404
        assert httpx.post(url, **form(node="w1", token=token, seq="x")).status_code == 400
        conn = db.connect(site.cfg.database)
        agent.request_reboot(conn, ["w1"])
        assert httpx.post(url, **form(node="w1", token=token, seq=9)).text == "reboot"
        assert agent.wait_taken(conn, ["w1"], timeout=1) == {"w1"}
        assert httpx.post(url, **form(node="w1", token=token, seq=10)).text == "ok"
        refused = [r[0] for r in conn.execute(
            "SELECT detail FROM events WHERE kind = 'agent-refused' ORDER BY id")]
        assert refused[0].startswith("replayed or old sequence number 5")
        assert refused[1] == "wrong token"
        # nothing a refused poll sent was stored
        assert conn.execute("SELECT seq FROM agents WHERE node = 'w1'").fetchone()[0] == 10


@pytest.mark.integration
def test_running_wol_node_with_no_way_is_refused_at_once_and_nothing_recorded(tmp_path):
    site = wol_site(tmp_path)
    boot_ready(site, "w1")
    age_agent(site)
    before = site.snapshot()
    t0 = time.monotonic()
    sw = site.run("w1,w2", "--set", "OS=exam", cmd="os-switch")
    took = time.monotonic() - t0
    assert sw.returncode == 1
    assert f"w1: {MSG}" in sw.stderr.splitlines()
    assert "w2: provisioning exam" in sw.stdout  # an off machine is still woken
    conn = db.connect(site.cfg.database)
    assert [r[0] for r in conn.execute("SELECT node FROM run_nodes")] == ["w2"]
    assert conn.execute("SELECT state FROM nodes WHERE name = 'w1'").fetchone()[0] == "ready"
    from pxe import run

    run.cancel(site.cfg, conn, ["w2"])
    np = site.run("w1", "CYCLE", cmd="node-power")
    assert np.returncode == 1 and f"ERROR: w1: {MSG}" in np.stdout
    assert not conn.execute("SELECT 1 FROM events WHERE node = 'w1' AND kind IN "
                            "('run-power-cycled', 'power-cycle')").fetchone()
    print(f"os-switch refusal returned in {took:.2f} s")
    assert before  # the site existed


@pytest.mark.integration
def test_a_soft_reboot_command_that_hangs_is_killed_and_reported(tmp_path):
    site = wol_site(tmp_path, 'soft_reboot_command = ["sleep", "60"]\nsoft_reboot_timeout = 1\n')
    boot_ready(site, "w1")
    age_agent(site)
    t0 = time.monotonic()
    np = site.run("w1", "CYCLE", cmd="node-power")
    assert time.monotonic() - t0 < 30
    assert np.returncode == 1
    assert "ERROR: w1: soft reboot command sleep still running after 1 s: killed" in np.stdout
    ok = wol_site(tmp_path / "ok", 'soft_reboot_command = ["true", "{node}", "{ip}"]\n')
    boot_ready(ok, "w1")
    age_agent(ok)
    assert ok.run("w1", "CYCLE", cmd="node-power").returncode == 0


@pytest.mark.integration
def test_unknown_and_powered_off_stateless_nodes_report_consistently(tmp_path):
    """Documented in the admin guide: fresh import -> Idle, _none, no POWER (nobody knows);
    a stateless node powered off -> Idle, _none, POWER=Off (its OS lived in memory)."""
    from test_e2e_support import wiki_lines

    site = wol_site(tmp_path, 'soft_off_command = ["true", "{node}"]\n')
    boot_ready(site, "w1")
    q = wiki_lines(site.run(cmd="cluster-query", check=True).stdout)
    assert (q["w1"]["STATE"], q["w1"]["OS"], q["w1"]["POWER"]) == ("Idle", "img1", "On")
    assert (q["w2"]["STATE"], q["w2"]["OS"], "POWER" in q["w2"]) == ("Idle", "_none", False)
    assert site.run("w1", "OFF", cmd="node-power").returncode == 0
    q = wiki_lines(site.run(cmd="cluster-query", check=True).stdout)
    assert (q["w1"]["STATE"], q["w1"]["OS"], q["w1"]["POWER"]) == ("Idle", "_none", "Off")
