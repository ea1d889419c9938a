"""The lab's wire: a network namespace with a bridge, taps for the VMs, and the IPv6 router.

Everything the lab sends stays inside this namespace (the network rule). Hard-won details
(shared facts, "Building a virtual cluster here"):
- a bridge whose only ports are taps of powered-off VMs has no carrier and drops what the host
  sends (Wake-on-LAN packets vanish); this kernel has no ``dummy`` module, so a veth pair with one
  end in the bridge keeps the carrier up;
- iPXE waits about 13 s for IPv6 autoconfiguration on a link with no IPv6 router: the bridge gets
  a ULA address and an RA-only dnsmasq advertises it;
- ``127.0.0.1`` inside the namespace is the namespace's own loopback (brought up here).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pxe.errors import DynprovError, InputError

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_IFNAME = re.compile(r"^[a-z][a-z0-9]{0,14}$")
KEEPER = ("lkeep0", "lkeep1")  # the veth pair that keeps the bridge's carrier


def run(argv: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run one admin command (argv list), raise DynprovError with its stderr when it fails."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DynprovError(f"{argv[0]}: {exc}") from None
    if check and proc.returncode != 0:
        raise DynprovError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()[:300]}")
    return proc


def exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as dead.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline_of(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def stop_pid(pid: int, expect: str | None = None, timeout: float = 5.0) -> bool:
    """SIGTERM then SIGKILL one process we started. ``expect``: a string its argv must contain,
    so a PID reused by an unrelated process (after a crash) is never touched. True if it was ours."""
    if pid <= 1 or not pid_alive(pid):
        return False
    if expect is not None and not any(expect in a for a in cmdline_of(pid)):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        _reap(pid)
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            _reap(pid)
            if not pid_alive(pid):
                break
            time.sleep(0.02)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class Netns:
    """One namespace + bridge. ``create()`` then ``destroy()`` (always; it is idempotent)."""

    name: str
    bridge: str = "br0"
    address: str = "198.18.0.1/24"
    ula: str = "fd00:c612::1/64"
    run_dir: Path | None = None  # where the RA dnsmasq keeps its pid/log
    started: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InputError(f"bad namespace name {self.name!r} (a-z, 0-9, '-', max 31)")
        if not _IFNAME.match(self.bridge):
            raise InputError(f"bad bridge name {self.bridge!r}")

    # -- commands inside ---------------------------------------------------------------------
    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs: the PID is the real one)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args], check=check)

    @property
    def server_ip(self) -> str:
        return self.address.split("/")[0]

    # -- life cycle ---------------------------------------------------------------------------
    def create(self) -> None:
        if exists(self.name):
            raise DynprovError(f"network namespace {self.name} already exists "
                               "(a lab is up, or left over: `dynprov-lab down`)")
        run(["ip", "netns", "add", self.name])
        try:
            self.ip("link", "set", "lo", "up")
            self.ip("link", "add", self.bridge, "type", "bridge")
            # No STP and no forwarding delay: a tap that comes up must pass DHCP at once.
            self.ip("link", "set", self.bridge, "type", "bridge", "stp_state", "0",
                    "forward_delay", "0")
            self.ip("addr", "add", self.address, "dev", self.bridge)
            self.ip("-6", "addr", "add", self.ula, "dev", self.bridge, "nodad")
            self.ip("link", "add", KEEPER[0], "type", "veth", "peer", "name", KEEPER[1])
            self.ip("link", "set", KEEPER[0], "master", self.bridge)
            for dev in (*KEEPER, self.bridge):
                self.ip("link", "set", dev, "up")
        except BaseException:
            self.destroy()
            raise

    def add_tap(self, tap: str) -> None:
        if not _IFNAME.match(tap):
            raise InputError(f"bad tap name {tap!r}")
        self.ip("tuntap", "add", "dev", tap, "mode", "tap")
        self.ip("link", "set", tap, "master", self.bridge)
        self.ip("link", "set", tap, "up")

    def start_ra(self) -> int:
        """An RA-only dnsmasq on the bridge (no DNS, no DHCP): iPXE then skips its 13 s wait."""
        log = (self.run_dir / "ra-dnsmasq.log") if self.run_dir else Path("/dev/null")
        argv = self.argv([
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            f"--interface={self.bridge}", "--bind-interfaces", "--enable-ra",
            f"--dhcp-range=::,constructor:{self.bridge},ra-only,64,1h",
            "--dhcp-leasefile=/dev/null", "--user=root", f"--log-facility={log}",
            "--pid-file=",
        ])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.started.append(proc.pid)
        return proc.pid

    def pids(self) -> list[int]:
        if not exists(self.name):
            return []
        proc = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def destroy(self, ours: Iterable[int] = ()) -> list[int]:
        """Stop the processes we started, then whatever is still inside the namespace (only ever
        our own children: the namespace is ours), then delete it. Returns the leftover PIDs."""
        for pid in [*self.started, *ours]:
            stop_pid(pid)
        self.started.clear()
        leftovers = self.pids()
        for pid in leftovers:
            stop_pid(pid, timeout=2.0)
        if exists(self.name):
            run(["ip", "netns", "del", self.name], check=False)
        return leftovers
