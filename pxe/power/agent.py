"""The node agent's side channel: heartbeats from a booted image, and "reboot now into the network".

A Wake-on-LAN machine that is running ignores a magic packet; its image's agent
(``initramfs/agent``) is how the server reboots it. Credential: the call-home token of the boot
that brought the image up. When the image reports ``ready`` (which consumes that one-time token
for reports), the token becomes the agent's: only its SHA-256 is kept here. The agent then polls
``POST /agent`` (form fields ``node``, ``token``, ``seq``) with ``seq`` strictly increasing;
a wrong token or a ``seq`` not above the last one seen (a replay) is refused and logged. The answer
is ``ok`` or ``reboot`` (once: the request is taken by that answer).
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import time

from pxe import db
from pxe.errors import DynprovError, NotFound


class AgentRefused(DynprovError):
    """A poll with a wrong token or a replayed sequence number."""


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def adopt(conn: sqlite3.Connection, node: str, token: str, now: float) -> None:
    """The ``ready`` boot's token becomes the agent's (caller holds the report's transaction)."""
    conn.execute("INSERT INTO agents(node, token_sha, seq, adopted) VALUES (?, ?, 0, ?) "
                 "ON CONFLICT (node) DO UPDATE SET token_sha = excluded.token_sha, seq = 0, "
                 "adopted = excluded.adopted, last_seen = NULL, reboot_requested = NULL, "
                 "reboot_taken = NULL", (node, _sha(token), now))


def poll(conn: sqlite3.Connection, node: str, token: str, seq: int) -> str:
    """One heartbeat; returns ``reboot`` when a reboot was requested, else ``ok``.
    Bookkeeping (db.transaction): every booted node polls every few seconds, and no cached
    report shows what it writes (the power commands read agents directly)."""
    with db.transaction(conn, bookkeeping=True):
        row = conn.execute("SELECT token_sha, seq, reboot_requested FROM agents WHERE node = ?",
                           (node,)).fetchone()
        why = None
        if row is None:
            why = "no agent registered (no ready report from this boot)"
        elif not hmac.compare_digest(_sha(token), row["token_sha"]):
            why = "wrong token"
        elif seq <= row["seq"]:
            why = f"replayed or old sequence number {seq} (last {row['seq']})"
        if why is None:
            now = time.time()
            reboot = row["reboot_requested"] is not None
            conn.execute("UPDATE agents SET seq = ?, last_seen = ?, reboot_requested = NULL, "
                         "reboot_taken = CASE WHEN ? = 1 THEN ? ELSE reboot_taken END "
                         "WHERE node = ?", (seq, now, int(reboot), now, node))
            if reboot:
                db.log_event(conn, "agent-reboot-taken", node, f"seq {seq}")
            return "reboot" if reboot else "ok"
    with db.transaction(conn):
        db.log_event(conn, "agent-refused", node, why)
    if row is None and not conn.execute("SELECT 1 FROM nodes WHERE name = ?", (node,)).fetchone():
        raise NotFound(f"unknown node {node!r}")
    raise AgentRefused(f"agent poll from {node} refused: {why}")


def heartbeat_age(conn: sqlite3.Connection, node: str, now: float | None = None) -> float | None:
    """Seconds since the node's agent last polled; None if no agent of this boot ever did."""
    row = conn.execute("SELECT last_seen FROM agents WHERE node = ? AND seq > 0",
                       (node,)).fetchone()
    if row is None or row["last_seen"] is None:
        return None
    return max(0.0, (time.time() if now is None else now) - row["last_seen"])


def adopted_age(conn: sqlite3.Connection, node: str, now: float | None = None) -> float | None:
    """Seconds since this boot's ready report handed the token to an agent that has not polled
    yet; None if there is no such agent."""
    row = conn.execute("SELECT adopted FROM agents WHERE node = ? AND seq = 0", (node,)).fetchone()
    if row is None:
        return None
    return max(0.0, (time.time() if now is None else now) - row["adopted"])


def request_reboot(conn: sqlite3.Connection, names: list[str]) -> None:
    now = time.time()
    with db.transaction(conn):
        for name in names:
            conn.execute("UPDATE agents SET reboot_requested = ?, reboot_taken = NULL "
                         "WHERE node = ?", (now, name))
            db.log_event(conn, "agent-reboot-requested", name, "")


def wait_taken(conn: sqlite3.Connection, names: list[str], timeout: float,
               poll_every: float = 0.5) -> set[str]:
    """The nodes whose agent took the reboot request within ``timeout`` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    taken: set[str] = set()
    for _ in range(int(timeout / poll_every) + 2):
        marks = ",".join("?" * len(names))
        taken = {r[0] for r in conn.execute(
            f"SELECT node FROM agents WHERE node IN ({marks}) AND reboot_taken IS NOT NULL",
            tuple(names))}
        if taken >= set(names) or time.monotonic() >= deadline:
            break
        time.sleep(poll_every)
    return taken


def forget(conn: sqlite3.Connection, names: list[str]) -> None:
    """A node that is rebooting has no agent until its next ``ready``."""
    with db.transaction(conn):
        for name in names:
            conn.execute("DELETE FROM agents WHERE node = ?", (name,))
