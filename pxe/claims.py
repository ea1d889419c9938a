"""Run-node claims: drivers on several servers share the runs through the database, never a file.

A driver drives a run node (sets its boot, powers it, acts on its reports) only while it holds
that node's claim: a ``run_claims`` row naming the driver with a lease (``expires``) it renews
while it lives. A claim is taken by one conditional upsert, which both engines make atomic:
the row is written only if nobody holds it, the lease ran out, or it is ours already - a second
driver racing for the same node gets no row back and leaves it alone. On SQLite the caller's
``BEGIN IMMEDIATE`` serialises the writers; on PostgreSQL the candidates are first locked with
``SELECT ... FOR UPDATE SKIP LOCKED``, so racing drivers split the nodes between them instead of
queueing on each other's rows. A driver that dies stops renewing: its lease runs out and the next
driver of the segment takes its nodes over.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable

from pxe import db


def driver_name(segment: str) -> str:
    """A name unique to this driver process (also its ``servers`` row): who holds a claim."""
    return f"driver/{socket.gethostname()}/{segment or '-'}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def claim(conn: sqlite3.Connection, driver: str, keys: Iterable[tuple[int, str]],
          lease: float, now: float | None = None) -> set[tuple[int, str]]:
    """Try to claim the run nodes ``keys`` ((run_id, node)) for ``lease`` seconds; returns the
    ones this driver holds now (newly taken or renewed). One transaction."""
    keys = sorted(set(keys))
    if not keys:
        return set()
    now = time.time() if now is None else now
    held: set[tuple[int, str]] = set()
    # Every driver loop renews its claims here: leases are bookkeeping, no report shows them.
    with db.transaction(conn, bookkeeping=True):
        if db.is_postgresql(conn):  # lock what nobody else is locking; skip the rest this round
            free = set()
            for run_id, node in keys:
                row = conn.execute(
                    "SELECT run_id, node FROM run_nodes WHERE run_id = ? AND node = ? "
                    "FOR UPDATE SKIP LOCKED", (run_id, node)).fetchone()
                if row is not None:
                    free.add((run_id, node))
            keys = [k for k in keys if k in free]
        for run_id, node in keys:
            cur = conn.execute(
                "INSERT INTO run_claims(run_id, node, driver, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_id, node) DO UPDATE SET driver = excluded.driver, "
                "expires = excluded.expires "
                "WHERE run_claims.driver = excluded.driver OR run_claims.expires < ?",
                (run_id, node, driver, now + lease, now))
            if cur.rowcount:
                held.add((run_id, node))
    return held


def renew(conn: sqlite3.Connection, driver: str, lease: float, now: float | None = None) -> int:
    """Extend every lease this driver holds; drop its claims of nodes whose run step is final.
    Returns how many it still holds."""
    now = time.time() if now is None else now
    with db.transaction(conn, bookkeeping=True):  # every heartbeat: keep the caches warm
        conn.execute("DELETE FROM run_claims WHERE driver = ? AND NOT EXISTS (SELECT 1 FROM "
                     "run_nodes rn WHERE rn.run_id = run_claims.run_id AND rn.node = "
                     f"run_claims.node AND rn.state IN ({_active_sql()}))", (driver,))
        cur = conn.execute("UPDATE run_claims SET expires = ? WHERE driver = ?",
                           (now + lease, driver))
        return cur.rowcount


def release(conn: sqlite3.Connection, driver: str) -> None:
    """A driver that stops cleanly gives its claims back at once (no lease to wait out)."""
    with db.transaction(conn):
        conn.execute("DELETE FROM run_claims WHERE driver = ?", (driver,))


def holders(conn: sqlite3.Connection, keys: Iterable[tuple[int, str]], now: float | None = None
            ) -> dict[tuple[int, str], str]:
    """Who holds a live claim of each of ``keys`` (absent: nobody)."""
    now = time.time() if now is None else now
    out = {}
    for run_id, node in keys:
        row = conn.execute("SELECT driver FROM run_claims WHERE run_id = ? AND node = ? "
                           "AND expires >= ?", (run_id, node, now)).fetchone()
        if row is not None:
            out[(run_id, node)] = row[0]
    return out


def _active_sql() -> str:
    from pxe import states

    return states.ACTIVE_SQL
