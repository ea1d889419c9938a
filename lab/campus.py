"""The school's own DHCP server for the lab: an ISC dhcpd that hands out addresses and nothing
else (no next-server, no filename), on its own host (namespace) wired into the lab's bridge.

It plays the campus server that proxyDHCP (``[dhcp] mode = "proxy"``) coexists with: dynprov never
writes its config or leases. ISC dhcpd and dnsmasq both listen on port 67, so the campus server
lives in a second namespace, like a separate machine on the same wire: a veth pair, one end in
the lab's bridge.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab import netns
from pxe.errors import DynprovError

CONF = """# The campus DHCP server (a lab stand-in): addresses only, no boot options.
authoritative;
default-lease-time 600;
max-lease-time 600;
subnet {network} netmask {netmask} {{
  range {first} {last};
{boot}}}
"""


@dataclass
class Campus:
    """``start()`` then ``stop()`` (idempotent). ``lab`` is the lab's namespace (bridge br0)."""

    lab: str
    work: Path
    address: str = "198.18.0.2/24"
    pool: tuple[str, str] = ("198.18.0.150", "198.18.0.199")
    name: str = ""
    boot_file: str | None = None  # a campus server that ALSO answers boot options (a mistake)
    pid: int | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or f"{self.lab[:28]}-c"
        netns.Netns(self.name)  # checks the name

    @property
    def conf(self) -> Path:
        return self.work / "campus-dhcpd.conf"

    @property
    def leases(self) -> Path:
        return self.work / "campus-dhcpd.leases"

    def _boot_lines(self, net) -> str:
        if not self.boot_file:
            return ""
        return f'  next-server {net.ip};\n  filename "{self.boot_file}";\n'

    def start(self) -> None:
        import netaddr

        if not netns.exists(self.lab):
            raise DynprovError(f"lab namespace {self.lab} is not up")
        net = netaddr.IPNetwork(self.address)
        self.work.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(network=net.network, netmask=net.netmask,
                                         first=self.pool[0], last=self.pool[1],
                                         boot=self._boot_lines(net)))
        self.leases.touch()
        netns.run(["ip", "netns", "add", self.name])
        try:
            ip = ["ip", "-n", self.name]
            netns.run([*ip, "link", "set", "lo", "up"])
            netns.run([*ip, "link", "add", "campus0", "type", "veth", "peer", "name", "campus1",
                       "netns", self.lab])
            netns.run([*ip, "addr", "add", self.address, "dev", "campus0"])
            netns.run([*ip, "link", "set", "campus0", "up"])
            netns.run(["ip", "-n", self.lab, "link", "set", "campus1", "master", "br0"])
            netns.run(["ip", "-n", self.lab, "link", "set", "campus1", "up"])
            argv = ["ip", "netns", "exec", self.name, "dhcpd", "-f", "-4", "-cf", str(self.conf),
                    "-lf", str(self.leases), "-pf", str(self.work / "campus-dhcpd.pid"),
                    "campus0"]
            with open(self.work / "campus-dhcpd.log", "ab") as out:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=out, start_new_session=True)
            self.pid = self._proc.pid
            time.sleep(0.5)
            if self._proc.poll() is not None:
                raise DynprovError(f"campus dhcpd exited at start; see {self.work}/campus-dhcpd.log")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.pid is not None:
            netns.stop_pid(self.pid, expect="dhcpd")
            if self._proc is not None:
                self._proc.poll()
            self.pid = None
        # The veth pair goes with its lab end (synchronous; a namespace's deletion is deferred).
        if netns.exists(self.lab):
            netns.run(["ip", "-n", self.lab, "link", "del", "campus1"], check=False)
        if netns.exists(self.name):
            netns.Netns(self.name).destroy()
