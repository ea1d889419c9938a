"""A service node's blob cache (pxe/blobcache.py) between two real `pxe-stage serve` processes on
127.0.0.1: the primary and a service node of segment east sharing one state database, and a
primary that lies (a small HTTP server answering wrong bytes)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_power_support import add_nodes
from test_run_support import add_images
from test_segments_support import serve_again as _serve
from test_segments_support import service_site as _service_site
from test_serve_support import LOOPBACK, curl_tftp, put, serve_process, wait_for

from pxe import db, run
from pxe.images import Catalog
from tests.conftest import Site, make_site


@contextlib.contextmanager
def _liar(body: bytes) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every GET with ``body`` (not what was asked)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)



def _store(site: Site) -> list[str]:
    """Every name in the service node's blob stores (hidden temp files included)."""
    cfg = site.cfg
    return sorted(p.name for root in (cfg.paths.http_root, cfg.paths.tftp_root)
                  if (root / "blobs").is_dir() for p in (root / "blobs").iterdir()
                  if not p.name.endswith(".lock"))


@pytest.mark.integration
def test_a_service_node_fetches_a_missing_blob_from_the_primary_and_verifies_it(
        site: Site, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    sha = hashlib.sha256(data).hexdigest()
    put(site.cfg.paths.http_root, f"blobs/{sha}", data)
    with _serve(site) as primary:
        east = _service_site(site, tmp_path / "east", primary.url)
        with _serve(east, "--segment", "east", http_workers=2) as service:
            got = httpx.get(f"{service.url}/blobs/{sha}", timeout=60)
            assert got.status_code == 200 and got.content == data
            # cached, in both of its roots, and served from there next time (primary gone)
            assert _store(east) == [sha, sha]
            assert (east.cfg.paths.tftp_root / "blobs" / sha).read_bytes() == data
        # a blob the primary does not have either: 404, nothing stored
        missing = "0" * 64
        with _serve(east, "--segment", "east") as service:
            assert httpx.get(f"{service.url}/blobs/{missing}", timeout=30).status_code == 404
            assert _store(east) == [sha, sha]
            # anything that is not blobs/<sha256> is never fetched
            assert httpx.get(f"{service.url}/blobs/{sha[:10]}", timeout=30).status_code == 404
    # the primary is down now: the cached copy is still served
    with _serve(east, "--segment", "east") as service:
        got = httpx.get(f"{service.url}/blobs/{sha}", headers={"Range": "bytes=0-9"}, timeout=30)
        assert got.status_code == 206 and got.content == data[:10]


@pytest.mark.integration
def test_wrong_bytes_from_the_primary_are_never_served_or_kept(site: Site, tmp_path: Path
                                                               ) -> None:
    data = b"the real kernel" * 1000
    sha = hashlib.sha256(data).hexdigest()
    with _liar(b"not the real kernel" * 1000) as url:
        east = _service_site(site, tmp_path / "east", url)
        with _serve(east, "--segment", "east") as service:
            got = httpx.get(f"{service.url}/blobs/{sha}", timeout=30)
            assert got.status_code == 404 and b"kernel" not in got.content
            assert _store(east) == []
            log = service.log.read_text()
            assert f"blob {sha}: the primary sent" in log and "thrown away" in log


@pytest.mark.integration
def test_a_blob_larger_than_the_limit_is_refused(site: Site, tmp_path: Path) -> None:
    data = os.urandom((1 << 20) + 1)
    sha = hashlib.sha256(data).hexdigest()
    put(site.cfg.paths.http_root, f"blobs/{sha}", data)
    with _serve(site) as primary:
        east = _service_site(site, tmp_path / "east", primary.url, fetch_max_mb=1)
        with _serve(east, "--segment", "east") as service:
            assert httpx.get(f"{service.url}/blobs/{sha}", timeout=30).status_code == 404
            assert _store(east) == []
            assert "more than fetch_max_mb" in service.log.read_text()


@pytest.mark.integration
def test_the_primary_never_fetches(tmp_path: Path) -> None:
    """Without a segment name a server is the primary: a missing blob is just missing, even
    with a primary_url configured."""
    site = make_site(tmp_path / "p")
    with _serve(site) as primary:
        other = _service_site(site, tmp_path / "q", primary.url)
        with _serve(other) as not_a_service_node:
            sha = hashlib.sha256(b"x").hexdigest()
            put(site.cfg.paths.http_root, f"blobs/{sha}", b"x")
            assert httpx.get(f"{not_a_service_node.url}/blobs/{sha}",
                             timeout=30).status_code == 404


@pytest.mark.integration
def test_a_run_in_the_segment_prefetches_its_blobs_for_tftp(site: Site, tmp_path: Path) -> None:
    """TFTP cannot wait for a fetch: when a node of the segment enters a run, the service node
    fetches that image's blobs (verified) and its TFTP serves them."""
    cfg = site.cfg
    add_images(cfg, tmp_path, centos5={})
    add_nodes(cfg, [{"name": "e001", "mac": "52:54:00:33:00:01"}])
    site.run("nodes", "set", "e001", "--segment", "east", check=True)
    image = Catalog(cfg).get("centos5")
    conn = db.connect(cfg.database)
    with _serve(site) as primary:
        east = _service_site(site, tmp_path / "east", primary.url, name="east",
                             heartbeat_seconds=0.2, stale_seconds=5)
        with serve_process(east, http_workers=1, tftp_workers=1) as service:  # TFTP too
            kernel = east.cfg.paths.tftp_root / "blobs" / image.kernel_sha
            assert not kernel.exists()
            req = run.request(cfg, conn, ["e001"], "centos5")
            # a driver elsewhere holds the node: this test is about the blobs only
            conn.execute("INSERT INTO run_claims VALUES (?, 'e001', 'driver/elsewhere', ?)",
                         (req.run_id, time.time() + 3600))
            wait_for(kernel.exists, "the kernel prefetched", timeout=30)
            out = tmp_path / "kernel.tftp"
            got = curl_tftp(service.tftp_port, f"blobs/{image.kernel_sha}", out)
            assert got.returncode == 0, got.stderr
            assert hashlib.sha256(out.read_bytes()).hexdigest() == image.kernel_sha
            assert "fetched" in service.log.read_text()
    run.cancel(cfg, conn, ["e001"])
    conn.close()
