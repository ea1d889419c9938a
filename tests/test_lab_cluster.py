"""`dynprov-lab`: spec checks (unit), and up/status/console/down with real namespaces.

The boots themselves are in test_e2e_*.py; here VMs are powered on only to prove the BMC/WoL
wiring and the clean-up, and killed at once.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from test_e2e_support import lab_config, need_root_tools

from lab import cluster, netns
from pxe.errors import InputError


def lab_site(site, nodes: str) -> str:
    name = f"dpt-{uuid.uuid4().hex[:8]}"
    with open(site.config_path, "a") as fh:
        fh.write(lab_config(nodes, name))
    return name


TWO = """  {name = "n1", mac = "52:54:00:d7:09:01", ip = "198.18.0.11", power = "ipmi"},
  {name = "n2", mac = "52:54:00:d7:09:02", ip = "198.18.0.12", power = "wol"},"""


@pytest.mark.unit
def test_default_spec_is_the_demo_trio():
    spec = cluster.parse_spec({})
    assert [(n.name, n.firmware, n.power) for n in spec.nodes] == [
        ("node1", "bios", "ipmi"), ("node2", "uefi", "redfish"), ("node3", "bios", "wol")]


@pytest.mark.unit
@pytest.mark.parametrize("data, complaint", [
    ({"nodes": [{"name": "a", "mac": "zz", "ip": "198.18.0.11"}]}, "MAC"),
    ({"nodes": [{"name": "a", "mac": "52:54:00:00:00:01", "ip": "198.18.0.11",
                 "power": "smoke"}]}, "power"),
    ({"nodes": [{"name": "a", "mac": "52:54:00:00:00:01", "ip": "198.18.0.11", "colour": 1}]},
     "colour"),
    ({"nodes": [{"name": "a", "mac": "52:54:00:00:00:01", "ip": "198.18.0.11"},
                {"name": "a", "mac": "52:54:00:00:00:02", "ip": "198.18.0.12"}]}, "duplicate"),
    ({"netns": "Bad Name"}, "namespace"),
    ({"frobnicate": 1}, "unknown"),
])
def test_bad_spec_is_refused(data, complaint):
    with pytest.raises(InputError, match=complaint):
        cluster.parse_spec(data)


@pytest.mark.integration
def test_up_status_second_up_console_down(site):
    need_root_tools()
    name = lab_site(site, TWO)
    try:
        up = site.lab("up")
        assert up.returncode == 0, up.stderr
        assert netns.exists(name)
        # Registered like an admin would: BMC details in the inventory, password only in the
        # secrets file (0600), never in the inventory.
        nodes = json.loads(site.run("nodes", "list", "--json", check=True).stdout)
        n1 = next(n for n in nodes if n["name"] == "n1")
        assert (n1["bmc_type"], n1["bmc_address"], n1["bmc_port"]) == ("ipmi", "127.0.0.1", 6230)
        assert "lab-password" not in json.dumps(nodes)
        assert os.stat(site.cfg.paths.secrets_file).st_mode & 0o077 == 0

        again = site.lab("up")
        assert again.returncode == 1
        assert "already up" in again.stderr
        assert len([n for n in os.listdir("/run/netns") if n == name]) == 1

        st = json.loads(site.lab("status", "--json", check=True).stdout)
        assert st["ready"] and st["supervisor_alive"]
        assert {n["name"]: n["power"] for n in st["nodes"]} == {"n1": "off", "n2": "off"}
        assert all(s["alive"] for s in st["services"].values())

        # Power on through the real BMC (ipmitool inside the namespace) and through WoL.
        pw = site.root / "pw"
        pw.write_text("lab-password\n")
        on = site.lab("exec", "--", "ipmitool", "-I", "lanplus", "-H", "127.0.0.1",
                      "-p", "6230", "-U", "admin", "-f", str(pw), "chassis", "power", "on")
        assert on.returncode == 0, on.stderr
        wake = site.lab("exec", "--", "wakeonlan", "-i", "198.18.0.255",
                        "52:54:00:d7:09:02")
        assert wake.returncode == 0, wake.stderr
        deadline = time.monotonic() + 15
        powered: dict[str, str] = {}
        while time.monotonic() < deadline:
            st = json.loads(site.lab("status", "--json", check=True).stdout)
            powered = {n["name"]: n["power"] for n in st["nodes"]}
            if powered == {"n1": "on", "n2": "on"}:
                break
            time.sleep(0.3)
        assert powered == {"n1": "on", "n2": "on"}
        # SeaBIOS prints within a second or two; the console shows the serial log.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            con = site.lab("console", "n1")
            if con.stdout.strip():
                break
            time.sleep(0.5)
        assert con.returncode == 0 and con.stdout.strip()
        assert site.lab("console", "nope").returncode == 1
    finally:
        down = site.lab("down")
    assert down.returncode == 0, down.stderr
    assert "removed namespace" in down.stdout
    assert not netns.exists(name)
    assert not cluster.state_path(site.cfg).exists()
    assert site.lab("down").returncode == 1  # nothing left to take down


@pytest.mark.integration
def test_down_after_the_supervisor_crashed(site):
    need_root_tools()
    name = lab_site(site, TWO)
    try:
        site.lab("up", check=True)
        state = json.loads(cluster.state_path(site.cfg).read_text())
        pw = site.root / "pw"
        pw.write_text("lab-password\n")
        site.lab("exec", "--", "ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p",
                 "6230", "-U", "admin", "-f", str(pw), "chassis", "power", "on", check=True)
        os.kill(state["supervisor"], signal.SIGKILL)
        time.sleep(0.3)
        st = json.loads(site.lab("status", "--json", check=True).stdout)
        assert not st["supervisor_alive"]
        again = site.lab("up")
        assert again.returncode == 1 and "lab down" in again.stderr
        vm_pid = int(Path(state["nodes"][0]["pid_file"]).read_text())
        assert netns.pid_alive(vm_pid)  # the VM outlived its supervisor
    finally:
        down = site.lab("down")
    assert down.returncode == 0, down.stderr
    assert "stopped VM n1" in down.stdout
    assert not netns.pid_alive(vm_pid)
    assert not netns.exists(name)
    # and the site can have a lab again
    try:
        site.lab("up", check=True)
    finally:
        site.lab("down", check=True)
    assert not netns.exists(name)


@pytest.mark.integration
def test_dhcp_follows_the_rendered_config_and_exec_needs_a_lab(site):
    """dnsmasq does not re-read its config on SIGHUP: the lab restarts it when `pxe-stage render`
    installs a new one, so a node added later gets its lease."""
    need_root_tools()
    assert site.lab("exec", "--", "true").returncode == 1  # no lab yet
    lab_site(site, TWO)
    try:
        site.lab("up", check=True)
        before = json.loads(site.lab("status", "--json", check=True).stdout)
        pid = before["services"]["dhcp"]["pid"]
        site.run("nodes", "add", "n9", "--mac", "52:54:00:d7:09:09", "--ip", "198.18.0.19",
                 check=True)
        site.run("render", check=True)
        deadline = time.monotonic() + 10
        after = before
        while time.monotonic() < deadline:
            after = json.loads(site.lab("status", "--json", check=True).stdout)
            if after["services"]["dhcp"]["pid"] != pid and after["services"]["dhcp"]["alive"]:
                break
            time.sleep(0.3)
        assert after["services"]["dhcp"]["pid"] != pid and after["services"]["dhcp"]["alive"]
        assert not netns.pid_alive(pid)
        ok = site.lab("exec", "--", "ip", "-br", "addr", "show", "br0")
        assert ok.returncode == 0 and "198.18.0.1/24" in ok.stdout
    finally:
        site.lab("down", check=True)


@pytest.mark.integration
def test_a_lab_that_cannot_start_leaves_nothing_behind(site):
    """`pxe-stage serve` refuses its config: up fails with the reason, and the namespace, the
    supervisor and the state are gone (the lab is always removed)."""
    need_root_tools()
    name = lab_site(site, TWO)
    with open(site.config_path, "a") as fh:
        fh.write("\n[serve]\nhttp_workers = 0\n")
    up = site.lab("up")
    assert up.returncode == 1
    assert "serve" in up.stderr
    assert not netns.exists(name)
    assert not cluster.state_path(site.cfg).exists()
    assert site.lab("status").returncode == 1
