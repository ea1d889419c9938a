"""The IPMI power path against virtual BMCs that misbehave on purpose (real UDP on 127.0.0.1):
a login crossed by a resent request, a chassis control whose answer is lost, a call that gives
up on a node while its thread is still running. The BMC side counts what really happened."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_power_support import add_nodes, ipmi_rows, power_config, vbmc, write_secret_file

from lab.vbmc import Faults
from pxe import power

pytestmark = pytest.mark.integration


def events(bmc, name: str) -> list[dict]:
    return [e for e in bmc.events() if e["event"] == name]


def test_login_crossed_by_a_resent_request_is_retried_with_a_fresh_session(site, tmp_path: Path):
    # The BMC answers the first login late, then gives every copy of the Open Session Request
    # its own session id (pyghmi's server did): RAKP2 comes signed for another session id.
    cfg = power_config(site, timeout=2.0, retries=0)
    with vbmc(tmp_path, "c[1-2]", 2, faults=Faults(cross_logins=1)) as bmc:
        rows = ipmi_rows("c", [bmc.base_port, bmc.base_port + 1])
        rows[1]["bmc_secret"] = f"file:{write_secret_file(site.root / 'bad-pw', 'nope-pw')}"
        add_nodes(cfg, rows)
        res = power.run(cfg, "c[001-002]", "status")
        crossed = {e["bmc"] for e in events(bmc, "login-crossed")}
    assert crossed == {"c1", "c2"}
    assert (res["c001"].ok, res["c001"].value) == (True, "off"), res["c001"]
    # A wrong password stays a wrong password: one fresh session, then final.
    assert (res["c002"].ok, res["c002"].kind) == (False, "auth")
    assert "wrong password" in (res["c002"].error or "") and "2 attempts" in res["c002"].error


@pytest.mark.parametrize("action,start_on,event,value", [
    ("cycle", True, "power-cycle", "cycled (its answer was lost; not sent twice)"),
    ("on", False, "power-on", "on"),
    ("off", True, "power-off", "off"),
    ("cycle", False, "power-on", "on (was off)"),
])
def test_lost_chassis_control_answer_acts_once(site, tmp_path: Path, action, start_on, event,
                                               value):
    cfg = power_config(site, timeout=1.0, retries=2)
    with vbmc(tmp_path, "q1", 1, power_on=start_on,
              faults=Faults(lose_control_answers=1)) as bmc:
        add_nodes(cfg, ipmi_rows("q", [bmc.base_port]))
        res = power.run(cfg, "q001", action)["q001"]
        lost = events(bmc, "answer-lost")
        acted = events(bmc, event)
    assert len(lost) == 1
    assert len(acted) == 1, acted  # the BMC did it once, although its answer never came
    assert (res.ok, res.value) == (True, value), res


def test_netboot_with_a_lost_cycle_answer_sets_boot_and_cycles_once(site, tmp_path: Path):
    cfg = power_config(site, timeout=1.0, retries=2)
    with vbmc(tmp_path, "b1", 1, power_on=True, faults=Faults(lose_control_answers=1)) as bmc:
        add_nodes(cfg, ipmi_rows("b", [bmc.base_port], firmware="uefi"))
        res = power.run(cfg, "b001", "netboot")["b001"]
        cycles, sets = events(bmc, "power-cycle"), events(bmc, "set-boot")
    assert res.ok and res.value.startswith("next boot network; cycled"), res
    assert len(cycles) == 1 and len(sets) == 1 and sets[0]["efi"] is True


def test_thread_left_behind_at_the_time_limit_does_not_act(site, tmp_path: Path):
    # The BMC ignores its first datagrams, so the login is still being retried when the call
    # gives up after 0.5 s; the IPMI thread keeps running in this process and must not then
    # power the node on behind the caller's back.
    cfg = power_config(site, timeout=1.0, retries=5)
    with vbmc(tmp_path, "g1", 1, drop_first=10) as bmc:
        add_nodes(cfg, ipmi_rows("g", [bmc.base_port]))
        started = time.monotonic()
        res = power.run(cfg, "g001", "on", time_limit=0.5)["g001"]
        answered = time.monotonic() - started
        time.sleep(6.0)  # long enough for the drops to end and a login to succeed
        dropped, powered = events(bmc, "dropped"), events(bmc, "power-on")
    assert (res.ok, res.kind) == (False, "timeout") and answered < 5.0
    assert powered == []
    assert len(dropped) < 10  # the engine stopped sending: the BMC never used up its drops


def test_worker_thread_left_behind_at_the_time_limit_does_not_act(site):
    # Redfish goes through the worker pool: the emulator answers its GETs slowly, so the worker
    # is still reading the system when the call gives up; it must not then power the node on.
    from test_power_support import USER, redfish

    from lab.machine import SimulatedMachine
    from lab.redfish_emulator import _Handler

    class SlowReads(_Handler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            time.sleep(1.0)
            super().do_GET()

    cfg = power_config(site, timeout=5.0, retries=0, redfish_scheme="http")
    machine = SimulatedMachine("w001")
    with redfish({"w001": machine}) as server:
        server.RequestHandlerClass = SlowReads
        add_nodes(cfg, [{"name": "w001", "mac": "52:54:00:30:00:01", "bmc_type": "redfish",
                         "bmc_address": "127.0.0.1", "bmc_port": server.server_address[1],
                         "bmc_user": USER}])
        res = power.run(cfg, "w001", "on", time_limit=0.5)["w001"]
        time.sleep(6.0)  # the worker's GETs end meanwhile
        resets = [e for e in server.events if e["event"] == "reset"]
    assert (res.ok, res.kind) == (False, "timeout")
    assert machine.power_state() == "off" and resets == [], resets
