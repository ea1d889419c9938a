"""The state database: one SQLite file (WAL) under the state dir, shared by every command.

WAL lets the scheduler's poll read a consistent snapshot while a provisioning run writes.
All schema lives here so that a reader can see every table in one place.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (
    name     TEXT PRIMARY KEY,
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    name         TEXT PRIMARY KEY,
    ip           TEXT UNIQUE,
    arch         TEXT NOT NULL DEFAULT 'x86_64',
    firmware     TEXT NOT NULL DEFAULT 'bios' CHECK (firmware IN ('bios', 'uefi')),
    bmc_type     TEXT NOT NULL DEFAULT 'none'
                 CHECK (bmc_type IN ('ipmi', 'redfish', 'wol', 'none')),
    bmc_address  TEXT,
    bmc_port     INTEGER,
    bmc_user     TEXT,
    bmc_secret   TEXT,            -- a reference (secrets-file key or file:/path), never a password
    groups       TEXT NOT NULL DEFAULT '',
    pool         TEXT NOT NULL DEFAULT 'hpc' REFERENCES pools(name),
    current_os   TEXT,            -- what the node last reported running
    desired_os   TEXT,            -- what set-boot asked for
    boot_target  TEXT NOT NULL DEFAULT 'local' CHECK (boot_target IN ('local', 'os')),
    boot_token   TEXT,            -- one-time token for the node's call-home (issued by set-boot)
    state        TEXT NOT NULL DEFAULT 'unknown',
    state_reason TEXT NOT NULL DEFAULT '',
    used         INTEGER NOT NULL DEFAULT 0,  -- ran a job since its last re-image (per-job mode)
    updated      REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS macs (
    mac   TEXT PRIMARY KEY,
    node  TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
    idx   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS macs_node ON macs(node);
CREATE TABLE IF NOT EXISTS images (
    label       TEXT PRIMARY KEY,
    os_name     TEXT NOT NULL DEFAULT '',
    arch        TEXT NOT NULL DEFAULT 'x86_64',
    mode        TEXT NOT NULL DEFAULT 'stateless' CHECK (mode IN ('stateless', 'stateful')),
    cmdline     TEXT NOT NULL DEFAULT '',
    kernel_sha  TEXT NOT NULL,
    initrd_sha  TEXT,
    rootfs_sha  TEXT,
    rootfs_name TEXT,
    prov_seconds INTEGER NOT NULL DEFAULT 600,
    owner       TEXT NOT NULL DEFAULT 'root',
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    label     TEXT NOT NULL,
    mode      TEXT NOT NULL,
    created   REAL NOT NULL,
    finished  REAL,
    state     TEXT NOT NULL DEFAULT 'running'
);
CREATE TABLE IF NOT EXISTS run_nodes (
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    node     TEXT NOT NULL,
    state    TEXT NOT NULL,
    reason   TEXT NOT NULL DEFAULT '',
    deadline REAL,
    updated  REAL NOT NULL,
    PRIMARY KEY (run_id, node)
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      REAL NOT NULL,
    node    TEXT,
    run_id  INTEGER,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_node ON events(node, ts);
-- node agents in booted images (pxe/power/agent.py)
CREATE TABLE IF NOT EXISTS agents (
    node             TEXT PRIMARY KEY,
    token_sha        TEXT NOT NULL,
    seq              INTEGER NOT NULL DEFAULT 0,
    adopted          REAL NOT NULL,
    last_seen        REAL,
    reboot_requested REAL,
    reboot_taken     REAL
);
"""
# Databases created before the agents table existed get it on first use (pxe/power/agent.py).
AGENTS_TABLE = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS agents"):]


def connect(path: Path, create: bool = True) -> sqlite3.Connection:
    """Open the state database; creates the schema on first use. Safe for concurrent processes."""
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if create:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(
                "BEGIN IMMEDIATE;" + SCHEMA
                + f"INSERT OR IGNORE INTO pools(name, created) VALUES ('hpc', {time.time()});"
                + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT: writers queue on the lock instead of failing mid-way."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def get_setting(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def set_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO settings(key, value) VALUES (?, ?) "
                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))


def log_event(conn: sqlite3.Connection, kind: str, node: str | None = None,
              detail: str = "", run_id: int | None = None) -> None:
    conn.execute("INSERT INTO events(ts, node, run_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
                 (time.time(), node, run_id, kind, detail))
