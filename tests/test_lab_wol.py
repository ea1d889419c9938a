"""The lab's Wake-on-LAN listener: magic packets parsed, and woken for real inside a namespace."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from lab import netns
from lab.wol_listener import find_magic, magic_target

MAC = "52:54:00:aa:bb:cc"
RAW = bytes.fromhex(MAC.replace(":", ""))
MAGIC = b"\xff" * 6 + RAW * 16


def _eth(ethertype: int, payload: bytes) -> bytes:
    return b"\xff" * 6 + bytes.fromhex("525400000001") + struct.pack("!H", ethertype) + payload


def _udp_frame(port: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.255"))
    return _eth(0x0800, ip + udp)


@pytest.mark.unit
def test_magic_in_ethertype_0842_and_udp_7_9():
    assert magic_target(_eth(0x0842, MAGIC)) == MAC
    assert magic_target(_udp_frame(9, MAGIC)) == MAC
    assert magic_target(_udp_frame(7, b"\x00" * 4 + MAGIC)) == MAC


@pytest.mark.unit
def test_not_magic():
    assert magic_target(_udp_frame(53, MAGIC)) is None          # wrong port
    assert magic_target(_eth(0x86DD, MAGIC)) is None            # not WoL, not IPv4
    assert magic_target(_eth(0x0842, MAGIC[:-1])) is None       # truncated
    assert find_magic(b"\xff" * 6 + RAW * 15 + b"\x00" * 6) is None  # one copy wrong
    assert magic_target(b"short") is None


@pytest.mark.unit
def test_extra_sync_bytes_before_the_mac():
    assert find_magic(b"\xff" * 9 + RAW * 16) == MAC


LISTEN = """
import sys, time
from lab.wol_listener import WolListener
got = []
w = WolListener("br0", got.append, debounce=0.5)
w.start()
print("listening", flush=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and len(set(got)) < 2:
    time.sleep(0.05)
w.stop()
print(" ".join(sorted(set(got))), flush=True)
"""


@pytest.mark.integration
def test_listener_wakes_on_wakeonlan_and_etherwake():
    if not (shutil.which("wakeonlan") and shutil.which("etherwake", path="/usr/sbin:/usr/bin")):
        pytest.skip("wakeonlan/etherwake not installed")
    ns = netns.Netns(f"dpt-{uuid.uuid4().hex[:8]}")
    try:
        ns.create()
        proc = subprocess.Popen(ns.argv([sys.executable, "-c", LISTEN]), stdout=subprocess.PIPE,
                                text=True)
        ns.started.append(proc.pid)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening"
        other = "52:54:00:aa:bb:dd"
        # The bridge has no VM attached: the keeper veth keeps its carrier, frames still flow.
        for _ in range(3):
            subprocess.run(ns.argv(["wakeonlan", "-i", "198.18.0.255", MAC]), check=True,
                           capture_output=True, timeout=10)
            subprocess.run(ns.argv(["etherwake", "-b", "-i", "br0", other]), check=True,
                           capture_output=True, timeout=10)
            time.sleep(0.3)
        out, _ = proc.communicate(timeout=30)
        assert out.split() == sorted([MAC, other])
    finally:
        ns.destroy()
    assert not netns.exists(ns.name)
