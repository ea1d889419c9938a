"""e2e, the bare chain: one QEMU node PXE-boots through OUR rendered dnsmasq config and
`pxe-stage serve` (loader configs rendered from the database per request), into a minimal
busybox initramfs that calls home; over HTTP (iPXE) and over TFTP only, BIOS and UEFI.

No BMC and no run driver here (QEMU is started directly): when the full-stack tests fail, this
one tells whether the network boot itself works: BIOS (iPXE ROM -> boot.ipxe over HTTP, or
pxelinux over TFTP) and UEFI (OVMF -> ipxe.efi over TFTP -> HTTP, or GRUB over TFTP).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_e2e_support import (
    BOOTED,
    build_initramfs,
    kernel_image,
    kernel_root,
    need_root_tools,
    serial_logs_on_failure,
)

from lab import netns
from lab.qemu import QemuMachine, VmSpec

pytestmark = pytest.mark.e2e

MAC = "52:54:00:e2:e0:01"


def _wait_for(path: Path, text: str, timeout: float, proc_alive=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_text(errors="replace"):
                return True
        except FileNotFoundError:
            pass
        if proc_alive is not None and not proc_alive():
            # QEMU exited (guest poweroff): one last look at the log.
            return text in path.read_text(errors="replace") if path.exists() else False
        time.sleep(0.25)
    return False


def _serve_counters(ns: netns.Netns, url: str) -> dict[str, float]:
    """serve's /metrics, read from inside the namespace."""
    out = subprocess.run(ns.argv(["curl", "-s", "-S", "--max-time", "10", url]),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    values = {}
    for row in out.splitlines():
        if row and not row.startswith("#"):
            name, _, value = row.rpartition(" ")
            values[name] = float(value)
    return values


# Both transports, both firmwares: iPXE fetching script, kernel and initrd over HTTP (the
# default; TFTP carries only the first loader) and the all-TFTP chain (pxelinux / GRUB).
@pytest.mark.parametrize("firmware,transport", [("bios", "http"), ("uefi", "http"),
                                                ("bios", "tftp"), ("uefi", "tftp")])
def test_pxe_boot_through_rendered_config(site, tmp_path, firmware, transport):
    need_root_tools()
    if transport == "tftp":
        site.config_path.write_text(site.config_path.read_text()
                                    + "\n[boot]\nipxe_http = false\n")
    kroot = kernel_root()
    initrd = build_initramfs(tmp_path / "initrd.gz", kroot)
    site.run("images", "add", "tiny", "--kernel", str(kernel_image(kroot)), "--initrd",
             str(initrd), "--cmdline", "console=ttyS0,115200 panic=5", check=True)
    site.run("nodes", "add", "n1", "--mac", MAC, "--ip", "198.18.0.11", "--firmware", firmware,
             check=True)
    site.run("set-boot", "n1", "--os", "tiny", check=True)
    site.run("render", check=True)
    cfg = site.cfg
    run_dir = Path(f"/tmp/dpl-{uuid.uuid4().hex[:8]}")
    run_dir.mkdir()
    ns = netns.Netns(f"dpt-{uuid.uuid4().hex[:8]}", run_dir=run_dir)
    log = tmp_path / "serial" / "n1.log"
    log.parent.mkdir()
    vm = None
    try:
        ns.create()
        ns.add_tap("tap0")
        ns.start_ra()
        dhcp = subprocess.Popen(ns.argv([
            "dnsmasq", "--keep-in-foreground", f"--conf-file={cfg.dhcp.config_file}", "--port=0",
            f"--dhcp-leasefile={run_dir / 'leases'}", f"--pid-file={run_dir / 'dhcp.pid'}",
            "--user=root", "--log-dhcp", f"--log-facility={tmp_path / 'serial' / 'dnsmasq.log'}",
        ]), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ns.started.append(dhcp.pid)
        serve = subprocess.Popen(ns.argv([
            sys.executable, "-m", "pxe.cli.main", "--config", str(site.config_path), "serve"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "serial" / "serve.log", "wb"))  # noqa: SIM115
        ns.started.append(serve.pid)
        vm = QemuMachine(VmSpec(name="n1", mac=MAC, tap="tap0", run_dir=run_dir,
                                serial_log=log, netns=ns.name, firmware=firmware,
                                no_reboot=True))
        with serial_logs_on_failure(tmp_path / "serial"):
            start = time.monotonic()
            vm.power_on()
            assert vm.power_state() == "on"
            ok = _wait_for(log, BOOTED, 150, lambda: vm.power_state() == "on")
            took = time.monotonic() - start
            assert ok, f"{firmware} node did not boot the image within 150 s"
            text = log.read_text(errors="replace")
            assert "DYNPROV-TEST: node=n1 image=tiny" in text
            assert "DYNPROV-TEST: dhcp 198.18.0.11" in text
            print(f"{firmware} over {transport}: power on -> initramfs up in {took:.1f} s")
            counters = _serve_counters(ns, f"http://{cfg.network.server}:{cfg.boot.http_port}"
                                           "/metrics")
            kernel_size = kernel_image(kroot).stat().st_size
            tftp_bytes = counters["dynprov_tftp_bytes_total"]
            http_bytes = counters["dynprov_http_bytes_total"]
            if transport == "http":  # TFTP carried at most the first loader (iPXE itself)
                loader = (cfg.paths.tftp_root / cfg.boot.uefi_loader).stat().st_size
                assert tftp_bytes <= 2 * loader < kernel_size <= http_bytes, counters
            else:
                assert tftp_bytes >= kernel_size + initrd.stat().st_size, counters
            # It called home through serve with its one-time token: the node is ready.
            shown = json.loads(site.run("nodes", "show", "n1", "--json", check=True).stdout)[0]
            assert shown["state"] == "ready", shown
            # The guest powers off: QEMU ends, the machine reads "off".
            deadline = time.monotonic() + 30
            while vm.power_state() == "on" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert vm.power_state() == "off"
    finally:
        if vm is not None:
            vm.power_off()
        leftovers = ns.destroy()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not netns.exists(ns.name)
    assert leftovers == [], f"processes left in the namespace: {leftovers}"
