"""A one-shot DHCP client for tests (no tests here): run inside a test's namespace as
`python3 tests/dhcp_client_support.py IFACE MAC ipxe|pxe`, it broadcasts one DHCPDISCOVER as
iPXE (user class "iPXE", option 175) or as a plain PXE ROM sends it, and prints the first
OFFER for it as JSON: {"file": ..., "options": {code: hex}} (exit 1: no offer within 5 s)."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

MAGIC = b"\x63\x82\x53\x63"


def discover(mac: str, xid: int, ipxe: bool) -> bytes:
    chaddr = bytes.fromhex(mac.replace(":", ""))
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                       bytes(4), bytes(4), bytes(4), chaddr.ljust(16, b"\0"), b"", b"")
    vendor = b"PXEClient:Arch:00000:UNDI:002001"
    wanted = bytes([1, 3, 60, 66, 67, 175])  # option 55; iPXE asks for 175 among others
    opts = (b"\x35\x01\x01" + bytes([60, len(vendor)]) + vendor + b"\x5d\x02\x00\x00"
            + bytes([55, len(wanted)]) + wanted)
    if ipxe:  # what iPXE adds: its user class and its own option 175 (feature flags)
        opts += b"\x4d\x04iPXE" + b"\xaf\x03\x13\x01\x01"
    return head + MAGIC + opts + b"\xff"


def options(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    i = 240
    while i + 1 < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        found[data[i]] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return found


def main(iface: str, mac: str, kind: str) -> int:
    xid = int.from_bytes(os.urandom(4), "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        sock.bind(("0.0.0.0", 68))
        deadline = time.monotonic() + 5
        for attempt in range(5):  # bounded: a daemon still binding misses the first one
            sock.sendto(discover(mac, xid, kind == "ipxe"), ("255.255.255.255", 67))
            until = min(deadline, time.monotonic() + 1)
            while (left := until - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    break
                if len(data) > 240 and data[0] == 2 and data[4:8] == xid.to_bytes(4, "big") \
                        and data[236:240] == MAGIC and options(data).get(53) == b"\x02":
                    print(json.dumps({"file": data[108:236].split(b"\0", 1)[0].decode(),
                                      "options": {str(k): v.hex() for k, v in
                                                  options(data).items()},
                                      "attempt": attempt + 1}))
                    return 0
            if time.monotonic() >= deadline:
                break
    return 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
