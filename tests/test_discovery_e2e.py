"""Discovery end to end: a QEMU machine the inventory does not know boots the real provisioning
initramfs with the APPEND line `pxe-stage render` wrote for unknown MACs, reports its hardware
to a real `pxe-stage serve` (user-mode network: the guest's 10.0.2.2 is the host's 127.0.0.1)
and waits; the admin adopts it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from initramfs_support import ROOT, kernel_root
from test_initramfs_images import Vm, netboot_argv, qemu_available

from pxe import bootfetch, db, discovery
from tests.test_explain import make_lo_site, serving

pytestmark = pytest.mark.e2e

QEMU_MAC = "52:54:00:12:34:56"  # QEMU's default for the first NIC


@pytest.fixture(scope="module")
def boot_files(tmp_path_factory) -> dict[str, Path]:
    """A kernel and the provisioning initramfs, as tools/make-test-image builds them."""
    out = tmp_path_factory.mktemp("disco-boot")
    proc = subprocess.run([str(ROOT / "tools/make-test-image"), "centos5", "-o",
                           str(out / "centos5.tar.gz"), "--kernel-root", str(kernel_root()),
                           "--boot-dir", str(out / "boot")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {"vmlinuz": out / "boot/vmlinuz", "initrd": out / "boot/initrd.img"}


def test_unknown_machine_reports_its_hardware_and_is_adopted(tmp_path, boot_files):
    qemu_available()
    site = make_lo_site(tmp_path)
    with open(site.config_path, "a") as fh:
        fh.write('\n[discovery]\nenabled = true\nimage = "discovery"\n')
    site.run("images", "add", "discovery", "--kernel", str(boot_files["vmlinuz"]), "--initrd",
             str(boot_files["initrd"]), check=True)
    site.run("render", check=True)
    cfg = site.cfg
    serve = cfg.raw["serve"]
    with serving(site):
        default = bootfetch.tftp_get("127.0.0.1", serve["tftp_port"], "pxelinux.cfg/default")
        append = next(line.split("APPEND", 1)[1].strip() for line in default.text.splitlines()
                      if line.strip().startswith("APPEND"))
        append = append.replace("http://127.0.0.1:", "http://10.0.2.2:")
        vm = Vm(netboot_argv(boot_files, f"console=ttyS0,115200 {append}"),
                tmp_path / "serial.log")
        conn = db.connect(cfg.database)
        try:
            deadline = time.monotonic() + 300
            found: list = []
            while time.monotonic() < deadline and vm.proc.poll() is None and not found:
                found = discovery.listing(conn)
                time.sleep(1)
            # It waits for the admin: still running, nothing added to the inventory.
            assert vm.proc.poll() is None, vm.log()[-3000:]
        finally:
            vm.stop()
    assert found, vm.log()[-3000:]
    assert "discovery mode" in vm.log()
    machine = found[0]
    assert machine["mac"] == QEMU_MAC
    facts = machine["facts"]
    assert {"name": "eth0", "mac": QEMU_MAC} in facts["nics"]
    assert facts["cpus"] >= 1 and 400 < facts["memory_mib"] <= 512
    assert facts["firmware"] == "bios"
    assert conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 0
    conn.close()

    site.run("nodes", "adopt", QEMU_MAC, "--name", "n017", "--ip", "127.0.0.17", check=True)
    node = json.loads(site.run("nodes", "show", "n017", "--json", check=True).stdout)[0]
    assert node["macs"] == [QEMU_MAC] and node["hardware"]["cpus"] == facts["cpus"]
