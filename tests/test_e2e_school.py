"""e2e: a school network. The campus DHCP server (an ISC dhcpd the test starts, addresses only)
keeps handing out every address; dynprov runs in proxyDHCP mode and answers only the PXE part, and
only for MACs in its inventory.

One lab, one round of boots (CI time: 2 cores, TCG): a BIOS node and a UEFI node are re-imaged
through proxyDHCP and reach ready, while a machine that is not in the inventory wakes on the same
wire, gets its address from the campus server and no boot offer from us.
"""

from __future__ import annotations

import hashlib
import re
import time

import pytest
from test_e2e_stack import images, lab_up  # noqa: F401 - images is a fixture
from test_e2e_support import need_root_tools

from pxe.lab import cluster
from pxe.lab.campus import Campus

pytestmark = pytest.mark.e2e

SCHOOL = """  {name = "ws1", mac = "52:54:00:5c:01:01", ip = "198.18.0.11", power = "ipmi"},
  {name = "ws2", mac = "52:54:00:5c:01:02", ip = "198.18.0.12", power = "ipmi", firmware = "uefi"},
  {name = "guest", mac = "52:54:00:5c:01:09", ip = "198.18.0.19", power = "wol", registered = false},"""
CAMPUS_POOL = re.compile(r"198\.18\.0\.1[5-9][0-9]")


def proxy_mode(site) -> None:
    site.config_path.write_text(site.config_path.read_text().replace(
        "[dhcp]\n", '[dhcp]\nmode = "proxy"\n'))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"{what} not seen within {timeout:.0f} s")


def test_proxy_dhcp_beside_the_campus_server(site, images, tmp_path):  # noqa: F811
    need_root_tools()
    proxy_mode(site)
    with lab_up(site, SCHOOL) as lab:
        campus = Campus(lab.name, work=tmp_path / "campus")
        campus.start()
        try:
            conf_sha = _sha(campus.conf)
            lab.add_image("centos5", images["centos5"])
            sw = lab.os_switch("ws1,ws2", "centos5")
            assert sw.returncode == 0, sw.stderr
            # The stranger powers up on the same wire (its magic packet, sent inside the lab).
            wake = lab.exec("python3", "-c", "from pxe.power.wol import send_magic; "
                            "send_magic(['52:54:00:5c:01:09'], '198.18.0.255', 9)")
            assert wake.returncode == 0, wake.stderr
            t0 = time.monotonic()
            states = lab.wait_final(["ws1", "ws2"])
            print(f"proxyDHCP: BIOS + UEFI os-switch -> ready: {time.monotonic() - t0:.1f} s")
            assert states == {"ws1": "ready", "ws2": "ready"}, states
            q = lab.query()
            assert (q["ws1"]["OS"], q["ws2"]["OS"]) == ("centos5", "centos5"), q
            serial = cluster.lab_dir(site.cfg) / "serial"
            leases = lambda: campus.leases.read_text()  # noqa: E731
            # Every address came from the campus server, none from us.
            for mac in ("52:54:00:5c:01:01", "52:54:00:5c:01:02"):
                assert f"hardware ethernet {mac}" in leases(), leases()
            for n in ("ws1", "ws2"):
                assert CAMPUS_POOL.search((serial / f"{n}.log").read_text(errors="replace"))
            # The stranger: a campus address, no boot offer, no boot file fetched from us.
            _wait_for(lambda: "hardware ethernet 52:54:00:5c:01:09" in leases(), 120,
                      "the stranger's campus lease")
            guest = _wait_for(lambda: re.search(r"Nothing to boot|No bootable device|"
                                                r"No configuration methods",
                                                (serial / "guest.log").read_text(errors="replace"))
                              and (serial / "guest.log").read_text(errors="replace"), 120,
                              "the stranger giving up on the network boot")
            assert "PXELINUX" not in guest and "dynprov" not in guest, guest[-2000:]
            dhcp_log = (cluster.lab_dir(site.cfg) / "dhcp.log").read_text(errors="replace")
            for mac in ("52:54:00:5c:01:01", "52:54:00:5c:01:02"):
                assert re.search(rf"PXE\(br0\) {mac} proxy$", dhcp_log, re.M), dhcp_log[-3000:]
            assert not re.search(r"PXE\(br0\) 52:54:00:5c:01:09 proxy$", dhcp_log, re.M)
            assert re.search(r"PXE\(br0\) 52:54:00:5c:01:09 proxy-ignored", dhcp_log)
            # The campus server's config untouched by us.
            assert _sha(campus.conf) == conf_sha
        finally:
            campus.stop()
