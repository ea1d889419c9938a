"""e2e: a school network. The campus DHCP server (an ISC dhcpd the test starts, addresses only)
keeps handing out every address; dynprov runs in proxyDHCP mode and answers only the PXE part, and
only for MACs in its inventory. The workstations have no BMC: Wake-on-LAN wakes them when off, and
a running one is rebooted by its image's agent, or refused at once when it has none.

One lab, few boots (CI time: 2 cores, TCG): a BIOS and a UEFI workstation are re-imaged through
proxyDHCP while a machine that is not in the inventory wakes on the same wire (campus address, no
boot offer from us); then the running UEFI one (its image runs no agent) is refused within the
3-second return, and the running BIOS one is switched to the exam image by its agent.
"""

from __future__ import annotations

import hashlib
import re
import time

import pytest
from test_e2e_stack import lab_up
from test_e2e_support import build_test_image, need_root_tools

from lab import cluster
from lab.campus import Campus
from pxe import db
from pxe.power import reboot

pytestmark = pytest.mark.e2e

SCHOOL = """  {name = "ws1", mac = "52:54:00:5c:01:01", ip = "198.18.0.11", power = "wol"},
  {name = "ws2", mac = "52:54:00:5c:01:02", ip = "198.18.0.12", power = "wol", firmware = "uefi"},
  {name = "guest", mac = "52:54:00:5c:01:09", ip = "198.18.0.19", power = "wol", registered = false},"""
CAMPUS_POOL = re.compile(r"198\.18\.0\.1[5-9][0-9]")
NO_WAY = "running, no way to reboot it (Wake-on-LAN only wakes a machine that is off)"


@pytest.fixture(scope="session")
def school_images(tmp_path_factory):
    need_root_tools()
    cache = tmp_path_factory.mktemp("school-images")
    return {label: build_test_image(cache, label) for label in ("centos5", "quiet", "exam")}


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


def test_school_proxy_dhcp_wol_agent_reimage(site, school_images, tmp_path):
    need_root_tools()
    proxy_mode(site)
    with lab_up(site, SCHOOL) as lab:
        campus = Campus(lab.name, work=tmp_path / "campus")
        campus.start()
        try:
            conf_sha = _sha(campus.conf)
            # Generous provisioning times: other QEMU boots on this 2-core machine slow TCG a lot.
            lab.add_image("centos5", school_images["centos5"], prov_seconds=300)
            lab.add_image("exam", school_images["exam"], prov_seconds=300)
            lab.add_image("quiet", school_images["quiet"], prov_seconds=300,  # runs no agent
                          cmdline="console=ttyS0,115200 dynprov.agent=off")
            t0 = time.monotonic()
            for node, label in (("ws1", "centos5"), ("ws2", "quiet")):
                sw = lab.os_switch(node, label)
                assert sw.returncode == 0, sw.stderr
            # The stranger powers up on the same wire (its magic packet, sent inside the lab).
            wake = lab.exec("python3", "-c", "from pxe.power.wol import send_magic; "
                            "send_magic(['52:54:00:5c:01:09'], '198.18.0.255', 9)")
            assert wake.returncode == 0, wake.stderr
            states = lab.wait_final(["ws1", "ws2"], timeout=360)
            print(f"proxyDHCP + WoL: BIOS + UEFI os-switch -> ready: {time.monotonic() - t0:.1f} s")
            assert states == {"ws1": "ready", "ws2": "ready"}, states
            q = lab.query()
            assert (q["ws1"]["OS"], q["ws2"]["OS"]) == ("centos5", "quiet"), q
            serial = cluster.lab_dir(site.cfg) / "serial"

            def leases() -> str:
                return campus.leases.read_text()

            # Every address came from the campus server, none from us.
            for mac in ("52:54:00:5c:01:01", "52:54:00:5c:01:02"):
                assert f"hardware ethernet {mac}" in leases(), leases()
            for n in ("ws1", "ws2"):
                assert CAMPUS_POOL.search((serial / f"{n}.log").read_text(errors="replace"))
            # The stranger: a campus address, no boot offer, no boot file fetched from us.
            _wait_for(lambda: "hardware ethernet 52:54:00:5c:01:09" in leases(), 120,
                      "the stranger's campus lease")
            guest = _wait_for(lambda: re.search(r"Nothing to boot|No bootable device",
                                                (serial / "guest.log").read_text(errors="replace"))
                              and (serial / "guest.log").read_text(errors="replace"), 120,
                              "the stranger giving up on the network boot")
            assert "PXELINUX" not in guest and "dynprov" not in guest, guest[-2000:]
            dhcp_log = (cluster.lab_dir(site.cfg) / "dhcp.log").read_text(errors="replace")
            for mac in ("52:54:00:5c:01:01", "52:54:00:5c:01:02"):
                assert re.search(rf"PXE\(br0\) {mac} proxy$", dhcp_log, re.M), dhcp_log[-3000:]
            assert not re.search(r"PXE\(br0\) 52:54:00:5c:01:09 proxy$", dhcp_log, re.M)
            assert re.search(r"PXE\(br0\) 52:54:00:5c:01:09 proxy-ignored", dhcp_log)

            # ws2 runs an image without an agent and the site has no soft reboot command (and its
            # ready report is older than the grace for an agent's first poll).
            conn = db.connect(site.cfg.database)
            _wait_for(lambda: time.time() - conn.execute(
                "SELECT adopted FROM agents WHERE node = 'ws2'").fetchone()[0]
                > reboot.FIRST_POLL_GRACE, 30, "ws2's first-poll grace to pass")
            t0 = time.monotonic()
            refused = lab.os_switch("ws2", "exam")
            took = time.monotonic() - t0
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert f"ws2: {NO_WAY}" in refused.stderr
            assert took < 3.0, f"refusal took {took:.1f} s"
            print(f"running WoL node without agent or soft path refused in {took:.2f} s")
            assert tuple(conn.execute("SELECT state, current_os FROM nodes WHERE name = 'ws2'"
                                      ).fetchone()) == ("ready", "quiet")

            # ws1 is running centos5 and its agent polls: switched to the exam image by it.
            _wait_for(lambda: conn.execute("SELECT seq FROM agents WHERE node = 'ws1' AND seq > 0"
                                           ).fetchone(), 60, "ws1's agent heartbeat")
            t0 = time.monotonic()
            sw = lab.os_switch("ws1", "exam")
            assert sw.returncode == 0, sw.stderr
            assert lab.wait_final(["ws1"], timeout=360) == {"ws1": "ready"}
            print(f"running WoL node re-imaged by its agent: {time.monotonic() - t0:.1f} s")
            assert lab.query()["ws1"]["OS"] == "exam"
            log1 = (serial / "ws1.log").read_text(errors="replace")
            assert "the server asks for a reboot into the network" in log1
            assert conn.execute("SELECT 1 FROM events WHERE node = 'ws1' AND "
                                "kind = 'agent-reboot-taken'").fetchone()
            # The campus server's config untouched by us.
            assert _sha(campus.conf) == conf_sha
        finally:
            campus.stop()
