"""The status page: nodes with OS, state, pool and last event; images; pools; live progress of
running provisioning. A static page (templates/web/status.html.j2) and a small script
(templates/web/status.js) that polls GET /api/v1/status; data are only ever inserted as text.

Embeddable: ``?embed=1`` drops the page header; ``[api] frame_ancestors`` lists the portals
that may frame it (Content-Security-Policy frame-ancestors). Login: with ``[api]
public_status`` the JSON is readable without credentials; otherwise the page asks for a user
name and password once and keeps a short-lived bearer token for the tab (sessionStorage).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from pxe import pools

WEB_DIR = "web"
POLL_SECONDS = 5


def status(conn: sqlite3.Connection, scheduler_pool: str) -> dict[str, Any]:
    """One consistent snapshot (a read transaction) of what the page shows."""
    now = time.time()
    conn.execute("BEGIN")
    try:
        last = {r[0]: {"ts": r[1], "kind": r[2], "detail": r[3]} for r in conn.execute(
            "SELECT e.node, e.ts, e.kind, e.detail FROM events e JOIN "
            "(SELECT node, MAX(id) AS id FROM events WHERE node IS NOT NULL GROUP BY node) m "
            "ON e.id = m.id")}
        nodes = [{"name": r[0], "pool": r[1], "os": r[2], "desired_os": r[3], "state": r[4],
                  "reason": r[5], "arch": r[6], "updated": r[7], "boot_set": r[8],
                  "last_event": _later(last.get(r[0]), r[8], r[9], r[3])}
                 for r in conn.execute("SELECT name, pool, current_os, desired_os, state, "
                                       "state_reason, arch, updated, boot_set, boot_target "
                                       "FROM nodes ORDER BY name")]
        images = [{"label": r[0], "os_name": r[1], "arch": r[2], "mode": r[3]}
                  for r in conn.execute("SELECT label, os_name, arch, mode FROM images "
                                        "ORDER BY label")]
        counts = dict(conn.execute("SELECT pool, COUNT(*) FROM nodes GROUP BY pool").fetchall())
        pool_rows = [{"name": r[0], "nodes": counts.get(r[0], 0),
                      "scheduler": pools.is_usable_for_scheduler(scheduler_pool, r[0])}
                     for r in conn.execute("SELECT name FROM pools ORDER BY name")]
        runs = active_runs(conn, now)
    finally:
        conn.execute("COMMIT")
    return {"generated": now, "nodes": nodes, "images": images, "pools": pool_rows,
            "runs": runs}


def _later(event: dict[str, Any] | None, boot_set: float | None, boot_target: str,
           desired_os: str | None) -> dict[str, Any] | None:
    """The node's last event, or its last set-boot when that came after: set-boot records one
    event per command (node NULL) and each node's time in ``nodes.boot_set``."""
    if boot_set is None or (event is not None and event["ts"] > boot_set):
        return event
    return {"ts": boot_set, "kind": "set-boot",
            "detail": desired_os if boot_target == "os" else "local"}


def active_runs(conn: sqlite3.Connection, now: float | None = None,
                run_id: int | None = None) -> list[dict[str, Any]]:
    """Unfinished runs, oldest first (or run ``run_id``) with each node's step and deadline
    (pxe.provision.run_rows: a node past its deadline shows as timed out)."""
    from pxe import provision

    rows = provision.run_rows(conn, run_id=run_id, active=run_id is None, now=now)
    return rows[::-1]


def page(request: Request) -> Response:
    from pxe import render

    env = request.app.state.jinja
    if env is None:  # site overrides in [paths] templates_dir apply here too
        env = request.app.state.jinja = render.template_env(request.app.state.cfg, autoescape=True)
    embed = request.query_params.get("embed", "") in ("1", "true", "yes")
    html = env.get_template(f"{WEB_DIR}/status.html.j2").render(
        embed=embed, poll_seconds=POLL_SECONDS, public=request.app.state.settings.public_status,
        site=request.app.state.cfg.network.server)
    return HTMLResponse(html, headers=page_headers(request))


def script(request: Request) -> Response:
    from pxe import render

    source = render.find_template(request.app.state.cfg, f"{WEB_DIR}/status.js")
    text = render.read_template(source)
    return Response(text, media_type="text/javascript; charset=utf-8",
                    headers={"cache-control": "no-cache"})


def page_headers(request: Request) -> dict[str, str]:
    ancestors = " ".join(request.app.state.settings.frame_ancestors)
    return {"content-security-policy":
            f"default-src 'none'; script-src 'self'; connect-src 'self'; "
            f"style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; "
            f"form-action 'none'; frame-ancestors {ancestors}",
            "cache-control": "no-cache"}
