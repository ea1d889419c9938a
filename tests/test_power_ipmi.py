"""pxe.power.run over real IPMI (UDP on 127.0.0.1) against the virtual BMCs, faults included."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_power_support import add_nodes, dead_udp_ports, ipmi_rows, power_config, vbmc

from pxe import power
from pxe.errors import NotFound
from pxe.inventory import Inventory
from pxe.power.base import PowerResult

pytestmark = pytest.mark.integration


def test_status_on_netboot_with_uefi_flag_seen_by_the_bmc(site, tmp_path: Path):
    cfg = power_config(site, timeout=2.0, retries=1)
    with vbmc(tmp_path, "n[001-004]", 4) as bmc:
        base = bmc.base_port
        rows = ipmi_rows("n", [base, base + 1], firmware="uefi") + \
            ipmi_rows("n", [base + 2, base + 3], firmware="bios", start_mac=10)
        rows[2]["name"], rows[3]["name"] = "n003", "n004"
        nodes = add_nodes(cfg, rows)
        seen: list[PowerResult] = []
        lock = threading.Lock()

        def progress(r: PowerResult) -> None:
            with lock:
                seen.append(r)

        res = power.run(cfg, nodes, "status", progress=progress)
        assert {n: (r.ok, r.value) for n, r in res.items()} == {
            n.name: (True, "off") for n in nodes}
        assert sorted(r.node for r in seen) == [n.name for n in nodes]  # once per node

        res = power.run(cfg, "n[001-004]", "netboot")
        assert all(r.ok for r in res.values()), res
        assert all(r.value == "next boot network; on (was off)" for r in res.values())
        sets = {e["bmc"]: e for e in bmc.events() if e["event"] == "set-boot"}
        assert sets["n001"]["efi"] is True and sets["n002"]["efi"] is True
        assert sets["n003"]["efi"] is False and sets["n004"]["efi"] is False
        assert all(e["device"] == "network" and e["persistent"] is False and e["valid"]
                   for e in sets.values())
        # netboot's chassis control follows the flags at once: the BMC's 60 s expiry of the
        # flags is left alone (one round trip less a node, as ipmipower's count of a cycle).
        assert not [e for e in bmc.events() if e["event"] == "boot-param"]
        powered = [e["bmc"] for e in bmc.events() if e["event"] == "power-on"]
        assert sorted(powered) == ["n001", "n002", "n003", "n004"]

        # Now they are on: netboot cycles them; status says on.
        res = power.run(cfg, "n[001-002]", "netboot")
        assert [r.value for r in res.values()] == ["next boot network; cycled"] * 2
        res = power.run(cfg, "n[001-004]", "status")
        assert {r.value for r in res.values()} == {"on"}
        # The next-boot flag alone (no chassis control after it): the expiry is switched off
        # before the flags are set, so a power-on minutes later still boots the network.
        res = power.run(cfg, "n[003-004]", "boot-network")
        assert all(r.ok for r in res.values()), res
        params = [e for e in bmc.events() if e["event"] == "boot-param" and e["param"] == 3]
        assert sorted(e["bmc"] for e in params) == ["n003", "n004"]
        assert all(e["data"] == [8] for e in params)


def test_every_action(site, tmp_path: Path):
    cfg = power_config(site, timeout=2.0, retries=1)
    with vbmc(tmp_path, "a1", 1) as bmc:
        add_nodes(cfg, ipmi_rows("a", [bmc.base_port]))
        expect = [("on", "on"), ("status", "on"), ("reset", "reset"), ("cycle", "cycled"),
                  ("soft-off", "soft-off sent"), ("status", "off"), ("on", "on"),
                  ("off", "off"), ("cycle", "on (was off)"), ("off", "off"),
                  ("boot-disk", "disk, next boot only"),
                  ("boot-network-persistent", "network, persistent")]
        for action, value in expect:
            res = power.run(cfg, "a001", action)["a001"]
            assert (res.ok, res.value) == (True, value), (action, res)
        reset_off = power.run(cfg, "a001", "reset")["a001"]
        assert not reset_off.ok and reset_off.kind == "error" and "off" in (reset_off.error or "")
        events = [e["event"] for e in bmc.events()]
        for name in ("power-on", "reset", "power-cycle", "soft-off", "power-off"):
            assert name in events
        last = [e for e in bmc.events() if e["event"] == "set-boot"][-1]
        assert (last["device"], last["persistent"]) == ("network", True)


def test_wrong_password_unreachable_and_healthy_nodes_together(site, tmp_path: Path):
    cfg = power_config(site, timeout=1.0, retries=1)
    (site.root / "other-pw").write_text("not-the-password\n")
    (site.root / "other-pw").chmod(0o600)
    dead = dead_udp_ports(1)[0]
    with vbmc(tmp_path, "h[1-2]", 2) as bmc:
        base = bmc.base_port
        rows = ipmi_rows("h", [base, base + 1, dead])
        rows[1]["bmc_secret"] = f"file:{site.root / 'other-pw'}"
        add_nodes(cfg, rows)
        res = power.run(cfg, "h[001-003]", "on")
    assert res["h001"].ok and res["h001"].value == "on"
    assert (res["h002"].ok, res["h002"].kind) == (False, "auth")
    assert "wrong password" in (res["h002"].error or "")
    assert (res["h003"].ok, res["h003"].kind) == (False, "unreachable")
    assert str(dead) in (res["h003"].error or "")
    assert "not-the-password" not in repr(res) and "s3cret" not in repr(res)


def test_unknown_user_is_an_auth_failure(site, tmp_path: Path):
    cfg = power_config(site, timeout=1.0, retries=0)
    with vbmc(tmp_path, "u1", 1) as bmc:
        rows = ipmi_rows("u", [bmc.base_port])
        rows[0]["bmc_user"] = "mallory"
        add_nodes(cfg, rows)
        res = power.run(cfg, "u001", "status")["u001"]
    assert (res.ok, res.kind) == (False, "auth") and "user" in (res.error or "")


def test_bmc_that_drops_the_first_packets_answers_on_retry(site, tmp_path: Path):
    # An attempt sends its first packet about 4 times (retransmit = timeout / 8, doubling), so
    # 6 dropped datagrams outlast the first attempt; 11 attempts send at least 11 packets.
    cfg = power_config(site, timeout=0.4, retries=10)
    with vbmc(tmp_path, "d1", 1, drop_first=6) as bmc:
        add_nodes(cfg, ipmi_rows("d", [bmc.base_port]))
        res = power.run(cfg, "d001", "status")["d001"]
        dropped = [e for e in bmc.events() if e["event"] == "dropped"]
    assert (res.ok, res.value) == (True, "off"), res
    assert len(dropped) == 6


def test_silent_bmc_times_out_while_others_proceed(site, tmp_path: Path):
    cfg = power_config(site, timeout=0.5, retries=1)
    silent = __import__("socket").socket(2, 2)  # AF_INET, SOCK_DGRAM: bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        with vbmc(tmp_path, "s1", 1) as bmc:
            add_nodes(cfg, ipmi_rows("s", [bmc.base_port, silent.getsockname()[1]]))
            res = power.run(cfg, "s[001-002]", "status")
    finally:
        silent.close()
    assert res["s001"].ok
    assert (res["s002"].ok, res["s002"].kind) == (False, "timeout")
    assert "2 attempts" in (res["s002"].error or "")


def test_500_unreachable_bmcs_in_one_call(site):
    cfg = power_config(site, timeout=1.0, retries=1)
    ports = dead_udp_ports(500)
    nodes = add_nodes(cfg, ipmi_rows("x", ports))
    done: list[str] = []
    res = power.run(cfg, nodes, "status", progress=lambda r: done.append(r.node))
    assert len(res) == 500 and len(done) == 500
    assert {r.kind for r in res.values()} == {"unreachable"}
    assert all(not r.ok for r in res.values())


def test_unknown_node_in_the_set_acts_on_nothing(site, tmp_path: Path):
    cfg = power_config(site)
    with vbmc(tmp_path, "k1", 1) as bmc:
        add_nodes(cfg, ipmi_rows("k", [bmc.base_port]))
        with pytest.raises(NotFound, match="ghost"):
            power.run(cfg, "k001,ghost[1-2]", "on")
        assert bmc.events() == []  # nothing was sent to the known node either


def test_no_bmc_node_is_named_with_what_to_do(site, tmp_path: Path):
    cfg = power_config(site, timeout=1.0)
    with vbmc(tmp_path, "z1", 1) as bmc:
        add_nodes(cfg, ipmi_rows("z", [bmc.base_port]) +
                  [{"name": "manual1", "mac": "52:54:00:99:00:01"}])
        res = power.run(cfg, Inventory(cfg).select("z001,manual1"), "on")
    assert res["z001"].ok
    assert (res["manual1"].ok, res["manual1"].kind) == (False, "no-bmc")
    assert "power button" in (res["manual1"].error or "")


def test_cipher_suite_17(site, tmp_path: Path):
    cfg = power_config(site, timeout=1.0, retries=0, ipmi_cipher_suite=17)
    with vbmc(tmp_path, "e1", 1, cipher_suites=(3, 17)) as strong, \
            vbmc(tmp_path, "f1", 1) as sha1_only:
        add_nodes(cfg, ipmi_rows("e", [strong.base_port, sha1_only.base_port], firmware="uefi"))
        res = power.run(cfg, "e[001-002]", "netboot")
        sets = [e for e in strong.events() if e["event"] == "set-boot"]
    assert (res["e001"].ok, res["e001"].value) == (True, "next boot network; on (was off)")
    assert sets and sets[-1]["efi"] is True
    assert (res["e002"].ok, res["e002"].kind) == (False, "unsupported")
    assert "cipher suite 17" in (res["e002"].error or "") and "0x11" in (res["e002"].error or "")
