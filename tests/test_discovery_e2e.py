"""Discovery end to end: a QEMU lab machine the inventory does not know PXE-boots through our
rendered dnsmasq config and `pxe-stage serve` in a network namespace (its NIC's iPXE ROM gets a
dynamic address and boot.ipxe, whose per-MAC script is missing, so it falls through to the
discovery image: the real provisioning initramfs), reports its hardware and waits; nothing is
added until the admin adopts it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_e2e_support import build_test_image, need_root_tools, serial_logs_on_failure

from lab import netns
from lab.qemu import QemuMachine, VmSpec
from pxe import db, discovery

pytestmark = pytest.mark.e2e

UNKNOWN = "52:54:00:d1:5c:01"  # in no inventory


@pytest.fixture(scope="module")
def boot_files(tmp_path_factory) -> dict[str, Path]:
    """A kernel and the provisioning initramfs, as tools/make-test-image builds them."""
    return build_test_image(tmp_path_factory.mktemp("disco-boot"), "centos5")


def test_unknown_machine_pxe_boots_discovery_reports_waits_and_is_adopted(site, tmp_path,
                                                                          boot_files):
    need_root_tools()
    with open(site.config_path, "a") as fh:
        fh.write('\n[discovery]\nenabled = true\nimage = "discovery"\n')
    site.run("images", "add", "discovery", "--kernel", str(boot_files["kernel"]), "--initrd",
             str(boot_files["initrd"]), "--cmdline", "console=ttyS0,115200", check=True)
    site.run("render", check=True)
    cfg = site.cfg
    first, last = (int(a.rsplit(".", 1)[1]) for a in cfg.network.dynamic_range)
    run_dir = Path(f"/tmp/dpl-{uuid.uuid4().hex[:8]}")
    run_dir.mkdir()
    ns = netns.Netns(f"dpt-{uuid.uuid4().hex[:8]}", run_dir=run_dir)
    logs = tmp_path / "serial"
    logs.mkdir()
    vm = None
    found: list = []
    conn = db.connect(cfg.database)
    try:
        ns.create()
        ns.add_tap("tap0")
        dhcp = subprocess.Popen(ns.argv([
            "dnsmasq", "--keep-in-foreground", f"--conf-file={cfg.dhcp.config_file}", "--port=0",
            f"--dhcp-leasefile={run_dir / 'leases'}", f"--pid-file={run_dir / 'dhcp.pid'}",
            "--user=root", "--log-dhcp", f"--log-facility={logs / 'dnsmasq.log'}",
        ]), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ns.started.append(dhcp.pid)
        with open(logs / "serve.log", "wb") as err:
            serve = subprocess.Popen(ns.argv([
                sys.executable, "-m", "pxe.cli.main", "--config", str(site.config_path),
                "serve"]), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        ns.started.append(serve.pid)
        vm = QemuMachine(VmSpec(name="lab1", mac=UNKNOWN, tap="tap0", run_dir=run_dir,
                                serial_log=logs / "lab1.log", netns=ns.name, memory_mb=512))
        with serial_logs_on_failure(logs):
            vm.power_on()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and vm.power_state() == "on" and not found:
                found = discovery.listing(conn)
                time.sleep(1)
            assert found, "the unknown machine did not report within 300 s"
            time.sleep(5)  # it waits for the admin: still up, still not a node
            assert vm.power_state() == "on"
            assert "discovery mode" in (logs / "lab1.log").read_text(errors="replace")
    finally:
        if vm is not None:
            vm.power_off()
        leftovers = ns.destroy()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert leftovers == [], f"processes left in the namespace: {leftovers}"
    machine = found[0]
    assert machine["mac"] == UNKNOWN
    # it reported from an address of our dynamic range: the DHCP answer our config gives strangers
    assert machine["ip"].startswith("198.18.0.") and \
        first <= int(machine["ip"].rsplit(".", 1)[1]) <= last, machine["ip"]
    facts = machine["facts"]
    assert {"name": "eth0", "mac": UNKNOWN} in facts["nics"]
    assert facts["cpus"] >= 1 and 400 < facts["memory_mib"] <= 512
    assert facts["firmware"] == "bios"
    assert conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 0  # nothing by itself
    conn.close()

    out = site.run("nodes", "adopt", UNKNOWN, "--name", "n017", "--ip", "198.18.0.17",
                   check=True)
    assert "adopted 52:54:00:d1:5c:01 as n017" in out.stdout
    node = json.loads(site.run("nodes", "show", "n017", "--json", check=True).stdout)[0]
    assert node["macs"] == [UNKNOWN] and node["ip"] == "198.18.0.17"
    assert node["hardware"]["cpus"] == facts["cpus"]
    assert json.loads(site.run("nodes", "discovered", "--json", check=True).stdout) == []
