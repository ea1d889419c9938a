"""pxe.power.run over Redfish: sushy against the HTTP emulator (a real server on 127.0.0.1)."""

from __future__ import annotations

import pytest
from test_power_support import USER, add_nodes, power_config, redfish

from lab.machine import SimulatedMachine
from pxe import power

pytestmark = pytest.mark.integration


def _rows(port: int, names: list[str], firmware: str = "uefi") -> list[dict[str, object]]:
    return [{"name": n, "mac": f"52:54:00:20:00:{i + 1:02x}", "bmc_type": "redfish",
             "bmc_address": "127.0.0.1", "bmc_port": port, "bmc_user": USER,
             "firmware": firmware} for i, n in enumerate(names)]


def test_power_and_pxe_once_through_sushy(site):
    cfg = power_config(site, timeout=5.0, retries=1, redfish_scheme="http")
    machines = {"r001": SimulatedMachine("r001"), "r002": SimulatedMachine("r002")}
    with redfish(machines) as server:
        port = server.server_address[1]
        rows = _rows(port, ["r001"]) + _rows(port, ["r002"], firmware="bios")
        rows[1]["mac"] = "52:54:00:20:01:01"
        add_nodes(cfg, rows)
        res = power.run(cfg, "r[001-002]", "status")
        assert [r.value for r in res.values()] == ["off", "off"]

        res = power.run(cfg, "r[001-002]", "netboot")
        assert all(r.ok for r in res.values()), res
        assert res["r001"].value == "next boot network; on (was off)"
        # Both booted from the network once; the override is used up.
        for m in machines.values():
            assert [b.device for b in m.boots] == ["network"]
            assert m.boot_device() == ("disk", True)
        boots = {e["system"]: e for e in server.events if e["event"] == "boot"}
        assert (boots["r001"]["target"], boots["r001"]["enabled"]) == ("Pxe", "Once")
        assert boots["r001"]["mode"] == "UEFI"
        assert boots["r002"]["mode"] == "Legacy"  # a BIOS node's mode is left alone

        again = power.run(cfg, "r001", "netboot")["r001"]
        assert again.value == "next boot network; cycled"
        assert [b.device for b in machines["r001"].boots] == ["network", "network"]

        for action, value in [("off", "off"), ("status", "off"), ("on", "on"),
                              ("reset", "reset"), ("soft-off", "soft-off sent"),
                              ("boot-disk-persistent", "disk (UEFI), persistent")]:
            r = power.run(cfg, "r001", action)["r001"]
            assert (r.ok, r.value) == (True, value), (action, r)
        assert machines["r001"].boot_device() == ("disk", True)


def test_wrong_password_and_unreachable(site):
    cfg = power_config(site, timeout=2.0, retries=1, redfish_scheme="http")
    (site.root / "bad").write_text("nope\n")
    (site.root / "bad").chmod(0o600)
    import socket

    with socket.socket() as probe:  # a TCP port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    with redfish({"f001": SimulatedMachine("f001")}) as server:
        rows = _rows(server.server_address[1], ["f001"]) + _rows(dead, ["f002"])
        rows[1]["mac"] = "52:54:00:20:02:01"
        rows[0]["bmc_secret"] = f"file:{site.root / 'bad'}"
        add_nodes(cfg, rows)
        res = power.run(cfg, "f[001-002]", "on")
    assert (res["f001"].ok, res["f001"].kind) == (False, "auth")
    assert (res["f002"].ok, res["f002"].kind) == (False, "unreachable")
    assert "nope" not in repr(res)
