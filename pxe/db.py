"""The state database: one SQLite file (WAL) under the state dir, shared by every command, or
a PostgreSQL database shared by several boot servers ([state] url, pxe.dbbackend_pg).

WAL lets the scheduler's poll read a consistent snapshot while a provisioning run writes.
All schema lives here: the ordered MIGRATIONS below (version 1 is the first release's schema,
each later one a change to it), applied by connect(), which refuses a database from a newer
dynprov. How to add one: docs/ARCHITECTURE.md, "Changing the database schema".
Every write goes through transaction(): its COMMIT bumps the change stamp (pxe.stamp) that
cluster-query's report and serve's rendered boot configs are keyed by.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from pxe.errors import DynprovError
from pxe.records import Record

# -- schema migrations ----------------------------------------------------------------------------
# The schema is the result of applying MIGRATIONS in order; a fresh database runs all of them, an
# older one the ones it lacks. Each entry is frozen once it has landed on main: never edit an old
# migration, append a new one (docs/ARCHITECTURE.md, "Changing the database schema"). The SQL is
# plain statements (no executescript: the runner executes them one by one inside its own
# transaction) so that the list keeps the same shape when a PostgreSQL backend arrives.


class Migration(Record):
    version: int
    description: str
    sql: str


# Version 1: the schema as it was before migrations existed (such databases carry
# PRAGMA user_version = 1 and no schema_version table; they are recognised as version 1).
SCHEMA_V1 = """
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
"""

# Version 2: CHECK constraints on the state columns (the vocabulary of pxe.run, pxe.reports,
# pxe.pools and pxe.wiki). SQLite cannot add a constraint to a table, so the three tables are
# rebuilt (create new, copy, drop old, rename: https://sqlite.org/lang_altertable.html#otheralter);
# the runner turns foreign keys off around it so dropping ``nodes`` cannot cascade into ``macs``.
CHECKS_V2 = """
CREATE TABLE nodes_v2 (
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
    state        TEXT NOT NULL DEFAULT 'unknown'
                 CHECK (state IN ('unknown', 'requested', 'power-cycled', 'booting', 'ready',
                                  'failed', 'timed out', 'cancelled', 'off', 'busy', 'running')),
    state_reason TEXT NOT NULL DEFAULT '',
    used         INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1)),
    updated      REAL NOT NULL DEFAULT 0
);
INSERT INTO nodes_v2 SELECT name, ip, arch, firmware, bmc_type, bmc_address, bmc_port, bmc_user,
    bmc_secret, groups, pool, current_os, desired_os, boot_target, boot_token, state, state_reason,
    used, updated FROM nodes;
DROP TABLE nodes;
ALTER TABLE nodes_v2 RENAME TO nodes;

CREATE TABLE runs_v2 (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    label     TEXT NOT NULL,
    mode      TEXT NOT NULL CHECK (mode IN ('perjob', 'ondemand')),
    created   REAL NOT NULL,
    finished  REAL,
    state     TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'failed'))
);
INSERT INTO runs_v2 SELECT id, label, mode, created, finished, state FROM runs;
UPDATE sqlite_sequence SET seq = (SELECT seq FROM sqlite_sequence WHERE name = 'runs')
    WHERE name = 'runs_v2' AND EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'runs');
DROP TABLE runs;
ALTER TABLE runs_v2 RENAME TO runs;

CREATE TABLE run_nodes_v2 (
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    node     TEXT NOT NULL,
    state    TEXT NOT NULL CHECK (state IN ('requested', 'power-cycled', 'booting', 'ready',
                                            'failed', 'timed out', 'cancelled')),
    reason   TEXT NOT NULL DEFAULT '',
    deadline REAL,
    updated  REAL NOT NULL,
    PRIMARY KEY (run_id, node)
);
INSERT INTO run_nodes_v2 SELECT run_id, node, state, reason, deadline, updated FROM run_nodes;
DROP TABLE run_nodes;
ALTER TABLE run_nodes_v2 RENAME TO run_nodes;
"""

# Version 3 (issue 16, pxe.states): the stateful image's run step ``installed`` (disk written,
# the run driver sends the next boot to the disk) joins the node and run-node vocabularies.
# Same rebuild as version 2, for the two tables whose CHECK lists change.
CHECKS_V3 = """
CREATE TABLE nodes_v3 (
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
    state        TEXT NOT NULL DEFAULT 'unknown'
                 CHECK (state IN ('unknown', 'requested', 'power-cycled', 'booting', 'installed',
                                  'ready', 'failed', 'timed out', 'cancelled', 'off', 'busy',
                                  'running')),
    state_reason TEXT NOT NULL DEFAULT '',
    used         INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1)),
    updated      REAL NOT NULL DEFAULT 0
);
INSERT INTO nodes_v3 SELECT name, ip, arch, firmware, bmc_type, bmc_address, bmc_port, bmc_user,
    bmc_secret, groups, pool, current_os, desired_os, boot_target, boot_token, state, state_reason,
    used, updated FROM nodes;
DROP TABLE nodes;
ALTER TABLE nodes_v3 RENAME TO nodes;

CREATE TABLE run_nodes_v3 (
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    node     TEXT NOT NULL,
    state    TEXT NOT NULL CHECK (state IN ('requested', 'power-cycled', 'booting',
                                            'installed', 'ready', 'failed',
                                            'timed out', 'cancelled')),
    reason   TEXT NOT NULL DEFAULT '',
    deadline REAL,
    updated  REAL NOT NULL,
    PRIMARY KEY (run_id, node)
);
INSERT INTO run_nodes_v3 SELECT run_id, node, state, reason, deadline, updated FROM run_nodes;
DROP TABLE run_nodes;
ALTER TABLE run_nodes_v3 RENAME TO run_nodes;
"""

# Version 4: hardware facts nodes report at call-home (pxe.hwfacts), one row per node, and the
# machines that PXE-booted with a MAC the inventory does not know (pxe.discovery), capped there.
FACTS_V4 = """
CREATE TABLE node_facts (
    node     TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
    facts    TEXT NOT NULL,           -- JSON written by pxe.hwfacts (bounded there)
    reported REAL NOT NULL
);
CREATE TABLE discovered (
    mac        TEXT PRIMARY KEY,      -- colon form, lower case (pxe.validate.mac)
    ip         TEXT,                  -- where its report came from
    facts      TEXT NOT NULL DEFAULT '{}',
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    reports    INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX discovered_last_seen ON discovered(last_seen);
"""

# Version 5: the node agents of booted images (pxe/power/agent.py): the hash of the call-home token
# each adopted at its ready report, its last poll (heartbeat, replay guard) and a pending reboot.
AGENTS_V5 = """
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

# Version 6 (issue 20): image versions. ``images`` stays the current version of each label (what
# every reader and the per-request boot configs use) and names it in ``version``;
# ``image_versions`` keeps every version kept (pxe.imageversions), the current one included.
# Nodes record the version they booted (``current_version``, next to ``current_os``), run nodes
# the version current when their run started. Existing images become version 1.
VERSIONS_V6 = """
CREATE TABLE image_versions (
    label        TEXT NOT NULL,
    version      INTEGER NOT NULL,
    os_name      TEXT NOT NULL DEFAULT '',
    arch         TEXT NOT NULL DEFAULT 'x86_64',
    mode         TEXT NOT NULL DEFAULT 'stateless',
    cmdline      TEXT NOT NULL DEFAULT '',
    kernel_sha   TEXT NOT NULL,
    initrd_sha   TEXT,
    rootfs_sha   TEXT,
    rootfs_name  TEXT,
    prov_seconds INTEGER NOT NULL DEFAULT 600,
    owner        TEXT NOT NULL DEFAULT 'root',   -- who uploaded this version
    created      REAL NOT NULL,
    PRIMARY KEY (label, version)
);
ALTER TABLE images ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE nodes ADD COLUMN current_version INTEGER;
ALTER TABLE run_nodes ADD COLUMN image_version INTEGER;
INSERT INTO image_versions(label, version, os_name, arch, mode, cmdline, kernel_sha, initrd_sha,
    rootfs_sha, rootfs_name, prov_seconds, owner, created)
    SELECT label, 1, os_name, arch, mode, cmdline, kernel_sha, initrd_sha, rootfs_sha,
           rootfs_name, prov_seconds, owner, created FROM images;
UPDATE nodes SET current_version = 1 WHERE current_os IN (SELECT label FROM images);
"""

# Version 7 (issue 21, pxe.segments / pxe.claims): service nodes. A node belongs to a segment
# ('' = the primary's own); each run node may be claimed by one run driver (a lease: who and until
# when), so drivers on several servers never drive a node twice; every serve and driver records a
# heartbeat in ``servers`` so another server notices one that died. New tables only: the
# existing ones keep their columns (and their positional INSERTs elsewhere keep working).
SEGMENTS_V7 = """
CREATE TABLE node_segments (
    node    TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
    segment TEXT NOT NULL            -- a label (pxe.validate.label); no row = the primary's ('')
);
CREATE INDEX node_segments_segment ON node_segments(segment);
CREATE TABLE run_claims (
    run_id  INTEGER NOT NULL,
    node    TEXT NOT NULL,
    driver  TEXT NOT NULL,           -- the servers.name of the driver holding the lease
    expires REAL NOT NULL,
    PRIMARY KEY (run_id, node)
);
CREATE TABLE servers (
    name      TEXT PRIMARY KEY,       -- role/host/segment/pid: one row per running process
    role      TEXT NOT NULL,          -- serve | driver
    segment   TEXT NOT NULL DEFAULT '',
    host      TEXT NOT NULL,
    pid       INTEGER NOT NULL,
    started   REAL NOT NULL,
    heartbeat REAL NOT NULL,
    stopped   REAL                    -- set by a clean stop; NULL while running (or dead)
);
CREATE INDEX servers_segment ON servers(segment, role);
"""

# Version 8 (issue 18): set-boot of N nodes is one UPDATE and one event. ``nodes.boot_set`` is
# when set-boot last chose the node's next boot (the run driver's recovery reads it: "nobody has
# set its boot since"), written by set-boot's UPDATE itself instead of one event per node.
# ``dhcp_generation`` holds one random value that triggers replace on every write a DHCP config
# depends on (pxe.dhcpinputs.HOST_COLUMNS of nodes, their MACs and segments, nodes added or
# removed): `render` compares it with the one its installed config was rendered from instead of
# reading and hashing every node's facts. Random, not a counter: a database restored from a
# backup never matches a newer record. A set-boot, a report or a state change touches no column
# the triggers watch (UPDATE OF) and an unchanged value does not count (WHEN). Existing nodes
# get their last per-node ``set-boot`` event's time, so recovery reads the same across the upgrade.
# PostgreSQL: its own text (dbbackend_pg.PG_MIGRATIONS), one plpgsql trigger function.
_GENERATION = "UPDATE dhcp_generation SET value = lower(hex(randomblob(8))) WHERE id = 1"
_FACT_CHANGED = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in (
    "name", "ip", "arch", "firmware", "bmc_type", "bmc_address", "groups", "pool"))
_BOOT_SET_FROM_EVENTS = ("UPDATE nodes SET boot_set = (SELECT MAX(e.ts) FROM events e "
                         "WHERE e.node = nodes.name AND e.kind = 'set-boot')")
GENERATION_V8 = f"""
ALTER TABLE nodes ADD COLUMN boot_set REAL;
{_BOOT_SET_FROM_EVENTS};
CREATE TABLE dhcp_generation (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value TEXT NOT NULL
);
INSERT INTO dhcp_generation(id, value) VALUES (1, lower(hex(randomblob(8))));
CREATE TRIGGER dhcp_generation_node_added AFTER INSERT ON nodes FOR EACH ROW
BEGIN {_GENERATION}; END;
CREATE TRIGGER dhcp_generation_node_removed AFTER DELETE ON nodes FOR EACH ROW
BEGIN {_GENERATION}; END;
CREATE TRIGGER dhcp_generation_node_changed
AFTER UPDATE OF name, ip, arch, firmware, bmc_type, bmc_address, groups, pool ON nodes
FOR EACH ROW WHEN {_FACT_CHANGED}
BEGIN {_GENERATION}; END;
CREATE TRIGGER dhcp_generation_mac_added AFTER INSERT ON macs FOR EACH ROW
BEGIN {_GENERATION}; END;
CREATE TRIGGER dhcp_generation_mac_removed AFTER DELETE ON macs FOR EACH ROW
BEGIN {_GENERATION}; END;
CREATE TRIGGER dhcp_generation_mac_changed AFTER UPDATE ON macs FOR EACH ROW
BEGIN {_GENERATION}; END;
CREATE TRIGGER dhcp_generation_segment_added AFTER INSERT ON node_segments FOR EACH ROW
BEGIN {_GENERATION}; END;
CREATE TRIGGER dhcp_generation_segment_removed AFTER DELETE ON node_segments FOR EACH ROW
BEGIN {_GENERATION}; END;
CREATE TRIGGER dhcp_generation_segment_changed AFTER UPDATE ON node_segments FOR EACH ROW
BEGIN {_GENERATION}; END;
"""

# Version 9 (issue 18 §1): WHICH nodes' DHCP facts changed, not only that some did.
# ``dhcp_changes`` holds one row per node name ever written (a removed name stays: a tombstone),
# with the change number of its last write; the number only grows (MAX + 1: writers are
# serialized). The same writes that replace the generation (migration 8) record the names they
# touch, old and new (a rename or a MAC moved records both); `render` then re-renders only the
# nodes changed since the number its installed file was rendered at (pxe.dhcpincremental). A
# set-boot touches no watched column: no trigger fires. PostgreSQL: one plpgsql function
# (dbbackend_pg.PG_MIGRATIONS), and a TRUNCATE records '' (no node has that name): everything.
_CHANGE = ("INSERT INTO dhcp_changes(node, seq) VALUES ({}, (SELECT COALESCE(MAX(seq), 0) + 1 "
           "FROM dhcp_changes)) ON CONFLICT (node) DO UPDATE SET seq = excluded.seq")


def _change_trigger(name: str, event: str, *who: str, when: str = "") -> str:
    body = " ".join(f"{_CHANGE.format(w)};" for w in who)
    return (f"CREATE TRIGGER dhcp_changes_{name} AFTER {event} FOR EACH ROW"
            f"{' WHEN ' + when if when else ''}\nBEGIN {body} END;\n")


CHANGES_V9 = (
    "CREATE TABLE dhcp_changes (\n"
    "    node TEXT PRIMARY KEY,          -- a node name ('' = every node: render in full)\n"
    "    seq  INTEGER NOT NULL           -- the change number of its last DHCP-facts write\n"
    ");\n"
    "CREATE INDEX dhcp_changes_seq ON dhcp_changes(seq);\n"
    + _change_trigger("node_added", "INSERT ON nodes", "NEW.name")
    + _change_trigger("node_removed", "DELETE ON nodes", "OLD.name")
    + _change_trigger("node_changed", "UPDATE OF name, ip, arch, firmware, bmc_type, "
                      "bmc_address, groups, pool ON nodes", "OLD.name", "NEW.name",
                      when=_FACT_CHANGED)
    + _change_trigger("mac_added", "INSERT ON macs", "NEW.node")
    + _change_trigger("mac_removed", "DELETE ON macs", "OLD.node")
    + _change_trigger("mac_changed", "UPDATE ON macs", "OLD.node", "NEW.node")
    + _change_trigger("segment_added", "INSERT ON node_segments", "NEW.node")
    + _change_trigger("segment_removed", "DELETE ON node_segments", "OLD.node")
    + _change_trigger("segment_changed", "UPDATE ON node_segments", "OLD.node", "NEW.node")
)

# Version 10: PostgreSQL only. Migration 9's numbers are MAX + 1, which follows commit order only
# while every writer holds the writers' lock from numbering to COMMIT; ours do (BEGIN IMMEDIATE),
# but a writer without it (an admin's psql, a future code path) could commit a number lower than
# one a render has already read, and that render's splice would miss the change for good. The
# trigger function now takes the writers' lock itself before numbering (and refuses a snapshot
# older than the lock: REPEATABLE READ / SERIALIZABLE), dbbackend_pg.PG_MIGRATIONS. SQLite:
# nothing to do, its one write lock already serializes every writer from BEGIN to COMMIT.
ORDERED_CHANGES_V10 = "-- SQLite: nothing (its database lock serializes every writer)\n"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", SCHEMA_V1
              + "INSERT OR IGNORE INTO pools(name, created) "
                "VALUES ('hpc', CAST(strftime('%s', 'now') AS REAL));"),
    Migration(2, "CHECK constraints on node, run and run-node states", CHECKS_V2),
    Migration(3, "run step 'installed' in the node and run-node states", CHECKS_V3),
    Migration(4, "hardware facts of nodes and discovered machines", FACTS_V4),
    Migration(5, "node agents (heartbeat, reboot requests)", AGENTS_V5),
    Migration(6, "image versions; the version each node booted", VERSIONS_V6),
    Migration(7, "segments, run-node claims, server heartbeats", SEGMENTS_V7),
    Migration(8, "set-boot time per node; DHCP-facts generation kept by triggers", GENERATION_V8),
    Migration(9, "which nodes' DHCP facts changed (one row per name)", CHANGES_V9),
    Migration(10, "DHCP change numbers in commit order for every writer (PostgreSQL)",
              ORDERED_CHANGES_V10),
)

SCHEMA_VERSION = MIGRATIONS[-1].version  # what this code needs

# Bookkeeping, not part of any migration: one row per applied migration.
VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied     REAL NOT NULL
)"""


_VERSION_TABLE = VERSION_TABLE  # the name older tests use


class SchemaError(DynprovError):
    """The database's schema cannot be used by this code (too new) or could not be upgraded."""


def statements(sql: str) -> Iterator[str]:
    """Split a migration's SQL into single statements (semicolons in strings/comments are safe)."""
    buf = ""
    for piece in sql.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if _has_code(buf):
                yield buf.strip()
            buf = ""
    if _has_code(buf.rstrip(";")):
        raise ValueError(f"incomplete SQL statement: {buf.strip()[:60]!r}")


def _has_code(text: str) -> bool:
    lines = (line.split("--", 1)[0] for line in text.splitlines())
    return any(line.strip(" \t;") for line in lines)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version: 0 for an empty file (legacy databases: PRAGMA user_version)."""
    has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                             "AND name = 'schema_version'").fetchone()
    if has_table:
        return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def too_new(path: Path | str, version: int) -> SchemaError:
    return SchemaError(f"{path}: the state database has schema version {version}, newer than this "
                       f"dynprov understands ({SCHEMA_VERSION}); install the dynprov release that "
                       f"wrote it (or newer), or restore a backup made for this one")


def migrate(conn: sqlite3.Connection, path: Path, create: bool = True) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version it had. All pending migrations run
    in one BEGIN IMMEDIATE transaction: a concurrent process waits and then finds nothing to do, and
    a failure leaves the database exactly as it was."""
    found = schema_version(conn)
    if found > SCHEMA_VERSION:
        raise too_new(path, found)
    if found == SCHEMA_VERSION or (found == 0 and not create):
        return found
    if found == 0:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent; cannot change inside a transaction
    conn.execute("PRAGMA foreign_keys = OFF")  # a table rebuild must not cascade or fail half-way
    step = None
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = schema_version(conn)  # another process may have upgraded it meanwhile
            if found > SCHEMA_VERSION:
                raise too_new(path, found)
            conn.execute(VERSION_TABLE)
            if found:  # a legacy database: record the version it had
                conn.execute("INSERT OR IGNORE INTO schema_version VALUES (?, ?, ?)",
                             (found, MIGRATIONS[found - 1].description + " (found)", time.time()))
            for step in MIGRATIONS[found:]:
                for statement in statements(step.sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?, ?, ?)",
                             (step.version, step.description, time.time()))
            step = None
            broken = conn.execute("PRAGMA foreign_key_check").fetchone()
            if broken:
                raise SchemaError(f"{path}: schema upgrade left a dangling reference in table "
                                  f"{broken[0]} (row {broken[1]}); nothing was changed")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # some errors (disk full) already rolled back
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        what = (f"migration {step.version} ({step.description})" if step is not None
                else "the schema upgrade")
        hint = ("; run it as the database's owner (e.g. any pxe-stage command as root)"
                if "readonly" in str(exc) else "")
        raise SchemaError(f"{path}: cannot upgrade the state database from schema version {found} "
                          f"to {SCHEMA_VERSION}: {what} failed: {' '.join(str(exc).split())}{hint}; "
                          f"nothing was changed") from exc
    finally:
        conn.execute("PRAGMA foreign_keys = ON")
    return found


Error = sqlite3.Error  # what both backends raise (pxe.dbbackend_pg's errors subclass these)
IntegrityError = sqlite3.IntegrityError
URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(target: Path | str) -> bool:
    """A PostgreSQL URL ([state] url) rather than the path of an SQLite file."""
    return isinstance(target, str) and target.startswith(URL_SCHEMES)


def where(target: Path | str) -> str:
    """The store for a message: the file, or the URL without its password."""
    import re

    text = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(target))
    return re.sub(r"([?&]password=)[^&]*", r"\1***", text)  # libpq takes it as a parameter too


def is_postgresql(conn: object) -> bool:
    return not isinstance(conn, sqlite3.Connection)


def connect(path: Path | str, create: bool = True) -> sqlite3.Connection:
    """Open the state database, creating or upgrading its schema as needed; refuses a database
    written by a newer dynprov (SchemaError, exit 1). Safe for concurrent processes.
    ``path``: the SQLite file, or a postgresql:// URL (Config.database gives the right one)."""
    if is_url(path):
        from pxe import dbbackend_pg

        return dbbackend_pg.connect(str(path), create)  # type: ignore[return-value]
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not os.access(path, os.W_OK):
        # Checked up front: whether SQLite fails at open (WAL's -shm) or only at the first write
        # depends on what other connections hold; the message must not.
        raise DynprovError(f"permission denied: {path} (run as root or through sudo)")
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        migrate(conn, path, create)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.OperationalError as exc:
        conn.close()
        # Even a read needs write access in WAL mode (the -shm index): name the file, not SQLite.
        if "readonly" in str(exc) or "unable to open" in str(exc):
            raise DynprovError(f"permission denied: {path} (run as root or through sudo)") from exc
        raise
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, bookkeeping: bool = False
                ) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT: writers queue on the lock instead of failing mid-way
    (PostgreSQL: BEGIN and a transaction-scoped advisory lock, pxe.dbbackend_pg).

    ``bookkeeping``: the writes are liveness only (heartbeats, claim leases), which no cached
    copy shows: the change stamp stays, so boot configs and Moab's report stay warm."""
    if conn.in_transaction:
        yield conn
        return
    before = conn.total_changes
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if bookkeeping and is_postgresql(conn):
        conn.commit_bookkeeping()  # type: ignore[attr-defined]
        return
    conn.execute("COMMIT")
    # A transaction that wrote nothing (or only bookkeeping) leaves the caches warm.
    if conn.total_changes != before and not bookkeeping:
        bump_stamp(conn)


def change_counter(conn: sqlite3.Connection) -> int | str:
    """A value that moves whenever any connection commits a change (cache keys, watch loops):
    SQLite's data_version (other connections' commits; add total_changes for this one's), or
    PostgreSQL's stamp row (every commit that wrote, this connection's too)."""
    if is_postgresql(conn):
        return conn.stamp()  # type: ignore[attr-defined]
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def read_stamp(target: Path | str) -> str:
    """The change stamp of a store ("" if none yet): the -stamp file next to an SQLite database,
    the stamp row of a PostgreSQL one (a connection of its own)."""
    if is_url(target):
        conn = connect(target, create=False)
        try:
            return str(change_counter(conn))
        except Error:
            return ""
        finally:
            conn.close()
    from pxe import stamp

    return stamp.read(target)


def content_stamp(conn: sqlite3.Connection) -> str:
    """A value that moves only when content changes: the key of what people and schedulers are
    told (the run driver's announcements, the REST API's cached answers). The -stamp file of an
    SQLite database (pxe.stamp; read it before the data) or PostgreSQL's stamp row: bookkeeping
    writes (``transaction(bookkeeping=True)``: heartbeats, leases, agent polls) move neither.
    While an SQLite database has no stamp yet: its data_version (which heartbeats move too)."""
    if is_postgresql(conn):
        return str(conn.stamp())  # type: ignore[attr-defined]
    from pxe import stamp

    path = conn.execute("PRAGMA database_list").fetchone()[2]
    value = stamp.read(path) if path else ""
    return value or f"data_version {change_counter(conn)}"


def bump_stamp(conn: sqlite3.Connection) -> None:
    """After a COMMIT: tell the readers' caches (pxe.stamp) that the database changed.
    (PostgreSQL: the connection bumped the stamp row inside the transaction already.)"""
    from pxe import stamp

    if is_postgresql(conn):
        return

    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if path:
        try:
            stamp.bump(path)
        except OSError:  # a reader then keys on a stale stamp: log loudly, never undo the commit
            import logging

            logging.getLogger("dynprov.db").error("cannot update the change stamp of %s", path)


def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int] | None:
    """Copy the WAL's committed pages into the database file without waiting for anyone
    (SQLite's PASSIVE checkpoint): the long-running `serve` does this every heartbeat, so an
    admin's command neither pays a checkpoint when it closes (serve's connection is open) nor
    inside its COMMIT (the WAL stays below wal_autocheckpoint's 1,000 pages, SQLite's own
    bound, which still applies when no serve runs). (busy, WAL frames, frames copied);
    None on PostgreSQL, whose server checkpoints by itself."""
    if is_postgresql(conn):
        return None
    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(frames), int(copied)


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


def log_events(conn: sqlite3.Connection, kind: str, nodes: list[str] | tuple[str, ...],
               detail: str = "", run_id: int | None = None) -> None:
    """The same event for many nodes in one statement (SQLite: the names as one JSON array,
    ~2x cheaper than 10,000 bound rows; another backend: one executemany)."""
    now = time.time()
    if not is_postgresql(conn) and sqlite3.sqlite_version_info >= (3, 38):
        import json

        conn.execute("INSERT INTO events(ts, node, run_id, kind, detail) "
                     "SELECT ?, j.value, ?, ?, ? FROM json_each(?) AS j ORDER BY j.key",
                     (now, run_id, kind, detail, json.dumps(list(nodes))))
        return
    conn.executemany("INSERT INTO events(ts, node, run_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
                     [(now, n, run_id, kind, detail) for n in nodes])
