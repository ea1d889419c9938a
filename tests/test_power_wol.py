"""Wake-on-LAN: the magic packet checked byte for byte on a UDP listener on 127.0.0.1."""

from __future__ import annotations

import json
import sys

import pytest
from test_power_support import UdpListener, add_nodes, power_config

from pxe import power
from pxe.inventory import Node
from pxe.power.wol import magic_packet

pytestmark = pytest.mark.integration
MAC1, MAC2 = "52:54:00:ab:cd:01", "52:54:00:ab:cd:02"


@pytest.fixture
def listener():
    lst = UdpListener()
    yield lst
    lst.close()


@pytest.mark.unit
def test_magic_packet_layout():
    pkt = magic_packet("52-54-00-AB-CD-01")
    assert len(pkt) == 102
    assert pkt == b"\xff" * 6 + bytes.fromhex("525400abcd01") * 16


def test_on_and_netboot_send_the_magic_packet_to_every_mac(site, listener):
    cfg = power_config(site, wol_broadcast="127.0.0.1", wol_port=listener.port)
    add_nodes(cfg, [{"name": "w001", "macs": [MAC1, MAC2], "bmc_type": "wol"}])
    res = power.run(cfg, "w001", "on")["w001"]
    assert res.ok and "magic packet sent to 2 MACs" in (res.value or "")
    got = listener.receive(2)
    assert got == [b"\xff" * 6 + bytes.fromhex("525400abcd01") * 16,
                   b"\xff" * 6 + bytes.fromhex("525400abcd02") * 16]
    res = power.run(cfg, "w001", "netboot")["w001"]
    assert res.ok
    assert listener.receive(2)[0] == magic_packet(MAC1)


def test_what_wol_cannot_do_is_said_plainly(site, listener):
    cfg = power_config(site, wol_broadcast="127.0.0.1", wol_port=listener.port)
    add_nodes(cfg, [{"name": "w002", "mac": MAC1, "bmc_type": "wol"}])
    for action, words in [("status", "cannot read the power state"),
                          ("off", "soft_off_command"), ("soft-off", "soft_off_command"),
                          ("cycle", "cannot cycle"), ("reset", "cannot reset"),
                          ("boot-network", "cannot choose the boot device")]:
        res = power.run(cfg, "w002", action)["w002"]
        assert (res.ok, res.kind) == (False, "unsupported"), action
        assert words in (res.error or ""), (action, res.error)
    assert listener.pending() == 0  # nothing was sent for any of them


def test_soft_off_command_gets_node_and_ip_as_single_argv_items(site, tmp_path):
    out = tmp_path / "argv.json"
    script = tmp_path / "fake-ssh"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"json.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n")
    script.chmod(0o755)
    cfg = power_config(site, soft_off_command=[str(script), "root@{ip}", "poweroff; echo {node}"])
    add_nodes(cfg, [{"name": "w003", "mac": MAC1, "ip": "198.18.0.23", "bmc_type": "wol"},
                    {"name": "w004", "mac": MAC2, "bmc_type": "wol"}])
    res = power.run(cfg, "w[003-004]", "off")
    assert (res["w003"].ok, res["w003"].value) == (True, "soft-off command ran")
    assert json.loads(out.read_text()) == ["root@198.18.0.23", "poweroff; echo w003"]
    assert (res["w004"].ok, res["w004"].kind) == (False, "error")
    assert "no IP" in (res["w004"].error or "")


def test_malformed_mac_is_refused_and_nothing_sent(site, listener):
    cfg = power_config(site, wol_broadcast="127.0.0.1", wol_port=listener.port)
    good = add_nodes(cfg, [{"name": "w005", "mac": MAC1, "bmc_type": "wol"}])[0]
    bad = Node(name="w006", macs=("52:54:00:zz:00:01",), bmc_type="wol")  # bypasses inventory
    multicast = Node(name="w007", macs=("01:00:5e:00:00:01",), bmc_type="wol")
    res = power.run(cfg, [good, bad, multicast], "on")
    assert res["w005"].ok
    for name in ("w006", "w007"):
        assert (res[name].ok, res[name].kind) == (False, "error")
        assert "invalid MAC" in (res[name].error or "")
    assert listener.receive(1) == [magic_packet(MAC1)]
    assert listener.pending() == 0


def test_wol_status_comes_from_the_agent_heartbeat(site, listener):
    """No BMC: a WoL node is "on" while its image's agent polls (power.agent_stale), and the
    answer says why when nobody has heard from it - never a guess, and no packet sent."""
    import time

    from pxe import db

    cfg = power_config(site, wol_broadcast="127.0.0.1", wol_port=listener.port, agent_stale=30)
    add_nodes(cfg, [{"name": "w010", "mac": MAC1, "bmc_type": "wol"},
                    {"name": "w011", "mac": MAC2, "bmc_type": "wol"}])
    conn = db.connect(cfg.database)
    with db.transaction(conn):
        conn.execute("INSERT INTO agents (node, token_sha, seq, adopted, last_seen) VALUES "
                     "('w010', 'x', 3, ?, ?), ('w011', 'y', 2, ?, ?)",
                     (time.time() - 100, time.time() - 2, time.time() - 500, time.time() - 400))
    conn.close()
    res = power.run(cfg, "w[010-011]", "status")
    assert (res["w010"].ok, res["w010"].value) == (True, "on")
    assert (res["w011"].ok, res["w011"].kind) == (False, "unsupported")
    assert "last heard 400 s ago" in (res["w011"].error or "")
    assert listener.pending() == 0
