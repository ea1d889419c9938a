"""e2e: QEMU nodes re-imaged through the whole stack, as Moab drives it.

os-switch (inside the lab namespace, where the BMCs and the provisioning network are) -> the run
driver -> set-boot + our power drivers (IPMI / Redfish / WoL) -> the lab's virtual hardware ->
dnsmasq with our rendered config -> `pxe-stage serve` (TFTP, HTTP, call-home) -> our provisioning
initramfs -> the image's agent reports ready -> cluster-query. The lab only plays the hardware.

Lean on purpose (2 cores, TCG: about one core per booting VM): each test boots at most three VMs
at once. On failure the VMs' serial logs, the lab's logs and the run driver's log are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_e2e_support import (
    build_test_image,
    lab_config,
    need_root_tools,
    serial_logs_on_failure,
    wiki_lines,
)

from lab import cluster, netns
from pxe.images import Catalog

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 240  # per wait; a boot takes 16-30 s alone, about 50 s with 3 VMs on 2 cores


def _need_stack() -> None:
    need_root_tools()


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, dict[str, Path]]:
    _need_stack()
    cache = tmp_path_factory.mktemp("images")
    return {"centos5": build_test_image(cache, "centos5"),
            "sles11": build_test_image(cache, "sles11", "stateful")}


class Lab:
    def __init__(self, site, nodes: str, extra_config: str = ""):
        self.site = site
        self.name = f"dpt-{uuid.uuid4().hex[:8]}"
        with open(site.config_path, "a") as fh:
            fh.write(lab_config(nodes, self.name) + extra_config)

    @property
    def logs(self) -> list[Path]:
        lab = cluster.lab_dir(self.site.cfg)
        return [lab / "serial", lab, self.site.cfg.paths.state_dir]

    def add_image(self, label: str, files: dict[str, Path], mode: str = "stateless",
                  prov_seconds: int = 180, cmdline: str = "console=ttyS0,115200") -> None:
        self.site.run("images", "add", label, "--kernel", str(files["kernel"]), "--initrd",
                      str(files["initrd"]), "--rootfs", str(files["rootfs"]), "--mode", mode,
                      "--cmdline", cmdline, "--prov-seconds", str(prov_seconds), check=True)

    def exec(self, *argv: str, check: bool = False):
        return self.site.lab("exec", "--", *argv, check=check)

    def os_switch(self, nodes: str, label: str, *extra: str):
        return self.exec("os-switch", nodes, "--set", f"OS={label}", *extra)

    def query(self) -> dict[str, dict[str, str]]:
        out = self.site.run(cmd="cluster-query", check=True)
        return wiki_lines(out.stdout)

    def wait_final(self, nodes: list[str], timeout: float = BOOT_TIMEOUT) -> dict[str, str]:
        """Each node's run state once all are final (ready, failed, timed out)."""
        from pxe import db

        conn = db.connect(self.site.cfg.database)
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            rows = {r["node"]: r["state"] for r in conn.execute(
                "SELECT node, state FROM run_nodes WHERE (run_id, node) IN "
                "(SELECT MAX(run_id), node FROM run_nodes GROUP BY node)")}
            states = {n: rows.get(n, "") for n in nodes}
            if all(s in ("ready", "failed", "timed out", "cancelled") for s in states.values()):
                return states
            time.sleep(1.0)
        raise AssertionError(f"nodes not final within {timeout:.0f} s: {states}")


@contextlib.contextmanager
def lab_up(site, nodes: str, extra_config: str = "") -> Iterator[Lab]:
    lab = Lab(site, nodes, extra_config)
    try:
        with serial_logs_on_failure(lab.logs):
            up = site.lab("up")
            assert up.returncode == 0, up.stderr
            yield lab
    finally:
        down = site.lab("down")
        assert not netns.exists(lab.name), down.stdout + down.stderr


TRIO = """  {name = "n1", mac = "52:54:00:e2:01:01", ip = "198.18.0.11", power = "ipmi"},
  {name = "n2", mac = "52:54:00:e2:01:02", ip = "198.18.0.12", power = "redfish", firmware = "uefi"},
  {name = "n3", mac = "52:54:00:e2:01:03", ip = "198.18.0.13", power = "wol"},"""


def test_os_switch_three_nodes_ipmi_bios_redfish_uefi_wol_then_perjob_reimage(site, images):
    """BIOS over IPMI, UEFI over Redfish, BIOS over Wake-on-LAN: stateless boots that
    switch_root into the image and report ready from inside it; then per-job re-image."""
    _need_stack()
    with lab_up(site, TRIO) as lab:
        lab.add_image("centos5", images["centos5"])
        before = lab.query()
        assert set(before) == {"n1", "n2", "n3"}
        t0 = time.monotonic()
        sw = lab.os_switch("n1,n2,n3", "centos5")
        assert sw.returncode == 0, sw.stderr
        states = lab.wait_final(["n1", "n2", "n3"])
        took = time.monotonic() - t0
        assert states == {"n1": "ready", "n2": "ready", "n3": "ready"}, states
        print(f"os-switch -> ready, 3 nodes at once: {took:.1f} s")
        q = lab.query()
        for n in ("n1", "n2", "n3"):
            assert q[n]["OS"] == "centos5", q[n]
            assert q[n]["STATE"] == "Idle", q[n]
            # ready came from the image itself (switch_root happened): its agent said so
            log = (cluster.lab_dir(site.cfg) / "serial" / f"{n}.log").read_text(errors="replace")
            assert "IMAGE_ID=centos5" in log or "centos5" in log.split("switch_root")[-1]

        # Per-job mode: a node already running centos5 is re-imaged anyway (after its job).
        from pxe import db, run

        conn = db.connect(site.cfg.database)
        run.set_mode(conn, "perjob")
        boots_before = _boots(site, "n1")
        t0 = time.monotonic()
        sw = lab.os_switch("n1", "centos5")
        assert sw.returncode == 0, sw.stderr
        assert lab.wait_final(["n1"]) == {"n1": "ready"}
        print(f"per-job re-image of n1: {time.monotonic() - t0:.1f} s")
        assert _boots(site, "n1") > boots_before


def _boots(site, node: str) -> int:
    path = cluster.lab_dir(site.cfg) / "power.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines()
               if json.loads(line)["node"] == node and json.loads(line)["event"] in
               ("power-on", "reset"))


DISKFUL = """  {name = "d1", mac = "52:54:00:e2:02:01", ip = "198.18.0.21", power = "ipmi", disk_mb = 64},"""


def test_stateful_install_then_boot_from_disk(site, images):
    _need_stack()
    with lab_up(site, DISKFUL) as lab:
        lab.add_image("sles11", images["sles11"], mode="stateful")
        sw = lab.os_switch("d1", "sles11")
        assert sw.returncode == 0, sw.stderr
        assert lab.wait_final(["d1"]) == {"d1": "ready"}
        assert lab.query()["d1"]["OS"] == "sles11"
        # Installed, rebooted like hardware: PXE again -> our config now says local disk (iPXE's
        # script exits to the firmware's next boot device; pxelinux prints "Booting from local
        # disk") -> SYSLINUX from the virtual disk -> the installed kernel -> its agent: ready.
        log = (cluster.lab_dir(site.cfg) / "serial" / "d1.log").read_text(errors="replace")
        after = log.split("reported installed", 1)[1]
        assert "SYSLINUX" in after, after[-3000:]
        disk_boot = after.split("SYSLINUX", 1)[1]
        assert "BOOT_IMAGE=/vmlinuz" in disk_boot and "reported ready" in disk_boot


FAULTS = """  {name = "f1", mac = "52:54:00:e2:03:01", ip = "198.18.0.31", power = "ipmi"},
  {name = "f2", mac = "52:54:00:e2:03:02", ip = "198.18.0.32", power = "ipmi"},"""


def test_failed_boot_is_down_with_reason_and_killed_vm_times_out(site, images, tmp_path):
    """An image whose root file is not a root filesystem: f1's initramfs reports failed (Down
    with the reason); f2's QEMU is killed mid-boot (a node that never answers: timed out). Then
    no stale lock: f2 can be switched again at once and comes up.
    Console logging is on (`serve` keeps an SOL session per IPMI node; the lab's BMCs carry each
    VM's serial port over SOL): f1's failed boot - kernel lines, the initramfs's own lines - is
    in its console log afterwards and `run show` prints it."""
    _need_stack()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"this is not a root filesystem")
    with lab_up(site, FAULTS, "\n[console]\nlog = true\n") as lab:
        # `pxe-stage images add` refuses such a file (checked as a bundle's root filesystem):
        # the fault goes in through the catalog itself, as a damaged store would have it.
        files = images["centos5"]
        Catalog(site.cfg).add("broken", files["kernel"], files["initrd"], broken,
                              cmdline="console=ttyS0,115200", prov_seconds=70)
        lab.add_image("centos5", images["centos5"])
        sw = lab.os_switch("f1,f2", "broken")
        assert sw.returncode == 0, sw.stderr
        state = cluster.read_state(site.cfg)
        assert state is not None
        f2 = next(n for n in state["nodes"] if n["name"] == "f2")
        serial = Path(f2["serial_log"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # mid-boot: once its boot loader runs
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if "PXELINUX" in text or "boot.ipxe" in text:  # TFTP chain, or iPXE over HTTP
                break
            time.sleep(0.2)
        pid = int(Path(f2["pid_file"]).read_text())
        os.kill(pid, signal.SIGKILL)
        states = lab.wait_final(["f1", "f2"], timeout=150)
        assert states == {"f1": "failed", "f2": "timed out"}, states
        q = lab.query()
        assert q["f1"]["STATE"] == "Down" and "root filesystem" in q["f1"]["MESSAGE"], q["f1"]
        assert q["f2"]["STATE"] == "Down" and "timed out" in q["f2"]["MESSAGE"], q["f2"]
        _console_of_failed_run(site, "f1")
        from pxe import run

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and run.driver_running(site.cfg):
            time.sleep(0.5)
        assert not run.driver_running(site.cfg), "the run driver outlived its run"
        sw = lab.os_switch("f2", "centos5")
        assert sw.returncode == 0, sw.stderr
        assert lab.wait_final(["f2"]) == {"f2": "ready"}


def _console_of_failed_run(site, node: str) -> None:
    """The node's console log holds its failed boot, and `run show` prints those lines."""
    runs = json.loads(site.run("run", "list", "--json", check=True).stdout)
    run_id = next(r["id"] for r in runs if r["label"] == "broken")
    shown, deadline = "", time.monotonic() + 60
    while time.monotonic() < deadline:  # the SOL copy may trail the serial port a little
        shown = site.run("run", "show", str(run_id), "--console-lines", "5000", check=True).stdout
        if "dynprov: FAILED" in shown.split(f"\n{node}:", 1)[-1]:
            break
        time.sleep(2)
    mine = shown.split(f"\n{node}:", 1)[-1].split("\nf2:", 1)[0]
    assert "console: " in mine and f"{node}.log lines " in mine, shown[-3000:]
    assert "] Linux version" in mine, mine[:3000]           # the kernel's boot lines
    assert "| dynprov: FAILED" in mine, mine[-3000:]        # the initramfs's own lines
    assert "root filesystem" in mine
    data = json.loads(site.run("run", "show", str(run_id), "--json", check=True).stdout)
    member = next(m for m in data["nodes"] if m["node"] == node)
    assert member["console"]["count"] > 0 and member["console"]["files"]
