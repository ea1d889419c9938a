"""Who answers DHCP on the provisioning network: one PXE-style DISCOVER, every OFFER collected.

Why: in proxy mode (``[dhcp] mode = "proxy"``) the site's own DHCP server must hand out the
addresses, and only one server may answer boot options (a PXE client boots from whichever answers
first). Offers from our own server address are ignored, so this can run beside our dnsmasq.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from dataclasses import dataclass, field

from pxe import validate
from pxe.config import Config
from pxe.errors import DynprovError

MAGIC = b"\x63\x82\x53\x63"
BOOT_OPTIONS = (43, 66, 67)  # vendor (PXE menu), TFTP server name, boot file name


@dataclass(frozen=True)
class Offer:
    server: str            # option 54, else the sender
    address: str | None    # yiaddr, None in a proxyDHCP offer
    boot: tuple[str, ...]  # the boot answers it carries ("file pxelinux.0", "option 43"...)


@dataclass
class ProbeResult:
    interface: str
    offers: list[Offer] = field(default_factory=list)

    @property
    def address_servers(self) -> list[str]:
        return sorted({o.server for o in self.offers if o.address})

    @property
    def boot_servers(self) -> dict[str, tuple[str, ...]]:
        return {o.server: o.boot for o in self.offers if o.boot}


def discover_packet(mac: str, xid: int) -> bytes:
    """A DHCPDISCOVER as a BIOS PXE ROM sends it (option 60 PXEClient, 93 arch 0), broadcast."""
    chaddr = bytes.fromhex(validate.mac(mac).replace(":", ""))
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4,
                       b"\0" * 4, b"\0" * 4, b"\0" * 4, chaddr.ljust(16, b"\0"), b"", b"")
    vendor = b"PXEClient:Arch:00000:UNDI:002001"
    wanted = bytes([1, 3, 43, 60, 66, 67])  # option 55: what a PXE ROM asks for
    opts = (b"\x35\x01\x01" + bytes([60, len(vendor)]) + vendor + b"\x5d\x02\x00\x00"
            + bytes([55, len(wanted)]) + wanted + b"\xff")
    return head + MAGIC + opts


def parse_offer(data: bytes, xid: int, sender: str) -> Offer | None:
    if len(data) < 240 or data[0] != 2 or struct.unpack("!I", data[4:8])[0] != xid \
            or data[236:240] != MAGIC:
        return None
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            break
        code, length = data[i], data[i + 1]
        opts[code] = data[i + 2:i + 2 + length]
        i += 2 + length
    if opts.get(53) != b"\x02":
        return None
    yiaddr = socket.inet_ntoa(data[16:20])
    server = socket.inet_ntoa(opts[54]) if len(opts.get(54, b"")) == 4 else sender
    boot = []
    bootfile = data[108:236].split(b"\0", 1)[0]
    if bootfile:
        boot.append(f"file {bootfile.decode(errors='replace')[:60]}")
    boot += [f"option {c}" for c in BOOT_OPTIONS if c in opts]
    return Offer(server=server, address=None if yiaddr == "0.0.0.0" else yiaddr, boot=tuple(boot))


def probe(interface: str, mac: str, wait: float = 3.0, ignore: tuple[str, ...] = ()) -> ProbeResult:
    """Broadcast one DISCOVER on ``interface`` and collect OFFERs for ``wait`` seconds (bounded)."""
    xid = int.from_bytes(os.urandom(4), "big")
    result = ProbeResult(interface)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.bind(("0.0.0.0", 68))
            sock.sendto(discover_packet(mac, xid), ("255.255.255.255", 67))
        except OSError as exc:
            raise DynprovError(f"cannot probe DHCP on {interface}: {exc.strerror or exc} "
                               "(needs root and the interface)") from None
        deadline = time.monotonic() + wait
        for _ in range(1000):  # bounded in count and time
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data, (sender, _) = sock.recvfrom(4096)
            except TimeoutError:
                break
            with contextlib.suppress(struct.error, OSError, ValueError):
                offer = parse_offer(data, xid, sender)
                if offer and offer.server not in ignore and offer not in result.offers:
                    result.offers.append(offer)
    return result


def verdict(cfg: Config, result: ProbeResult) -> list[str]:
    """The problems with what answered (empty: this network suits the configured mode)."""
    problems = []
    iface = result.interface
    if cfg.dhcp.mode == "proxy":
        if not result.address_servers:
            problems.append(f"no DHCP server answered with an address on {iface}: proxy mode "
                            "needs the site's DHCP server on this network (or set [dhcp] mode = "
                            '"server")')
        for server, boot in sorted(result.boot_servers.items()):
            problems.append(f"two DHCP servers answer boot options on {iface}: {server} "
                            f"({', '.join(boot)}) as well as dynprov; a PXE client boots from "
                            f"whichever answers first: remove next-server/filename from {server} "
                            "or do not run proxy mode")
    else:
        for server in sorted({o.server for o in result.offers}):
            problems.append(f"another DHCP server answers on {iface}: {server}; with [dhcp] mode "
                            f'= "server" dynprov must be the only one (or set mode = "proxy")')
    return problems
