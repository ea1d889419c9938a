"""A boot storm against a real `pxe-stage serve` (issue 18): what a client over its connection
cap or a burst of connections receives is a whole answer and a clean close, never a reset.

Found with tools/bench_boot.py (500 simulated nodes): a refused connection was closed with its
request unread, so the kernel answered with a RST and the client lost the 503 it was sent
(ECONNRESET instead of an answer it can retry on).
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator

import pytest
from test_serve_support import LOOPBACK, serve_process

from tests.conftest import make_site

pytestmark = pytest.mark.integration

CAP = 4
OVER = 40  # connections over the cap, each sending its request before it reads


def _source() -> str:
    return f"127.{random.randint(10, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


@contextlib.contextmanager
def _held() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


def _read_all(sock: socket.socket) -> bytes:
    got = b""
    for _ in range(1000):  # bounded: the answer is one small 503
        data = sock.recv(65536)
        if not data:
            return got
        got += data
    raise AssertionError("no end of the answer")


def test_a_refused_client_gets_its_503_and_a_clean_close(tmp_path):
    site = make_site(tmp_path / "site")
    source = _source()
    with serve_process(site, "--no-tftp", http_workers=1, http_max_per_client=CAP,
                       http_timeout=30) as srv, _held() as socks:
        for _ in range(CAP):  # the client's allowance, held open and idle
            s = socket.create_connection((LOOPBACK, srv.http_port), 10, (source, 0))
            socks.append(s)
        over = []
        for _ in range(OVER):
            s = socket.create_connection((LOOPBACK, srv.http_port), 10, (source, 0))
            s.sendall(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\nUser-Agent: iPXE/1.21\r\n\r\n")
            socks.append(s)
            over.append(s)
        resets, answers = 0, []
        for s in over:
            try:
                answers.append(_read_all(s))
            except ConnectionResetError:
                resets += 1
        assert resets == 0, f"{resets} of {OVER} refused connections reset (answer lost)"
        assert all(a.startswith(b"HTTP/1.1 503") and a.endswith(b"too many connections "
                                                                b"from this client\n")
                   for a in answers), answers[:3]
