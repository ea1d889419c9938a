"""serve's fast path for boot files (pxe.serve.fastpath): real uvicorn + the fast protocol in a
thread on 127.0.0.1, raw sockets and httpx. What it answers itself, what it hands to the
framework, and the bad clients: malformed lines, huge headers, traversal, Range edges, pipelined
keep-alive, clients that stall while sending headers or while reading a body (both bounded)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from test_serve_support import LOOPBACK, free_port, put, wait_for

from pxe.serve import metrics, settings
from pxe.serve.app import create_app
from pxe.serve.deadlines import guarded
from pxe.serve.fastpath import MAX_HEAD, BootFiles, fast_protocol
from pxe.serve.http import ZeroCopyH11Protocol

pytestmark = pytest.mark.integration

TIMEOUT = 1.0  # header / keep-alive / no-progress timeout of the server under test
BIG = 24 * 1024 * 1024 + 5


@dataclass
class Served:
    port: int
    data: bytes
    small: bytes
    secret: bytes
    handed_off: list[str] = field(default_factory=list)
    counters: metrics.Counters | None = None
    connections: set = field(default_factory=set)  # uvicorn's server_state.connections

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def count(self, name: str, *labels: str) -> int:
        assert self.counters is not None
        return self.counters.total(metrics.slot(name, *labels))


@pytest.fixture
def served(site) -> Iterator[Served]:
    with running(site) as srv:
        yield srv


@contextlib.contextmanager
def running(site, log_access: bool = False) -> Iterator[Served]:
    import uvicorn

    root = site.cfg.paths.http_root
    data, small = os.urandom(BIG), os.urandom(5000)
    put(root, "blobs/big.bin", data)
    put(root, "boot/small.cfg", small)
    put(root, "private", b"x", mode=0o600)
    os.mkfifo(root / "fifo", 0o644)
    secret = b"top secret " + os.urandom(8).hex().encode()
    (site.root / "secret").write_bytes(secret)
    (site.root / "secret").chmod(0o644)
    (root / "escape").symlink_to(site.root / "secret")
    counters = metrics.Counters(1)
    app = create_app(site.cfg, settings.load(site.cfg), counters, 0)
    srv = Served(free_port(), data, small, secret, counters=counters)
    open_per_client: Counter[str] = Counter()
    base = guarded(ZeroCopyH11Protocol, TIMEOUT, TIMEOUT, 100, open_per_client)

    class Recording(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            srv.handed_off.append("connection")
            super().connection_made(transport)

    protocol = fast_protocol(Recording, BootFiles(app), TIMEOUT, 100, open_per_client,
                             log_access)
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=srv.port, http=protocol,
                                           lifespan="off", log_config=None, access_log=log_access,
                                           ws="none", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "uvicorn started")
        srv.connections = server.server_state.connections
        yield srv
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def connect(srv: Served, rcvbuf: int = 0) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(20)
    s.connect((LOOPBACK, srv.port))
    try:
        yield s
    finally:
        _LEFT.pop(s.fileno(), None)
        s.close()


_LEFT: dict[int, bytes] = {}  # bytes read past one response, per socket (pipelining)


def read_response(s: socket.socket, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off a raw socket (by its content-length, else to the end)."""
    buf = _LEFT.pop(s.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the headers: {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if "content-length" not in headers and not head_only:  # to the end (uvicorn's 400)
        while chunk := s.recv(65536):
            rest += chunk
        return status, headers, rest
    want = 0 if head_only else int(headers["content-length"])
    while len(rest) < want:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed after {len(rest)} of {want} body bytes")
        rest += chunk
    if len(rest) > want:
        _LEFT[s.fileno()] = rest[want:]
    return status, headers, rest[:want]


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Read (and drop) until EOF/reset; True if that came within ``within`` seconds."""
    deadline = time.monotonic() + within
    s.settimeout(0.2)
    for _ in range(int(within / 0.2) + 5):
        try:
            if s.recv(1 << 20) == b"":
                return True
        except TimeoutError:
            pass
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
    return False


def test_boot_files_are_answered_without_the_framework(served):
    srv = served
    with httpx.Client(timeout=30) as client:
        whole = client.get(f"{srv.url}/blobs/big.bin")
        part = client.get(f"{srv.url}/blobs/big.bin", headers={"Range": "bytes=1000-2999999"})
        small = client.get(f"{srv.url}/boot/small.cfg")
        head = client.head(f"{srv.url}/blobs/big.bin")
        missing = client.get(f"{srv.url}/nope")
    assert whole.status_code == 200 and whole.content == srv.data
    assert whole.headers["content-length"] == str(BIG) and whole.headers["etag"]
    assert part.status_code == 206 and part.content == srv.data[1000:3000000]
    assert part.headers["content-range"] == f"bytes 1000-2999999/{BIG}"
    assert small.content == srv.small and small.headers["content-type"].startswith("text/plain")
    assert head.content == b"" and head.headers["content-length"] == str(BIG)
    assert missing.status_code == 404 and missing.text == "not found\n"
    assert srv.handed_off == [], "a boot file went through the framework"
    assert srv.count("dynprov_http_requests_total", "200") == 3
    assert srv.count("dynprov_http_requests_total", "206") == 1
    assert srv.count("dynprov_http_requests_total", "404") == 1
    assert srv.count("dynprov_http_bytes_total") == BIG + 2999000 + len(srv.small) + 10


def test_other_requests_go_to_the_framework(served):
    srv = served
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{srv.url}/healthz").status_code in (200, 503)  # a Starlette route
        assert client.post(f"{srv.url}/blobs/big.bin").status_code == 405
        assert client.put(f"{srv.url}/blobs/big.bin", content=b"x").status_code == 405
    assert len(srv.handed_off) >= 1
    # On one keep-alive connection: boot files first (fast path), then a route (handed over).
    with connect(srv) as s:
        s.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[2] == srv.small
        before = len(srv.handed_off)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert len(srv.handed_off) == before + 1
        s.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n")  # still served there
        assert read_response(s)[2] == srv.small


def test_pipelined_keep_alive_requests_are_answered_in_order(served):
    srv = served
    reqs = (b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /blobs/big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /blobs/big.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=-70000\r\n\r\n"
            b"GET /blobs/big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with connect(srv) as s:
        s.sendall(reqs)
        assert read_response(s)[2] == srv.small
        status, headers, _ = read_response(s, head_only=True)
        assert status == 200 and headers["content-length"] == str(BIG)
        assert read_response(s)[2] == srv.data[-70000:]
        assert read_response(s)[2] == srv.data
        assert read_response(s)[0] == 404
        status, headers, body = read_response(s)
        assert body == srv.small and headers["connection"] == "close"
        assert closed_by_server(s, 5)
    assert srv.handed_off == []


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET /boot/small.cfg\r\n\r\n",
    b"GET /boot/small.cfg HTTPS/1.1\r\nHost: x\r\n\r\n",
    b"GET /boot/small.cfg HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"GET /boot/sm\x01all.cfg HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET  /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_requests_get_400_and_are_closed(served, request_bytes):
    srv = served
    with connect(srv) as s:
        s.sendall(request_bytes)
        status, _, _ = read_response(s)
        assert status == 400
        assert closed_by_server(s, 5)


def test_huge_headers_are_bounded(served):
    srv = served
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    with connect(srv) as s:  # never ends: answered once past the limit
        s.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for _ in range(MAX_HEAD // len(filler) + 3):
                s.sendall(filler)
        status, _, body = read_response(s)
        assert status == 431 and b"too large" in body
        assert closed_by_server(s, 5)
    with connect(srv) as s:  # complete, but too long
        s.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n"
                  + filler * (MAX_HEAD // len(filler) + 2) + b"\r\n")
        assert read_response(s)[0] == 431
    with httpx.Client(timeout=10) as client:  # a normal request right after
        assert client.get(f"{srv.url}/boot/small.cfg").content == srv.small


@pytest.mark.parametrize("target", [
    "/../secret", "/%2e%2e/secret", "/%2E%2E/%2e%2e/etc/passwd", "/blobs/..%2f..%2fsecret",
    "/..%5csecret", "/blobs/../../secret", "/%00secret", "//etc/passwd", "/escape", "/private",
    "/fifo", "/blobs", "/", "/.hidden",
])
def test_path_confinement(served, target):
    srv = served
    with connect(srv) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, _, body = read_response(s)
    assert status in (400, 403, 404), (target, status)
    assert srv.secret not in body and b"root:" not in body
    if target in ("/escape", "/private"):
        assert status == 403
    if target in ("/fifo", "/blobs", "/"):
        assert status == 404


@pytest.mark.parametrize("header,status,first,last", [
    ("bytes=0-0", 206, 0, 0),
    (f"bytes={BIG - 1}-", 206, BIG - 1, BIG - 1),
    (f"bytes={BIG - 1}-{BIG + 100}", 206, BIG - 1, BIG - 1),
    (f"bytes=-{BIG + 100}", 206, 0, BIG - 1),
    ("bytes=100000-", 206, 100000, BIG - 1),  # a large span: by sendfile, from an offset
    ("bytes = 5 - 9", 206, 5, 9),
    (f"bytes={BIG}-", 416, 0, -1),
    ("bytes=-0", 416, 0, -1),
    ("bytes=9-2", 200, 0, BIG - 1),
    ("bytes=0-1,5-9", 200, 0, BIG - 1),
    ("bytes=x-y", 200, 0, BIG - 1),
    ("lines=0-9", 200, 0, BIG - 1),
])
def test_range_edges(served, header, status, first, last):
    srv = served
    with connect(srv) as s:
        s.sendall(f"GET /blobs/big.bin HTTP/1.1\r\nHost: x\r\nRange: {header}\r\n\r\n".encode())
        got, headers, body = read_response(s)
    assert got == status
    assert body == srv.data[first:last + 1]
    if status == 206:
        assert headers["content-range"] == f"bytes {first}-{last}/{BIG}"
    if status == 416:
        assert headers["content-range"] == f"bytes */{BIG}"


def test_validators(served):
    srv = served
    with httpx.Client(timeout=30) as client:
        etag = client.head(f"{srv.url}/blobs/big.bin").headers["etag"]
        assert client.get(f"{srv.url}/blobs/big.bin",
                          headers={"If-None-Match": etag}).status_code == 304
        old = client.get(f"{srv.url}/blobs/big.bin",
                         headers={"Range": "bytes=0-9", "If-Range": '"old"'})
        assert old.status_code == 200 and old.content == srv.data
        same = client.get(f"{srv.url}/blobs/big.bin", headers={"Range": "bytes=0-9",
                                                                 "If-Range": etag})
        assert same.status_code == 206 and same.content == srv.data[:10]


def test_http10_and_connection_close_end_the_connection(served):
    srv = served
    for req in (b"GET /boot/small.cfg HTTP/1.0\r\n\r\n",
                b"GET /blobs/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        with connect(srv) as s:
            s.sendall(req)
            status, headers, body = read_response(s)
            assert status == 200 and body in (srv.small, srv.data)
            assert closed_by_server(s, 5)


def test_a_large_body_goes_out_corked_and_the_connection_is_uncorked_after(served):
    """TCP_CORK (nginx's tcp_nopush) holds while a large body is in flight: the head leaves with
    the first body bytes and no sendfile turn ends in a short segment. After the body it is off
    again, else the next small answer on the connection would wait for the kernel's cork timer."""
    srv = served

    def corked() -> int:
        (proto,) = list(srv.connections)
        sock = proto.transport.get_extra_info("socket")
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)

    with connect(srv) as s:
        s.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[2] == srv.small
        assert corked() == 0, "a small answer went out corked"
        s.sendall(b"GET /blobs/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        # 24 MiB do not fit in the socket buffers while the client reads nothing: in flight.
        wait_for(lambda: any(getattr(c, "sending", None) is not None for c in srv.connections),
                 "the body in flight")
        assert corked() == 1, "the body goes out uncorked"
        status, _, body = read_response(s)
        assert status == 200 and body == srv.data
        s.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[2] == srv.small
        assert corked() == 0, "the connection stayed corked after the body"
    assert srv.handed_off == []


def test_stalled_clients_are_closed_in_bounded_time(served):
    """Headers that never end (even dripping), an idle keep-alive connection, and a client that
    stops reading a large body: each closed about TIMEOUT after its last progress, while another
    client is answered meanwhile."""
    srv = served
    with contextlib.ExitStack() as stack:
        dripping = stack.enter_context(connect(srv))
        half = stack.enter_context(connect(srv))
        idle = stack.enter_context(connect(srv))
        reader = stack.enter_context(connect(srv, rcvbuf=4096))
        started = time.monotonic()
        half.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        idle.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(idle)[2] == srv.small
        reader.sendall(b"GET /blobs/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        dripping.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n")
        for _ in range(int(3 * TIMEOUT / 0.25)):  # a header byte every 0.25 s: still bounded
            with contextlib.suppress(OSError):
                dripping.sendall(b"X")
            time.sleep(0.25)
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{srv.url}/boot/small.cfg").content == srv.small
        for s in (dripping, half, idle):
            assert closed_by_server(s, TIMEOUT + 10)
        # The reader got at most what the socket buffers held, then the server gave up.
        got = 0
        reader.settimeout(0.5)
        with contextlib.suppress(OSError):
            for _ in range(1000):
                chunk = reader.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
        assert got < BIG, "the stalled reader got the whole file"
        assert time.monotonic() - started < 3 * TIMEOUT + 30


def test_loader_configs_and_the_access_log(tmp_path, caplog, monkeypatch):
    """Rendered loader configs (boot.ipxe, a node's script) come from the fast path too, HEAD
    included, and `access_log` logs each answer as uvicorn would."""
    import logging

    from tests.conftest import make_site

    site = make_site(tmp_path / "site")
    site.run("nodes", "add", "n001", "--mac", "52:54:00:aa:00:07", check=True)
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    # An earlier uvicorn.Config(access_log=False) in this process cut the logger off.
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "propagate", True)
    with running(site, log_access=True) as srv, httpx.Client(timeout=10) as client:
        main = client.get(f"{srv.url}/boot.ipxe")
        assert main.status_code == 200 and main.text.startswith("#!ipxe")
        head = client.head(f"{srv.url}/boot.ipxe")
        assert head.content == b"" and head.headers["content-length"] == str(len(main.content))
        unknown = client.get(f"{srv.url}/ipxe/52-54-00-aa-00-99.ipxe")
        assert unknown.status_code == 404
        assert srv.handed_off == []
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert lines == ['127.0.0.1 - "GET /boot.ipxe HTTP/1.1" 200',
                     '127.0.0.1 - "HEAD /boot.ipxe HTTP/1.1" 200',
                     '127.0.0.1 - "GET /ipxe/52-54-00-aa-00-99.ipxe HTTP/1.1" 404']


def test_a_client_that_shuts_its_side_after_asking_gets_its_answers(served):
    srv = served
    with connect(srv) as s:
        s.sendall(b"GET /blobs/big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        assert read_response(s)[2] == srv.data
        assert read_response(s)[2] == srv.small
        assert closed_by_server(s, 5)


@pytest.mark.parametrize("request_bytes", [
    b"GET /boot/small.cfg HTTP/1.1\nHost: x\n\n",  # bare LF
    b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",  # a body
    b"GET http://x/boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n",  # absolute form
    b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",  # obs-fold
])
def test_unusual_requests_are_left_to_the_framework(served, request_bytes):
    """What the fast path does not fully understand gets the framework's answer (as before)."""
    srv = served
    with connect(srv) as s:
        s.sendall(request_bytes)
        status, _, body = read_response(s)
    assert srv.handed_off, "answered by the fast path"
    assert (status, body) in ((200, srv.small), (400, b"Invalid HTTP request received."),
                              (404, b"Not Found"))  # Starlette's for an absolute-form target


def test_a_failure_while_answering_costs_one_connection(served, monkeypatch):
    from pxe.serve import http as serve_http

    srv = served

    def broken(*_a: object, **_k: object) -> None:
        raise OSError("disk on fire")

    with monkeypatch.context() as m:
        m.setattr(serve_http, "FileAnswer", broken)
        with connect(srv) as s:
            s.sendall(b"GET /boot/small.cfg HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_server(s, 5)
    with httpx.Client(timeout=10) as client:  # the worker goes on
        assert client.get(f"{srv.url}/boot/small.cfg").content == srv.small
