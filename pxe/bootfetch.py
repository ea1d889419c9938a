"""Fetch a boot file the way firmware does (TFTP read request, HTTP GET), hashing as it reads.

Used by `pxe-stage explain` to prove a file is fetchable from the running servers right now.
Only the caller decides where to send: explain sends to loopback or a local address only.
Every loop is bounded in packets and time; nothing is written to disk.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from dataclasses import dataclass

HEAD_BYTES = 64 << 10  # kept of each file, to show a loader config's content
FIRMWARE_BLKSIZE = 1468  # what PXE ROMs and iPXE ask for (fits a 1500-byte MTU)


@dataclass
class Fetched:
    """What one fetch got: size and sha256 of every byte read, the first bytes, or why not."""

    ok: bool
    size: int = 0
    sha256: str = ""
    head: bytes = b""
    error: str = ""
    status: int | None = None  # HTTP status, when there was one
    unreachable: bool = False  # the server never answered (down, or wrong address/port)

    @property
    def text(self) -> str:
        return self.head.decode("utf-8", "replace")


class _Sink:
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = bytearray()

    def add(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[:HEAD_BYTES - len(self.head)]

    def done(self) -> Fetched:
        return Fetched(True, self.size, self.digest.hexdigest(), bytes(self.head))


def tftp_get(host: str, port: int, name: str, *, timeout: float = 2.0, retries: int = 2,
             blksize: int = FIRMWARE_BLKSIZE, max_seconds: float = 120.0) -> Fetched:
    """One TFTP read (RFC 1350 + blksize/tsize options), lock-step like PXE firmware."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        request = (struct.pack("!H", 1) + name.encode() + b"\0octet\0blksize\0"
                   + str(blksize).encode() + b"\0tsize\0" + b"0\0")
        return _tftp_loop(sock, (host, port), request, timeout, retries, max_seconds)
    except ConnectionRefusedError:  # ICMP port unreachable: nothing listens there
        return Fetched(False, unreachable=True, error=f"TFTP {host}:{port}: connection refused")
    except OSError as exc:
        return Fetched(False, error=f"TFTP {host}:{port}: {exc.strerror or exc}")
    finally:
        sock.close()


def _tftp_loop(sock: socket.socket, server: tuple[str, int], request: bytes, timeout: float,
               retries: int, max_seconds: float) -> Fetched:
    sink = _Sink()
    size_block = 512
    last_sent, dest = request, server
    tid: tuple | None = None
    expect = 1
    deadline = time.monotonic() + max_seconds
    sock.sendto(request, server)
    misses = 0
    for _ in range(10_000_000):  # packets; bounded by max_seconds long before
        if time.monotonic() > deadline:
            return Fetched(False, sink.size, error=f"TFTP transfer did not finish in {max_seconds:.0f} s")
        try:
            data, addr = sock.recvfrom(70000)
        except TimeoutError:
            misses += 1
            if misses > retries:
                where = "no answer" if tid is None else f"stalled after {sink.size} bytes"
                return Fetched(False, sink.size, unreachable=tid is None,
                               error=f"TFTP {server[0]}:{server[1]}: {where} "
                                     f"({retries + 1} tries, {timeout:g} s each)")
            sock.sendto(last_sent, dest)
            continue
        if tid is None:
            tid = addr
        elif addr != tid:
            continue  # a stray packet from another port: ignore (RFC 1350 says send ERROR 5)
        misses = 0
        opcode = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 0
        if opcode == 5:
            code = struct.unpack("!H", data[2:4])[0] if len(data) >= 4 else 0
            message = data[4:].rstrip(b"\0").decode("utf-8", "replace")
            return Fetched(False, error=f"TFTP error {code}: {message}")
        if opcode == 6:  # OACK: the server took our options
            parts = data[2:].split(b"\0")[:-1]
            options = {parts[i].decode().lower(): parts[i + 1].decode()
                       for i in range(0, len(parts) - 1, 2)}
            size_block = int(options.get("blksize", 512))
            last_sent, dest = struct.pack("!HH", 4, 0), tid
            sock.sendto(last_sent, dest)
            continue
        if opcode != 3 or len(data) < 4:
            return Fetched(False, sink.size, error=f"TFTP: unexpected packet (opcode {opcode})")
        block = struct.unpack("!H", data[2:4])[0]
        payload = data[4:]
        if block == expect & 0xFFFF:
            sink.add(payload)
            expect += 1
            last_sent, dest = struct.pack("!HH", 4, block), tid
            sock.sendto(last_sent, dest)
            if len(payload) < size_block:
                return sink.done()
        else:
            sock.sendto(last_sent, dest)  # a duplicate: say again what we have
    return Fetched(False, sink.size, error="TFTP transfer did not end")


def http_get(url: str, *, timeout: float = 5.0, max_seconds: float = 300.0) -> Fetched:
    """One HTTP GET, streamed and hashed (iPXE's `kernel`/`initrd`/`chain`, or /init's wget)."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    sink = _Sink()
    deadline = time.monotonic() + max_seconds
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=False,
                          trust_env=False) as resp:
            if resp.status_code != 200:
                return Fetched(False, status=resp.status_code,
                               error=f"HTTP {resp.status_code} for {url}")
            for chunk in resp.iter_bytes(1 << 20):
                sink.add(chunk)
                if time.monotonic() > deadline:
                    return Fetched(False, sink.size, status=200,
                                   error=f"HTTP transfer did not finish in {max_seconds:.0f} s")
    except httpx.ConnectError as exc:
        return Fetched(False, unreachable=True, error=f"HTTP {url}: {exc or 'cannot connect'}")
    except httpx.HTTPError as exc:
        return Fetched(False, sink.size, error=f"HTTP {url}: {exc or type(exc).__name__}")
    result = sink.done()
    result.status = 200
    return result
