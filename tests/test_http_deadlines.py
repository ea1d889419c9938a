"""Requests that never finish (issue 15, item 10): `pxe-stage serve` and the REST service close a
half-sent request after the timeout, keep answering normal requests meanwhile, and refuse a
client over its connection cap. Real servers on loopback; the hostile client sends from other
127.0.0.x addresses so that the normal client is a different client.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from test_api_support import api_site, running_server
from test_serve_support import LOOPBACK, serve_process, wait_for

from tests.conftest import make_site

pytestmark = pytest.mark.integration

HALF_SENT = 50
TIMEOUT = 2.0  # the servers' header/body timeout in these tests
CAP = 60  # connections one client address may hold


def _connect(port: int, source: str, wrap: Callable[[socket.socket], socket.socket] | None
             ) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((LOOPBACK, port))
    return wrap(sock) if wrap else sock


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset), without blocking long."""
    sock.settimeout(0.05)
    try:
        data = sock.recv(4096)
    except (TimeoutError, ssl.SSLWantReadError):
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    return data == b""


@contextlib.contextmanager
def _sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            with contextlib.suppress(OSError):
                s.close()


def _check_deadlines_and_cap(port: int, normal_get: Callable[[], int],
                             wrap: Callable[[socket.socket], socket.socket] | None) -> None:
    with _sockets() as held:
        started = time.monotonic()
        for i in range(HALF_SENT):
            s = _connect(port, "127.0.0.2", wrap)
            if i % 2:  # headers never finished
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:  # headers done, body stalls
                s.sendall(b"POST /report HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                          b"Content-Type: application/x-www-form-urlencoded\r\n\r\nnode=")
            held.append(s)
        # A normal request from another client is answered while those hang.
        assert normal_get() == 200
        assert not any(_closed_by_server(s) for s in held[:5]), "closed before the timeout"
        wait_for(lambda: all(_closed_by_server(s) for s in held),
                 "every half-sent request closed", timeout=TIMEOUT + 15, every=0.2)
        assert time.monotonic() - started >= TIMEOUT * 0.9
        assert normal_get() == 200

    with _sockets() as held:
        for _ in range(CAP):
            held.append(_connect(port, "127.0.0.3", wrap))
        over = _connect(port, "127.0.0.3", wrap)
        held.append(over)
        over.settimeout(10)
        answer = over.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
        assert normal_get() == 200  # other clients are not affected


def test_serve_times_out_half_sent_requests_and_caps_clients(tmp_path):
    site = make_site(tmp_path / "site")
    with serve_process(site, "--no-tftp", http_timeout=TIMEOUT, http_workers=1,
                       http_max_per_client=CAP) as srv:
        _check_deadlines_and_cap(
            srv.http_port, lambda: httpx.get(f"{srv.url}/healthz", timeout=10).status_code,
            wrap=None)


def test_api_times_out_half_sent_requests_and_caps_clients(tmp_path):
    site = api_site(tmp_path / "site", None, timeout=TIMEOUT, max_per_client=CAP, workers=1)
    with running_server(site) as srv:
        ctx = ssl.create_default_context(cafile=str(srv.cert))
        port = int(srv.url.rsplit(":", 1)[1])

        def wrap(sock: socket.socket) -> socket.socket:
            return ctx.wrap_socket(sock, server_hostname="127.0.0.1")

        def normal_get() -> int:
            with srv.client() as c:
                return c.get("/healthz").status_code

        _check_deadlines_and_cap(port, normal_get, wrap=wrap)

        # A TLS client that connects and never sends its hello is closed after the timeout too.
        with _sockets() as held:
            for _ in range(10):
                held.append(_connect(port, "127.0.0.4", None))
            assert normal_get() == 200
            wait_for(lambda: all(_closed_by_server(s) for s in held),
                     "every silent TLS connection closed", timeout=TIMEOUT + 15, every=0.2)
