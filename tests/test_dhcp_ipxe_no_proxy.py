"""Our DHCP answer tells iPXE that no ProxyDHCP server exists (encapsulated option 175.176,
"no-pxedhcp" = 1), so iPXE requests our first offer at once instead of re-sending DISCOVERs for
seconds while it waits for proxy offers (measured in the lab: 3.6-13.6 s of each boot, BIOS and
UEFI, before this). Real daemons (dnsmasq, ISC dhcpd) with the rendered config, in a namespace
of the test's own, over both boot paths ([boot] ipxe_http on and off). The e2e boots
(tests/test_e2e_pxe.py) do not count iPXE's DISCOVERs: under load it may miss our first offer
and send a second, as many as it sent before this change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lab import netns
from tests.conftest import make_site

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).parent / "dhcp_client_support.py"
MAC = "52:54:00:e2:af:01"
NO_PXEDHCP = "b00101"  # sub-option 176, length 1, value 1


def _daemon(backend: str, ns: netns.Netns, conf: Path, run_dir: Path) -> list[str]:
    if backend == "dnsmasq":
        return ns.argv(["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--port=0",
                        f"--dhcp-leasefile={run_dir / 'leases'}", "--pid-file=", "--user=root",
                        "--log-facility=-"])
    (run_dir / "leases").touch()
    return ns.argv(["dhcpd", "-f", "-4", "-cf", str(conf), "-lf", str(run_dir / "leases"),
                    "-pf", str(run_dir / "dhcpd.pid"), ns.bridge])


def _offer(client: str, kind: str) -> dict:
    out = subprocess.run(["ip", "netns", "exec", client, sys.executable, str(CLIENT),
                          netns.KEEPER[1], MAC, kind], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"no DHCPOFFER for a {kind} client: {out.stderr}"
    return json.loads(out.stdout)


def _boot_files(offer: dict) -> tuple[str, str]:
    """The BOOTP file field and option 67 (dnsmasq sends one, dhcpd the other)."""
    return offer["file"], bytes.fromhex(offer["options"].get("67", "")).decode().rstrip("\0")


@pytest.mark.parametrize("backend", ["dnsmasq", "isc"])
@pytest.mark.parametrize("ipxe_http", [True, False])
def test_ipxe_is_told_there_is_no_proxydhcp(tmp_path, backend, ipxe_http):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    daemon = "dnsmasq" if backend == "dnsmasq" else "dhcpd"
    if not shutil.which(daemon, path="/usr/sbin:/usr/bin:/sbin"):
        pytest.skip(f"{daemon} not installed (tools/install-deps)")
    site = make_site(tmp_path / "s", backend=backend)
    site.config_path.write_text(site.config_path.read_text()
                                + f"\n[boot]\nipxe_http = {'true' if ipxe_http else 'false'}\n")
    site.run("nodes", "add", "n1", "--mac", MAC, "--ip", "198.18.0.11", check=True)
    site.run("render", check=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ns = netns.Netns(f"dpi-{uuid.uuid4().hex[:8]}", run_dir=run_dir)
    # The client end of the bridge's veth in a namespace of its own: no address there, so the
    # DISCOVER leaves from 0.0.0.0 as a booting node's does (not from the server's address).
    client = f"dpc-{uuid.uuid4().hex[:8]}"
    try:
        ns.create()
        subprocess.run(["ip", "netns", "add", client], check=True, timeout=30)
        for argv in (["-n", ns.name, "link", "set", netns.KEEPER[1], "netns", client],
                     ["-n", client, "link", "set", netns.KEEPER[1], "up"]):
            subprocess.run(["ip", *argv], check=True, timeout=30)
        proc = subprocess.Popen(_daemon(backend, ns, site.cfg.dhcp.config_file, run_dir),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(run_dir / "daemon.log", "wb"))  # noqa: SIM115
        ns.started.append(proc.pid)
        time.sleep(0.5)  # the daemon binds (the client also re-sends, bounded)
        ipxe = _offer(client, "ipxe")
        plain = _offer(client, "pxe")
    finally:
        leftovers = ns.destroy()
        subprocess.run(["ip", "netns", "del", client], check=False, timeout=30)
    assert leftovers == []
    assert not netns.exists(client)
    # iPXE: the offer says "no ProxyDHCP here" inside option 175; still the right boot file.
    assert NO_PXEDHCP in ipxe["options"].get("175", ""), ipxe
    wanted = "http://198.18.0.1:8080/boot.ipxe" if ipxe_http else "pxelinux.0"
    assert wanted in _boot_files(ipxe), ipxe
    # A firmware PXE ROM (no iPXE) gets no option 175 and its first loader, as before.
    assert "175" not in plain["options"], plain
    first = "undionly.kpxe" if ipxe_http else "pxelinux.0"
    assert first in _boot_files(plain), plain
