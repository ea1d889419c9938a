"""Heartbeats of the boot servers and drivers in the database, and the watch over them.

Every `pxe-stage serve` and every run driver records a ``servers`` row and refreshes its
heartbeat every ``[segment] heartbeat_seconds``. Each serve also watches the others (watch()):
when a segment's boot server has been silent longer than ``stale_seconds`` (or stopped), the
nodes of that segment that are in a run are shown Down (node state ``failed``) with the reason,
so the scheduler hears about it long before the run's timeout; their run steps are left as they
are (the deadline still applies). When a serve of the segment beats again, those nodes show
their run step again and the segment's driver carries on (the restarted serve starts one).
Other segments are untouched: a segment is judged only by its own servers.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time

from pxe import db, states

log = logging.getLogger("dynprov.servers")

SERVE, DRIVER = "serve", "driver"


def serve_name(segment: str) -> str:
    return f"serve/{socket.gethostname()}/{segment or '-'}/{os.getpid()}"


def beat(conn: sqlite3.Connection, name: str, role: str, segment: str,
         now: float | None = None) -> None:
    """Record that ``name`` is alive (one small upsert)."""
    now = time.time() if now is None else now
    with db.transaction(conn, bookkeeping=True):  # every few seconds: keep the caches warm
        conn.execute(
            "INSERT INTO servers(name, role, segment, host, pid, started, heartbeat, stopped) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (name) DO UPDATE SET "
            "heartbeat = excluded.heartbeat, stopped = NULL",
            (name, role, segment, socket.gethostname(), os.getpid(), now, now))


def stopped(conn: sqlite3.Connection, name: str, now: float | None = None) -> None:
    """A clean stop: the row stays (history), marked stopped."""
    now = time.time() if now is None else now
    with db.transaction(conn):
        conn.execute("UPDATE servers SET stopped = ? WHERE name = ?", (now, name))


def listing(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT name, role, segment, host, pid, started, heartbeat, stopped "
                        "FROM servers ORDER BY segment, role, name").fetchall()


def silent_segments(conn: sqlite3.Connection, stale: float, now: float | None = None
                    ) -> dict[str, float]:
    """Segments that had a serve but have none alive now -> when the last one was last heard."""
    now = time.time() if now is None else now
    out: dict[str, float] = {}
    rows = conn.execute("SELECT segment, MAX(heartbeat), "
                        "MAX(CASE WHEN stopped IS NULL AND heartbeat >= ? THEN 1 ELSE 0 END) "
                        "FROM servers WHERE role = ? GROUP BY segment", (now - stale, SERVE))
    for segment, last, alive in rows:
        if not alive:
            out[segment] = float(last)
    return out


def _segment_sql() -> str:
    return "COALESCE((SELECT s.segment FROM node_segments s WHERE s.node = rn.node), '')"


def _active_in(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Active run nodes with their segment and the node's shown state."""
    return conn.execute(
        f"SELECT rn.run_id, rn.node, rn.state, n.state AS shown, {_segment_sql()} AS segment "
        "FROM run_nodes rn JOIN runs r ON r.id = rn.run_id JOIN nodes n ON n.name = rn.node "
        f"WHERE r.finished IS NULL AND rn.state IN ({states.ACTIVE_SQL}) "
        "ORDER BY rn.node").fetchall()


def down_reason(segment: str, since: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return (f"boot server of segment {segment or '(primary)'} silent since {when}: "
            "its nodes cannot boot until it is back")


def watch(conn: sqlite3.Connection, stale: float, now: float | None = None
          ) -> tuple[list[str], list[str]]:
    """Show the run nodes of silent segments Down, and those of segments back alive in their
    run step again. Returns (nodes marked down, nodes restored)."""
    now = time.time() if now is None else now
    down: list[str] = []
    back: list[str] = []
    with db.transaction(conn):
        silent = silent_segments(conn, stale, now)
        for row in _active_in(conn):
            segment, node = row["segment"], row["node"]
            if segment in silent and row["shown"] == row["state"]:
                reason = down_reason(segment, silent[segment])
                states.set_node(conn, node, now, state=states.FAILED, state_reason=reason)
                db.log_event(conn, "segment-down", node, reason, row["run_id"])
                down.append(node)
            elif segment not in silent and row["shown"] == states.FAILED:
                # Only watch() shows an active run node as failed (transition() mirrors steps).
                reason = f"run {row['run_id']}: {row['state']} (segment {segment or '(primary)'}"\
                         " back)"
                states.set_node(conn, node, now, state=row["state"], state_reason=reason)
                db.log_event(conn, "segment-up", node, reason, row["run_id"])
                back.append(node)
    if down:
        log.warning("nodes of silent segments shown down: %s", ",".join(down))
    if back:
        log.info("segments back: %s show their run step again", ",".join(back))
    return down, back


def waiting(conn: sqlite3.Connection, segment: str, now: float | None = None) -> bool:
    """Does the segment have run nodes no live driver holds (its driver died, or none ran)?"""
    now = time.time() if now is None else now
    row = conn.execute(
        "SELECT 1 FROM run_nodes rn JOIN runs r ON r.id = rn.run_id "
        f"WHERE r.finished IS NULL AND rn.state IN ({states.ACTIVE_SQL}) "
        f"AND {_segment_sql()} = ? AND NOT EXISTS (SELECT 1 FROM run_claims c "
        "WHERE c.run_id = rn.run_id AND c.node = rn.node AND c.expires >= ?) LIMIT 1",
        (segment, now)).fetchone()
    return row is not None
