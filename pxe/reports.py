"""Node call-home reports (booting, progress, ready, failed) -> the state database.

The provisioning initramfs (and the agent inside a booted image) report here through the
server's call-home endpoint. Each report must carry the one-time token issued by set-boot;
the final report (ready/failed) consumes it, so a replay is refused.

This module only records (through pxe.states, the one writer of run states): it never renders a
boot file nor touches power. What a report calls for (a stateful node's next boot from its disk,
the safe default after ready/failed) is done by the run driver (pxe.run), which owns power.
"""

from __future__ import annotations

import hmac
import sqlite3
import time
from dataclasses import dataclass

from pxe import db, states
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
        # One read for the node, its active run and the version a ``ready`` booted
        # (pxe.imageversions.booted_version's rule): each round trip counts on PostgreSQL.
        row = conn.execute(
            "SELECT n.boot_token, n.desired_os, n.state, rn.run_id, "
            "COALESCE(rn.image_version, (SELECT i.version FROM images i "
            "WHERE i.label = n.desired_os)) AS booted "
            "FROM nodes n LEFT JOIN run_nodes rn ON rn.run_id = (SELECT MAX(a.run_id) "
            f"FROM run_nodes a WHERE a.node = n.name AND a.state IN ({states.ACTIVE_SQL})) "
            "AND rn.node = n.name WHERE n.name = ?", (node,)).fetchone()
        if row is None:
            raise _Refusal(None, f"unknown node {node!r}", NotFound(f"unknown node {node!r}"))
        expected = row["boot_token"]
        if not token or not expected or not hmac.compare_digest(token, expected):
            why = "missing token" if not token else (
                "token already used" if not expected else "wrong token")
            raise _Refusal(node, f"{kind}: {why}",
                           ReportRefused(f"report from {node} refused: {why}"))
        now = time.time()
        run_id = row["run_id"]
        image = row["desired_os"]
        state = states.REPORT_STEP.get(kind, row["state"])
        fields: dict[str, object] = {}
        if kind == "booting":
            fields = {"state_reason": detail}
        elif kind in ("progress", "installed"):
            fields = {"state_reason": f"{kind}: {detail}" if detail else kind}
        elif kind == "ready":
            from pxe.power import agent

            agent.adopt(conn, node, token, now)  # the token lives on as the image agent's
            booted = row["booted"]
            fields = {"state_reason": "", "current_os": image, "used": 0, "boot_token": None,
                      "current_version": int(booted) if booted is not None else None}
        elif kind == "failed":
            fields = {"state_reason": detail or "failed", "boot_token": None}
        moved = False
        if run_id is not None and kind in states.REPORT_STEP:
            moved = states.transition(
                conn, run_id, node, state, detail if kind == "failed" else "", now,
                node_fields=fields, event=f"report-{kind}", event_detail=detail)
        if not moved:
            if run_id is None:
                # Outside a run: record on the node. A late "ready" after a timeout is
                # believed (a timed-out node keeps its token).
                if kind in ("booting", "ready", "failed"):
                    fields["state"] = state
                states.set_node(conn, node, now, **fields)
            else:  # a step the run node is already past (a repeated report): the log only
                state = row["state"]
            db.log_event(conn, f"report-{kind}", node, detail, run_id)
    return Outcome(node=node, kind=kind, state=state, run_id=run_id, image=image)
