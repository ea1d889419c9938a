"""The status page in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright with executable_path - no browser download): login, the tables, live run progress,
free text shown as text (never HTML), and embedding in a portal's frame."""

from __future__ import annotations

import shutil
import time

import pytest
from test_api_support import PASSWORD, api_site, needs_root, running_server, unix_accounts

from pxe import db

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
XSS = '<img src=x onerror="document.title=\'pwned\'">'

pytestmark = [pytest.mark.integration, needs_root,
              pytest.mark.skipif(not shutil.which("chromium"),
                                 reason="Debian's chromium is not installed (tools/install-deps)")]


@pytest.fixture(scope="module")
def accounts():
    with unix_accounts(("browser", "outsider")) as acc:
        yield acc


@pytest.fixture(scope="module")
def server(tmp_path_factory, accounts):
    site = api_site(tmp_path_factory.mktemp("web") / "site", accounts,
                    frame_ancestors=["'self'", "https://portal.example"])
    _populate(site)
    with running_server(site) as srv:
        yield srv


def _populate(site) -> None:
    from pxe.inventory import Inventory, build

    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": f"n{i:03d}", "macs": f"52:54:00:00:01:{i:02x}"})
                        for i in range(1, 5)])
    conn = db.connect(cfg.database)
    now = time.time()
    with db.transaction(conn):
        conn.execute("INSERT INTO images(label, os_name, kernel_sha, created) "
                     "VALUES ('centos7', 'CentOS-7', 'aa', ?)", (now,))
        conn.execute("INSERT INTO runs(label, mode, created, state) "
                     "VALUES ('centos7', 'ondemand', ?, 'running')", (now,))
        run_id = conn.execute("SELECT MAX(id) FROM runs").fetchone()[0]
        for node, step in (("n001", "ready"), ("n002", "booting"), ("n003", "requested")):
            conn.execute("INSERT INTO run_nodes(run_id, node, state, deadline, updated) "
                         "VALUES (?, ?, ?, ?, ?)", (run_id, node, step, now + 3600, now))
        conn.execute("UPDATE nodes SET state = 'failed', state_reason = ? WHERE name = 'n004'",
                     (XSS,))
        db.log_event(conn, "report", node="n004", detail=XSS)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _context(browser, server):
    """A fresh context: our self-signed certificate accepted for it, CSP bypassed so that
    Playwright's own waiting code may run (the page's CSP is checked from its headers below;
    with it bypassed, the text-not-HTML check is stricter, not weaker), and every request that
    is not for our server on 127.0.0.1 refused."""
    context = browser.new_context(ignore_https_errors=True, bypass_csp=True)
    context.route("**/*", lambda route: route.continue_()
                  if route.request.url.startswith(server.url) else route.abort())
    return context


def test_login_then_tables_and_progress(browser, server, accounts):
    context = _context(browser, server)
    page = context.new_page()
    try:
        page.goto(f"{server.url}/status", timeout=30000)
        page.wait_for_selector("#login:not([hidden])", timeout=15000)
        page.fill("#user", accounts.user("browser"))
        page.fill("#password", "wrong-password")
        page.click("#login-button")
        page.wait_for_function(
            "document.getElementById('message').textContent.includes('wrong')", timeout=15000)
        page.fill("#password", PASSWORD)
        page.click("#login-button")
        page.wait_for_selector("body[data-loaded=true]", timeout=15000)
        rows = page.locator("#nodes tbody tr")
        assert rows.count() == 4
        assert page.locator("#node-count").text_content() == "4"
        assert page.locator("#images tbody tr td").first.text_content() == "centos7"
        assert page.locator("#pools tbody tr td").first.text_content() == "hpc"
        run = page.locator("#runs tbody tr").first.text_content() or ""
        assert "centos7" in run and "1/3" in run and "booting 1" in run
        # Free text from a node is shown as text, never run as HTML.
        failed = page.locator("tr[data-node=n004]").text_content() or ""
        assert XSS in failed
        assert page.locator("#nodes img").count() == 0
        assert page.title() != "pwned"
        page.screenshot(path=str(server.site.root / "status.png"))
        # The token lives in this tab's session storage; a reload needs no new login.
        page.reload()
        page.wait_for_selector("body[data-loaded=true]", timeout=15000)
        assert page.locator("#login").is_hidden()
    finally:
        context.close()


def test_live_update(browser, server, accounts):
    context = _context(browser, server)
    page = context.new_page()
    try:
        page.goto(f"{server.url}/status?embed=1", timeout=30000)
        page.wait_for_selector("#login:not([hidden])", timeout=15000)
        assert page.locator("header").is_hidden()  # embedded: no page header
        page.fill("#user", accounts.user("outsider"))
        page.fill("#password", PASSWORD)
        page.click("#login-button")
        page.wait_for_selector("body[data-loaded=true]", timeout=15000)
        conn = db.connect(server.site.cfg.database)
        with db.transaction(conn):
            conn.execute("UPDATE nodes SET state = 'ready', current_os = 'centos7' "
                         "WHERE name = 'n002'")
        page.wait_for_function(
            "(document.querySelector('tr[data-node=n002]') || {}).textContent"
            "?.includes('ready')", timeout=30000)  # the page polls every 5 s
        assert "centos7" in (page.locator("tr[data-node=n002]").text_content() or "")
    finally:
        context.close()


def test_embedding_is_limited_to_the_listed_portals(server):
    with server.client() as c:
        csp = c.get("/status").headers["content-security-policy"]
    assert "frame-ancestors 'self' https://portal.example" in csp
    assert "script-src 'self'" in csp and "unsafe-eval" not in csp
