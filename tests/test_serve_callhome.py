"""Call-home: POST /report to a real `pxe-stage serve` (curl, busybox wget as the initramfs
sends it), and the follow-up hand-off to pxe.run in-process."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator

import httpx
import pytest
from test_serve_support import ServeProcess, serve_process, wait_for

from pxe import db
from pxe.inventory import Inventory
from tests.conftest import fake_bzimage, make_site

pytestmark = pytest.mark.integration

NODES = [f"n00{i}" for i in range(1, 9)]


def _prepare(site) -> None:
    kernel = fake_bzimage(site.root / "vmlinuz", os.urandom(1000))
    for i, name in enumerate(NODES, start=1):
        site.run("nodes", "add", name, "--mac", f"52:54:00:aa:01:{i:02x}", check=True)
    site.run("images", "add", "img1", "--kernel", str(kernel), check=True)
    site.run("set-boot", "n[001-008]", "--os", "img1", check=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[ServeProcess, object]]:
    site = make_site(tmp_path_factory.mktemp("callhome") / "site")
    _prepare(site)
    with serve_process(site) as srv:
        yield srv, site


def token(site, node: str) -> str | None:
    return Inventory(site.cfg).get(node).boot_token


def node_row(site, node: str):
    conn = db.connect(site.cfg.database)
    try:
        return conn.execute("SELECT state, state_reason, current_os, boot_token, boot_target FROM nodes "
                            "WHERE name = ?", (node,)).fetchone()
    finally:
        conn.close()


def events(site, kind: str, node: str) -> list[str]:
    conn = db.connect(site.cfg.database)
    try:
        return [r[0] for r in conn.execute("SELECT detail FROM events WHERE kind = ? AND node = ?",
                                           (kind, node))]
    finally:
        conn.close()


def post(srv: ServeProcess, **fields: str) -> httpx.Response:
    return httpx.post(f"{srv.url}/report", data=fields, timeout=30)


def test_booting_then_ready(served):
    srv, site = served
    tok = token(site, "n001")
    r = post(srv, node="n001", token=tok, kind="booting", detail="initramfs")
    assert (r.status_code, r.text) == (200, "ok")
    assert node_row(site, "n001")["state"] == "booting"
    assert post(srv, node="n001", token=tok, kind="progress", detail="50%").status_code == 200
    assert post(srv, node="n001", token=tok, kind="ready").status_code == 200
    row = node_row(site, "n001")
    assert (row["state"], row["current_os"], row["boot_token"]) == ("ready", "img1", None)


def test_reused_token_is_refused(served):
    srv, site = served
    tok = token(site, "n002")
    assert post(srv, node="n002", token=tok, kind="ready").status_code == 200
    r = post(srv, node="n002", token=tok, kind="ready")
    assert r.status_code == 403
    assert any("token already used" in d for d in events(site, "report-refused", "n002"))


def test_wrong_token_is_refused_and_logged(served):
    srv, site = served
    r = post(srv, node="n003", token="not-the-token", kind="failed", detail="x")
    assert r.status_code == 403
    assert node_row(site, "n003")["state"] != "failed"
    assert any("wrong token" in d for d in events(site, "report-refused", "n003"))
    other = token(site, "n004")  # a real token, but another node's
    assert post(srv, node="n003", token=other, kind="ready").status_code == 403


@pytest.mark.parametrize("fields", [{}, {"token": ""}])
def test_missing_token_is_refused(served, fields):
    srv, site = served
    r = post(srv, node="n005", kind="booting", **fields)
    assert r.status_code == 403
    assert any("missing token" in d for d in events(site, "report-refused", "n005"))


def test_unknown_node(served):
    srv, _ = served
    assert post(srv, node="n999", token="abc", kind="booting").status_code == 404


@pytest.mark.parametrize("body", [
    "token=a&kind=booting",  # no node
    "node=n006&token=a",  # no kind
    "node=n006&token=a&kind=rebooting",  # unknown kind
    "node=n0%2F..%2Fx&token=a&kind=booting",  # not a node name
    "node=n006&node=n007&token=a&kind=booting",  # a field twice
    "node=n006&token=a&kind=booting&admin=1",  # unknown field
    "",
])
def test_bad_requests(served, body):
    srv, site = served
    r = httpx.post(f"{srv.url}/report", content=body.encode(), timeout=10,
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400
    assert node_row(site, "n006")["state"] == "unknown"


def test_not_utf8_and_too_large(served):
    srv, _ = served
    assert httpx.post(f"{srv.url}/report", content=b"node=\xff\xfe&kind=booting",
                      timeout=10).status_code == 400
    big = b"node=n006&kind=booting&detail=" + b"x" * 20000
    assert httpx.post(f"{srv.url}/report", content=big, timeout=10).status_code == 413


def test_only_post(served):
    srv, _ = served
    r = httpx.get(f"{srv.url}/report?node=n006&token=a&kind=ready", timeout=10)
    assert r.status_code in (404, 405)  # GET falls through to the (empty) file named report


def test_failed_with_reason(served):
    srv, site = served
    r = post(srv, node="n007", token=token(site, "n007"), kind="failed",
             detail="no disk found")
    assert r.status_code == 200
    row = node_row(site, "n007")
    assert (row["state"], row["state_reason"]) == ("failed", "no disk found")


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox not installed")
def test_busybox_wget_as_the_initramfs_sends_it(served):
    srv, site = served
    tok = token(site, "n008")
    proc = subprocess.run(["busybox", "timeout", "20", "busybox", "wget", "-q", "-O", "-",
                           "--post-data", f"node=n008&token={tok}&kind=booting&detail=udhcpc ok",
                           f"{srv.url}/report"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok"
    assert node_row(site, "n008")["state_reason"] == "udhcpc ok"


def test_reports_are_counted(served):
    srv, _ = served
    post(srv, node="n999", token="x", kind="ready")
    m = wait_for(lambda: (m := srv.metrics())
                 and m['dynprov_reports_total{kind="ready",result="unknown_node"}'] >= 1 and m,
                 "report metrics")
    assert m['dynprov_reports_total{kind="booting",result="ok"}'] >= 1
    assert m['dynprov_reports_total{kind="invalid",result="bad_request"}'] >= 1


# -- the follow-up hand-off (in-process app) ------------------------------------------------------
def _report_in_process(site, fields: dict[str, str]) -> httpx.Response:
    from pxe.serve import settings
    from pxe.serve.app import create_app

    app = create_app(site.cfg, settings.load(site.cfg))

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            return await client.post("/report", data=fields)

    return asyncio.run(go())


@pytest.mark.unit
def test_notify_gets_the_outcome(site, monkeypatch):
    _prepare(site)
    seen = []
    fake = types.ModuleType("pxe.run")
    fake.notify = lambda cfg, outcome: seen.append((cfg.path, outcome))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pxe.run", fake)
    r = _report_in_process(site, {"node": "n001", "token": token(site, "n001"), "kind": "ready"})
    assert r.status_code == 200
    assert len(seen) == 1
    path, outcome = seen[0]
    assert path == site.config_path
    assert (outcome.node, outcome.kind, outcome.state, outcome.image) == ("n001", "ready",
                                                                         "ready", "img1")


@pytest.mark.unit
def test_the_server_only_records_the_driver_acts(site):
    """A "ready" outside any run: recorded (state, OS, token used), but the server sets no
    boot target and starts no driver (no run and nothing of a run to act on)."""
    from pxe import run

    _prepare(site)
    r = _report_in_process(site, {"node": "n001", "token": token(site, "n001"), "kind": "ready"})
    assert r.status_code == 200
    row = node_row(site, "n001")
    assert (row["state"], row["current_os"], row["boot_token"]) == ("ready", "img1", None)
    assert row["boot_target"] == "os"  # left as it was: acting is the driver's job
    assert not run.driver_running(site.cfg)
    conn = db.connect(site.cfg.database)
    try:
        # (set-boot logs one event per command, with no node: every event counts)
        kinds = [k for (k, node) in conn.execute("SELECT kind, node FROM events ORDER BY id")
                 if node in ("n001", None)]
        boot_set = conn.execute("SELECT boot_set FROM nodes WHERE name = 'n001'").fetchone()[0]
        reported = conn.execute("SELECT MAX(ts) FROM events WHERE kind = 'report-ready'"
                                ).fetchone()[0]
    finally:
        conn.close()
    assert kinds[-1] == "report-ready" and "set-boot" not in kinds[kinds.index("report-ready"):]
    assert boot_set < reported


@pytest.mark.unit
def test_failing_follow_up_is_logged_and_the_report_stands(site, monkeypatch, caplog):
    _prepare(site)
    fake = types.ModuleType("pxe.run")

    def boom(cfg, outcome):
        raise RuntimeError("power driver exploded")

    fake.notify = boom  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pxe.run", fake)
    with caplog.at_level(logging.ERROR, logger="dynprov.serve.callhome"):
        r = _report_in_process(site, {"node": "n001", "token": token(site, "n001"),
                                      "kind": "ready"})
    assert r.status_code == 200
    assert "power driver exploded" in caplog.text
    assert node_row(site, "n001")["state"] == "ready"
