"""Node call-home reports (booting, progress, ready, failed) -> the state database.

The provisioning initramfs (and the agent inside a booted image) report here through the
server's call-home endpoint. Each report must carry the one-time token issued by set-boot;
the final report (ready/failed) consumes it, so a replay is refused.
"""

from __future__ import annotations

import hmac
import sqlite3
import time
from dataclasses import dataclass

from pxe import db
from pxe.errors import DynprovError, NotFound

KINDS = ("booting", "progress", "installed", "ready", "failed")
FINAL = ("ready", "failed")


class ReportRefused(DynprovError):
    """A report with a missing, wrong or already used token."""


@dataclass(frozen=True)
class Outcome:
    node: str
    kind: str
    state: str
    run_id: int | None
    image: str | None


class _Refusal(Exception):
    def __init__(self, node: str | None, detail: str, error: DynprovError):
        self.node, self.detail, self.error = node, detail, error


def record_report(conn: sqlite3.Connection, node: str, token: str | None, kind: str,
                  detail: str = "") -> Outcome:
    """Check the token and record the report atomically; returns what changed.

    A refusal (unknown node; missing, wrong or used token) is logged as a 'report-refused'
    event in a transaction of its own, since the report's transaction is rolled back."""
    try:
        return _record(conn, node, token, kind, detail)
    except _Refusal as refusal:
        with db.transaction(conn):
            db.log_event(conn, "report-refused", refusal.node, refusal.detail)
        raise refusal.error from None


def _record(conn: sqlite3.Connection, node: str, token: str | None, kind: str,
            detail: str) -> Outcome:
    if kind not in KINDS:
        raise DynprovError(f"unknown report kind {kind!r} (expected {', '.join(KINDS)})")
    detail = detail.replace("\n", " ").strip()[:500]
    with db.transaction(conn):
        row = conn.execute("SELECT boot_token, desired_os, state FROM nodes WHERE name = ?",
                           (node,)).fetchone()
        if row is None:
            raise _Refusal(None, f"unknown node {node!r}", NotFound(f"unknown node {node!r}"))
        expected = row["boot_token"]
        if not token or not expected or not hmac.compare_digest(token, expected):
            why = "missing token" if not token else (
                "token already used" if not expected else "wrong token")
            raise _Refusal(node, f"{kind}: {why}",
                           ReportRefused(f"report from {node} refused: {why}"))
        now = time.time()
        run = conn.execute(
            "SELECT run_id FROM run_nodes WHERE node = ? AND state NOT IN "
            "('ready', 'failed', 'timed out', 'cancelled') ORDER BY run_id DESC LIMIT 1",
            (node,)).fetchone()
        run_id = run[0] if run else None
        image = row["desired_os"]
        state = row["state"]
        if kind == "booting":
            state = "booting"
            conn.execute("UPDATE nodes SET state = 'booting', state_reason = ?, updated = ? "
                         "WHERE name = ?", (detail, now, node))
        elif kind in ("progress", "installed"):
            conn.execute("UPDATE nodes SET state_reason = ?, updated = ? WHERE name = ?",
                         (f"{kind}: {detail}" if detail else kind, now, node))
        elif kind == "ready":
            state = "ready"
            from pxe.power import agent

            agent.adopt(conn, node, token, now)  # the token lives on as the image agent's
            conn.execute("UPDATE nodes SET state = 'ready', state_reason = '', current_os = ?, "
                         "used = 0, boot_token = NULL, updated = ? WHERE name = ?",
                         (image, now, node))
        elif kind == "failed":
            state = "failed"
            conn.execute("UPDATE nodes SET state = 'failed', state_reason = ?, "
                         "boot_token = NULL, updated = ? WHERE name = ?",
                         (detail or "failed", now, node))
        if run_id is not None and kind in ("booting", "ready", "failed"):
            conn.execute("UPDATE run_nodes SET state = ?, reason = ?, updated = ? "
                         "WHERE run_id = ? AND node = ?",
                         (state, detail if kind == "failed" else "", now, run_id, node))
        db.log_event(conn, f"report-{kind}", node, detail, run_id)
    return Outcome(node=node, kind=kind, state=state, run_id=run_id, image=image)
