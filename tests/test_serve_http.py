"""serve's HTTP boot files: a real `pxe-stage serve` on 127.0.0.1, fetched with httpx, curl and
raw sockets (Range, HEAD, ETag, traversal, the iPXE chain, zero-copy sendfile)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from test_serve_support import LOOPBACK, ServeProcess, free_port, put, serve_process, wait_for

from tests.conftest import fake_bzimage, make_site

pytestmark = pytest.mark.integration

MAC = "52:54:00:aa:00:01"
SIZE = 3 * 1024 * 1024 + 17


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[ServeProcess, object, bytes]]:
    site = make_site(tmp_path_factory.mktemp("http") / "site")
    kernel = fake_bzimage(site.root / "vmlinuz", os.urandom(200_000))
    initrd = site.root / "initrd.img"
    initrd.write_bytes(os.urandom(300_000))
    site.run("nodes", "add", "n001", "--mac", MAC, check=True)
    site.run("images", "add", "img1", "--kernel", str(kernel), "--initrd", str(initrd), check=True)
    site.run("set-boot", "n001", "--os", "img1", check=True)
    site.run("render", "--no-reload", check=True)
    http_root = site.cfg.paths.http_root
    data = os.urandom(SIZE)
    put(http_root, "data/big.bin", data)
    (site.root / "secret").write_text("top secret")
    (site.root / "secret").chmod(0o644)
    (http_root / "escape").symlink_to(site.root / "secret")
    put(http_root, "private", b"x", mode=0o600)
    with serve_process(site) as srv:
        yield srv, site, data


def raw_get(port: int, target: str) -> bytes:
    """Send exactly this request target (no client-side normalisation)."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_whole_file_with_length_and_validators(served):
    srv, _, data = served
    r = httpx.get(f"{srv.url}/data/big.bin", timeout=30)
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["content-length"] == str(SIZE)
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"] and r.headers["last-modified"]


def test_curl_downloads_the_same_bytes(served, tmp_path):
    srv, _, data = served
    out = tmp_path / "out"
    proc = subprocess.run(["curl", "-s", "-S", "--max-time", "60", "-o", str(out),
                           f"{srv.url}/data/big.bin"], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == data


@pytest.mark.parametrize("header,first,last", [
    ("bytes=0-0", 0, 0),
    ("bytes=100-199", 100, 199),
    ("bytes=1000000-", 1000000, SIZE - 1),
    ("bytes=-500", SIZE - 500, SIZE - 1),
    ("bytes=10-99999999", 10, SIZE - 1),
])
def test_single_range(served, header, first, last):
    srv, _, data = served
    r = httpx.get(f"{srv.url}/data/big.bin", headers={"Range": header}, timeout=30)
    assert r.status_code == 206
    assert r.content == data[first:last + 1]
    assert r.headers["content-length"] == str(last - first + 1)
    assert r.headers["content-range"] == f"bytes {first}-{last}/{SIZE}"


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 9}", "bytes=-0"])
def test_unsatisfiable_range(served, header):
    srv, _, _ = served
    r = httpx.get(f"{srv.url}/data/big.bin", headers={"Range": header}, timeout=30)
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{SIZE}"
    assert r.content == b""


@pytest.mark.parametrize("header", ["bytes=0-1,5-9", "items=0-5", "bytes=9-2", "bytes=x-y"])
def test_ignored_range_sends_the_whole_file(served, header):
    srv, _, data = served
    r = httpx.get(f"{srv.url}/data/big.bin", headers={"Range": header}, timeout=30)
    assert r.status_code == 200 and r.content == data


def test_if_range_with_an_old_etag_sends_the_whole_file(served):
    srv, _, data = served
    r = httpx.get(f"{srv.url}/data/big.bin", headers={"Range": "bytes=0-9", "If-Range": '"old"'},
                  timeout=30)
    assert r.status_code == 200 and r.content == data
    etag = r.headers["etag"]
    r = httpx.get(f"{srv.url}/data/big.bin", headers={"Range": "bytes=0-9", "If-Range": etag},
                  timeout=30)
    assert r.status_code == 206 and r.content == data[:10]


def test_head_has_the_length_and_no_body(served):
    srv, _, _ = served
    r = httpx.head(f"{srv.url}/data/big.bin", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-length"] == str(SIZE)
    assert r.content == b""


def test_if_none_match_gives_304(served):
    srv, _, _ = served
    etag = httpx.head(f"{srv.url}/data/big.bin", timeout=10).headers["etag"]
    r = httpx.get(f"{srv.url}/data/big.bin", headers={"If-None-Match": etag}, timeout=10)
    assert r.status_code == 304 and r.content == b""


@pytest.mark.parametrize("target", [
    "/../secret", "/../../../../etc/passwd", "/%2e%2e/secret", "/%2E%2E/%2e%2e/etc/passwd",
    "/data/..%2f..%2fsecret", "/data/%2e%2e/%2e%2e/secret", "/..%5csecret", "/data/../../secret",
    "/%00secret", "//etc/passwd",
])
def test_path_traversal_is_refused(served, target):
    srv, _, _ = served
    response = raw_get(srv.http_port, target)
    status = int(response.split(b" ", 2)[1])
    assert status in (400, 403, 404), response[:200]
    assert b"top secret" not in response and b"root:" not in response


def test_symlink_out_of_the_root_and_private_files_are_refused(served):
    srv, _, _ = served
    assert httpx.get(f"{srv.url}/escape", timeout=10).status_code == 403
    assert httpx.get(f"{srv.url}/private", timeout=10).status_code == 403
    assert httpx.get(f"{srv.url}/data", timeout=10).status_code == 404  # no listings
    assert httpx.get(f"{srv.url}/", timeout=10).status_code == 404


def test_only_get_and_head(served):
    srv, _, _ = served
    for method in ("POST", "PUT", "DELETE"):
        assert httpx.request(method, f"{srv.url}/data/big.bin", timeout=10).status_code == 405


def test_ipxe_chain_is_served(served):
    """boot.ipxe -> ipxe/<mac>.ipxe -> kernel and initrd, all from the HTTP root."""
    srv, site, _ = served
    main = httpx.get(f"{srv.url}/boot.ipxe", timeout=10)
    assert main.status_code == 200 and main.text.startswith("#!ipxe")
    assert "/ipxe/${mac:hexhyp}.ipxe" in main.text
    script = httpx.get(f"{srv.url}/ipxe/{MAC.replace(':', '-')}.ipxe", timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/plain")
    paths = re.findall(r"http://[^/\s]+/(blobs/[0-9a-f]{64})", script.text)
    assert len(paths) == 2, script.text  # kernel and initrd
    for rel in paths:
        r = httpx.get(f"{srv.url}/{rel}", timeout=30)
        assert r.status_code == 200
        assert r.content == (site.cfg.paths.http_root / rel).read_bytes()


def test_metrics_count_http(served):
    srv, _, _ = served
    before = srv.metrics()
    httpx.get(f"{srv.url}/data/big.bin", timeout=30)
    httpx.get(f"{srv.url}/missing", timeout=10)
    after = wait_for(lambda: (m := srv.metrics()) and m['dynprov_http_requests_total{code="404"}']
                     > before['dynprov_http_requests_total{code="404"}'] and m, "metrics")
    assert (after['dynprov_http_requests_total{code="200"}']
            > before['dynprov_http_requests_total{code="200"}'])
    assert after["dynprov_http_bytes_total"] - before["dynprov_http_bytes_total"] >= SIZE


@pytest.mark.unit
def test_body_goes_out_by_sendfile(site, monkeypatch):
    """The zero-copy path: our uvicorn protocol answers with os.sendfile, and the bytes match;
    a small file (<= SMALL_BODY) goes out in one plain write instead, whole or a range of it."""
    import uvicorn

    from pxe.serve import settings
    from pxe.serve.app import create_app
    from pxe.serve.http import SMALL_BODY, ZeroCopyH11Protocol

    data = os.urandom(2_000_003)
    put(site.cfg.paths.http_root, "k.bin", data)
    small = os.urandom(SMALL_BODY)
    put(site.cfg.paths.http_root, "boot/small.cfg", small)
    calls: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        calls.append(count)
        return real(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    port = free_port()
    app = create_app(site.cfg, settings.load(site.cfg))
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, http=ZeroCopyH11Protocol,
                                           lifespan="off", log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "uvicorn started")
        with httpx.Client(timeout=30) as client:
            whole = client.get(f"http://{LOOPBACK}:{port}/k.bin")
            part = client.get(f"http://{LOOPBACK}:{port}/k.bin",
                              headers={"Range": "bytes=1000-1999999"})
        assert whole.content == data and part.content == data[1000:2000000]
        assert calls, "os.sendfile was not used"
        big_calls = len(calls)
        with httpx.Client(timeout=30) as client:
            s_whole = client.get(f"http://{LOOPBACK}:{port}/boot/small.cfg")
            s_part = client.get(f"http://{LOOPBACK}:{port}/boot/small.cfg",
                                headers={"Range": "bytes=100-199"})
            s_head = client.head(f"http://{LOOPBACK}:{port}/boot/small.cfg")
        assert s_whole.content == small and s_whole.headers["content-length"] == str(SMALL_BODY)
        assert s_part.status_code == 206 and s_part.content == small[100:200]
        assert s_head.content == b"" and s_head.headers["content-length"] == str(SMALL_BODY)
        assert len(calls) == big_calls, "a small file went through sendfile"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.mark.unit
def test_fallback_without_the_extension(site):
    """Under a server that offers no zero-copy (httpx's in-process transport) files still work."""
    import asyncio

    from pxe.serve import settings
    from pxe.serve.app import create_app

    data = os.urandom(3_000_001)
    put(site.cfg.paths.http_root, "k.bin", data)
    app = create_app(site.cfg, settings.load(site.cfg))

    async def fetch() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            return (await client.get("/k.bin"),
                    await client.get("/k.bin", headers={"Range": "bytes=-10"}))

    whole, tail = asyncio.run(fetch())
    assert whole.content == data and whole.headers["content-length"] == str(len(data))
    assert tail.status_code == 206 and tail.content == data[-10:]


def test_client_gone_mid_download_does_not_hurt_the_server(served):
    srv, _, data = served
    for _ in range(5):
        with contextlib.closing(socket.create_connection((LOOPBACK, srv.http_port), 10)) as s:
            s.sendall(b"GET /data/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(1000)
        time.sleep(0.05)
    assert httpx.get(f"{srv.url}/data/big.bin", timeout=30).content == data
    assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200
