"""A QEMU virtual machine that plays one node's hardware (a Machine for the virtual BMCs).

Power on starts QEMU inside the lab namespace; power off kills our PID (pulling the plug);
reset is QMP ``system_reset`` (a warm reset). What bit on this machine (shared facts):
- TCG only (no ``-enable-kvm``: nested KVM aborts here);
- SeaBIOS still boots the NIC's iPXE ROM with ``-boot order=c`` (even ``strict=on``), so "boot
  from disk" starts QEMU with the NIC's ``romfile=`` empty; OVMF ignores ``-boot order`` and
  follows ``bootindex=`` on the devices;
- ``-machine pc,graphics=off`` mirrors SeaBIOS, iPXE and pxelinux text to the serial port; the
  serial log is opened with ``append=on`` so every boot of the node stays in one file;
- a guest ``poweroff -f`` ends the QEMU process: that is how the BMC sees "power off".
A new boot device only takes effect when the firmware starts again: a reset after the boot
device changed restarts the process (what a BMC's "next boot" flag amounts to here).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab import netns
from lab.machine import BOOT_DEVICES, BootDevice, PowerState
from pxe.errors import DynprovError, InputError

OVMF = ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE.fd")
NIC_MODELS = {"e1000": "e1000", "virtio": "virtio-net-pci"}
MARK = "dynprov-lab"  # in every VM's -name: how `lab down` recognises our QEMU after a crash


@dataclass(frozen=True)
class VmSpec:
    name: str
    mac: str
    tap: str
    run_dir: Path               # pid file, QMP socket (short path: a unix socket name <= 107)
    serial_log: Path
    netns: str | None = None    # None: the caller already runs inside the namespace
    firmware: str = "bios"      # bios | uefi
    nic: str = "e1000"          # e1000 | virtio
    memory_mb: int = 512
    disk: Path | None = None    # raw disk image for stateful installs (virtio-blk)
    no_reboot: bool = False     # guest reboot ends QEMU (tests); else it reboots like hardware

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def qmp_path(self) -> Path:
        return self.run_dir / f"{self.name}.qmp"


def ovmf_path() -> str:
    for path in OVMF:
        if Path(path).is_file():
            return path
    raise DynprovError("OVMF firmware not found (Debian: ovmf)")


def qemu_argv(spec: VmSpec, boot_device: str) -> list[str]:
    """The QEMU command line for one power-on with ``boot_device`` network|disk."""
    if boot_device not in ("network", "disk"):
        raise InputError(f"boot device must be network or disk, not {boot_device!r}")
    if spec.nic not in NIC_MODELS:
        raise InputError(f"NIC model must be one of {', '.join(NIC_MODELS)}")
    network = boot_device == "network"
    nic = [f"{NIC_MODELS[spec.nic]}", "netdev=n0", f"mac={spec.mac}"]
    if not network:
        nic.append("romfile=")  # no option ROM: SeaBIOS and OVMF cannot boot this NIC
    disk: list[str] = []
    if spec.disk is not None:
        dev = "virtio-blk-pci,drive=d0"
        if spec.firmware == "uefi":
            dev += ",bootindex=" + ("2" if network else "1")
        disk = ["-drive", f"file={spec.disk},if=none,id=d0,format=raw", "-device", dev]
    if spec.firmware == "uefi" and network:
        nic.append("bootindex=1")
    argv = [
        "qemu-system-x86_64", "-name", f"{MARK}-{spec.name},process={MARK}-{spec.name}",
        "-machine", "pc,graphics=off", "-accel", "tcg", "-m", str(spec.memory_mb),
        "-display", "none", "-monitor", "none", "-nodefaults",
        "-chardev", f"file,id=ser0,path={spec.serial_log},append=on", "-serial", "chardev:ser0",
        "-qmp", f"unix:{spec.qmp_path},server=on,wait=off",
        "-pidfile", str(spec.pid_file),
        "-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
        "-device", ",".join(nic), *disk,
    ]
    if spec.firmware == "uefi":
        argv += ["-bios", ovmf_path()]
    else:
        argv += ["-boot", "order=n" if network else "order=c"]
    if spec.no_reboot:
        argv.append("-no-reboot")
    return netns.Netns(spec.netns).argv(argv) if spec.netns else argv


class QemuMachine:
    """One node's hardware, a ``lab.machine.Machine``. Thread-safe; every call is bounded."""

    def __init__(self, spec: VmSpec, persistent_device: BootDevice = "network",
                 on_event: Callable[[str, str, str], None] | None = None):
        if len(str(spec.qmp_path)) > 100:
            raise InputError(f"run dir {spec.run_dir} is too long for a unix socket path")
        if persistent_device not in BOOT_DEVICES:
            raise InputError(f"boot device must be network or disk, not {persistent_device!r}")
        self.spec = spec
        self.name = spec.name
        self._persistent: BootDevice = persistent_device
        self._next: BootDevice | None = None
        self._started_with: BootDevice | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()
        self.boots: list[tuple[float, BootDevice]] = []
        self.on_event = on_event  # (node, "power-on" | "reset" | "power-off", device)

    @property
    def serial_path(self) -> Path:
        """The serial log, which the node's virtual BMC follows into serial-over-LAN."""
        return self.spec.serial_log

    def _tell(self, event: str, device: str = "") -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(self.name, event, device)

    # -- state -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        with self._lock:
            if self._proc is not None:
                if self._proc.poll() is None:
                    return self._proc.pid
                self._proc = None
                return None
        return running_pid(self.spec)

    def power_state(self) -> PowerState:
        return "on" if self.pid else "off"

    def boot_device(self) -> tuple[BootDevice, bool]:
        with self._lock:
            if self._next is not None:
                return self._next, False
            return self._persistent, True

    def set_boot_device(self, device: BootDevice, persistent: bool = False) -> None:
        if device not in BOOT_DEVICES:
            raise ValueError(f"unknown boot device {device!r} (expected network or disk)")
        with self._lock:
            if persistent:
                self._persistent, self._next = device, None
            else:
                self._next = device

    def _take_device(self) -> BootDevice:  # caller holds the lock
        device = self._next or self._persistent
        self._next = None
        return device

    # -- power ---------------------------------------------------------------------------------
    def power_on(self) -> None:
        with self._lock:
            if self.pid:
                return
            self._start(self._take_device())

    def _start(self, device: BootDevice) -> None:  # caller holds the lock
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        self.spec.serial_log.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.spec.pid_file, self.spec.qmp_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        argv = qemu_argv(self.spec, device)
        with open(self.spec.run_dir / f"{self.name}.qemu.log", "ab") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=err,
                                          start_new_session=True)
        self._started_with = device
        self.boots.append((time.time(), device))
        self._tell("power-on", device)
        # "On" once QEMU holds its tap and QMP socket (milliseconds); bounded wait.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.spec.qmp_path.exists():
            if self._proc.poll() is not None:
                raise DynprovError(f"{self.name}: QEMU exited at start: {self._qemu_error()}")
            time.sleep(0.02)

    def power_off(self) -> None:
        with self._lock:
            pid = self.pid
            if pid:
                netns.stop_pid(pid, expect=f"{MARK}-{self.name}")
                self._tell("power-off")
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
                self._proc = None
            for stale in (self.spec.pid_file, self.spec.qmp_path):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

    def reset(self) -> None:
        """Warm reset; off stays off (as on hardware). The firmware's boot device is fixed on
        QEMU's command line, so a reset onto another device restarts the process."""
        with self._lock:
            if not self.pid:
                return
            device = self._take_device()
            if device != self._started_with:
                self.power_off()
                self._start(device)
                return
            try:
                qmp(self.spec.qmp_path, "system_reset")
                self.boots.append((time.time(), device))
                self._tell("reset", device)
            except OSError:
                self.power_off()
                self._start(device)

    def shutdown(self) -> None:
        """The ACPI power button: only an OS that handles it powers off (as on hardware)."""
        with self._lock:
            if self.pid:
                with contextlib.suppress(OSError):
                    qmp(self.spec.qmp_path, "system_powerdown")

    def _qemu_error(self) -> str:
        path = self.spec.run_dir / f"{self.name}.qemu.log"
        try:
            return path.read_text(errors="replace").strip().splitlines()[-1][:300]
        except (OSError, IndexError):
            return "no message"


def running_pid(spec: VmSpec) -> int | None:
    """The PID of this node's QEMU from its pid file, only if that process is really ours."""
    try:
        pid = int(spec.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if netns.pid_alive(pid) and any(f"{MARK}-{spec.name}" in a for a in netns.cmdline_of(pid)):
        return pid
    return None


def qmp(path: Path, command: str, timeout: float = 5.0) -> dict:
    """One QMP command over the VM's unix socket: greeting, capabilities, command."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")

        def reply() -> dict:
            for _ in range(50):  # skip asynchronous events
                line = reader.readline()
                if not line:
                    raise OSError("QMP connection closed")
                msg = json.loads(line)
                if "return" in msg or "error" in msg or "QMP" in msg:
                    return msg
            raise OSError("no QMP reply")

        reply()  # greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reply()
        sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        msg = reply()
        if "error" in msg:
            raise OSError(f"QMP {command}: {msg['error']}")
        return msg
