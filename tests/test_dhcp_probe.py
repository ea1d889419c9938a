"""`pxe-stage dhcp probe` against real servers in a lab namespace: proxy mode without the campus
server, and a campus server that answers boot options too, are each refused with one clear line."""

from __future__ import annotations

import os

import pytest
from test_e2e_support import need_root_tools
from test_lab_cluster import lab_site

from lab.campus import Campus
from pxe.dhcp.probe import discover_packet, parse_offer

ONE = '  {name = "p1", mac = "52:54:00:5c:02:01", ip = "198.18.0.11", power = "wol"},'


@pytest.mark.unit
def test_discover_is_a_pxe_client_and_an_offer_round_trips():
    pkt = bytearray(discover_packet("52:54:00:5c:02:01", 0x1234))
    assert b"PXEClient:Arch:00000" in pkt and pkt[10:12] == b"\x80\x00"
    # turn it into an offer of 198.18.0.150 carrying a boot file
    pkt[0] = 2
    pkt[16:20] = bytes([198, 18, 0, 150])
    pkt[108:119] = b"pxelinux.0\0"
    pkt[240:] = b"\x35\x01\x02\x36\x04\xc6\x12\x00\x02\xff"
    offer = parse_offer(bytes(pkt), 0x1234, "198.18.0.2")
    assert offer.server == "198.18.0.2" and offer.address == "198.18.0.150"
    assert offer.boot == ("file pxelinux.0",)
    assert parse_offer(bytes(pkt), 0x9999, "198.18.0.2") is None  # another client's


@pytest.mark.integration
def test_probe_needs_the_campus_server_and_refuses_two_boot_answers(site, tmp_path):
    need_root_tools()
    name = lab_site(site, ONE)
    site.config_path.write_text(site.config_path.read_text().replace(
        "[dhcp]\n", '[dhcp]\nmode = "proxy"\n'))
    try:
        assert site.lab("up").returncode == 0
        conf = site.cfg.dhcp.config_file.read_bytes()
        probe = ("python3", "-m", "pxe.cli.main", "dhcp", "probe", "--wait", "2")
        alone = site.lab("exec", "--", *probe)
        assert alone.returncode == 1, alone.stdout + alone.stderr
        assert "no DHCP server answered with an address on br0: proxy mode needs" in alone.stderr

        noisy = Campus(name, work=tmp_path / "noisy", boot_file="pxelinux.0")
        noisy.start()
        try:
            two = site.lab("exec", "--", *probe)
        finally:
            noisy.stop()
        assert two.returncode == 1, two.stdout + two.stderr
        assert "two DHCP servers answer boot options on br0: 198.18.0.2 (file pxelinux.0" \
            in two.stderr

        campus = Campus(name, work=tmp_path / "campus")
        campus.start()
        try:
            good = site.lab("exec", "--", *probe)
        finally:
            campus.stop()
        assert good.returncode == 0, good.stdout + good.stderr
        assert "198.18.0.2: address 198.18.0.15" in good.stdout
        assert site.cfg.dhcp.config_file.read_bytes() == conf  # a probe changes nothing
    finally:
        site.lab("down")


@pytest.mark.integration
def test_lab_school_profile_brings_the_campus_server_and_takes_it_down(site, tmp_path):
    import json

    from lab import netns

    need_root_tools()
    name = f"dpt-{os.urandom(4).hex()}"
    with open(site.config_path, "a") as fh:
        fh.write(f'\n[lab]\nnetns = "{name}"\n')
    refused = site.lab("up", "--profile", "school")
    assert refused.returncode == 2 and 'set [dhcp] mode = "proxy"' in refused.stderr
    assert not netns.exists(name)
    site.config_path.write_text(site.config_path.read_text().replace(
        "[dhcp]\n", '[dhcp]\nmode = "proxy"\n'))
    try:
        up = site.lab("up", "--profile", "school")
        assert up.returncode == 0, up.stderr
        st = json.loads(site.lab("status", "--json", check=True).stdout)
        assert [n["name"] for n in st["nodes"]] == ["ws1", "ws2", "ws3"]
        assert {n["bmc"].split()[0] for n in st["nodes"]} == {"wol"}
        assert st["services"]["campus-dhcpd"]["alive"]
        probe = site.lab("exec", "--", "python3", "-m", "pxe.cli.main", "dhcp", "probe",
                         "--wait", "2")
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert 'fits [dhcp] mode = "proxy"' in probe.stdout
    finally:
        down = site.lab("down")
    assert down.returncode == 0, down.stderr
    assert not netns.exists(name) and not netns.exists(f"{name}-c")
