"""Wake-on-LAN for the lab: a raw socket on the bridge that powers on a node's VM.

An "off" node is no QEMU process at all, so QEMU cannot emulate its NIC's wake logic; this
listener stands in for it (shared facts #8). A magic packet is 6 x 0xFF followed by 16 x the
MAC, sent either as a raw frame with ethertype 0x0842 (``etherwake``) or inside a UDP datagram
to port 7 or 9 (``wakeonlan``, and most power tools). It runs inside the lab namespace, where the
bridge keeps its carrier thanks to the keeper veth (a bridge with only dead taps drops frames).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
ETH_P_WOL = 0x0842
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
WOL_PORTS = (7, 9)
SYNC = b"\xff" * 6


def magic_target(frame: bytes) -> str | None:
    """The MAC a magic packet in this Ethernet frame wakes, or None if it is not one."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    payload = frame[14:]
    if ethertype == ETH_P_8021Q and len(frame) >= 18:
        ethertype = struct.unpack("!H", frame[16:18])[0]
        payload = frame[18:]
    if ethertype == ETH_P_IP:
        if len(payload) < 20 or payload[9] != socket.IPPROTO_UDP:
            return None
        ihl = (payload[0] & 0x0F) * 4
        udp = payload[ihl:]
        if len(udp) < 8 or struct.unpack("!H", udp[2:4])[0] not in WOL_PORTS:
            return None
        payload = udp[8:]
    elif ethertype != ETH_P_WOL:
        return None
    return find_magic(payload)


def find_magic(payload: bytes) -> str | None:
    at = payload.find(SYNC)
    while at != -1:
        body = payload[at + 6:at + 6 + 96]
        if len(body) == 96:
            mac = body[:6]
            if body == mac * 16:
                return ":".join(f"{b:02x}" for b in mac)
        at = payload.find(SYNC, at + 1)
    return None


class WolListener:
    """Listen on ``interface`` (inside the current namespace) and call ``wake(mac)``."""

    def __init__(self, interface: str, wake: Callable[[str], None], debounce: float = 1.0):
        self.interface = interface
        self.wake = wake
        self.debounce = debounce
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.woken: list[tuple[float, str]] = []

    def start(self) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((self.interface, 0))
        sock.setblocking(False)
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name="wol-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()

    def _loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.5)
            if not ready:
                continue
            for _ in range(256):  # drain what is queued, bounded
                try:
                    frame = self._sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError:
                    return
                mac = magic_target(frame)
                if mac:
                    self._handle(mac)

    def _handle(self, mac: str) -> None:
        now = time.monotonic()
        if now - self._last.get(mac, -1e9) < self.debounce:
            return  # the same packet seen twice (several copies are usual)
        self._last[mac] = now
        self.woken.append((time.time(), mac))
        try:
            self.wake(mac)
        except Exception as exc:  # one bad wake must not end the listener
            log.warning("wake %s failed: %s", mac, exc)
