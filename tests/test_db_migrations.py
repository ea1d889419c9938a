"""Schema migrations: a database from every earlier release, with data in it, is upgraded in place;
a newer one is refused; the state columns refuse words outside the vocabulary."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from msm_plugin import wiki
from pxe import db, pools, run

pytestmark = pytest.mark.unit

# The schema of the release before migrations (main at 559d715), frozen here on purpose: it is what
# sites have on disk. Never update this text to follow pxe/db.py.
SCHEMA_RELEASE_1 = """
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

RUN_NODES = "run_nodes(run_id, node, state, reason, deadline, updated)"  # the release-1 columns
TABLES = ("pools", "nodes", "macs", "images", "settings", "runs", "run_nodes", "events")


def make_release_1(path: Path) -> None:
    """A database exactly as the pre-migration code created it (its connect(), verbatim)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript("BEGIN IMMEDIATE;" + SCHEMA_RELEASE_1
                       + "INSERT OR IGNORE INTO pools(name, created) VALUES ('hpc', 1700000000.0);"
                       + "PRAGMA user_version = 1; COMMIT;")
    conn.close()


def fill(path: Path, node_state: str = "ready") -> None:
    """Every table gets rows, including ones that reference each other and a gap in run ids."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript(f"""
        BEGIN;
        INSERT INTO pools VALUES ('spare', 1700000001.5);
        INSERT INTO nodes(name, ip, firmware, bmc_type, bmc_address, bmc_port, bmc_user, bmc_secret,
                          groups, pool, current_os, desired_os, boot_target, boot_token, state,
                          state_reason, used, updated)
            VALUES ('n001', '198.18.0.11', 'uefi', 'ipmi', '127.0.0.1', 6230, 'admin', 'bmc-n001',
                    'gpu,big', 'hpc', 'centos7', 'centos7', 'os', 'tok1', '{node_state}', '', 1,
                    1700000002.25);
        INSERT INTO nodes(name, ip, pool, state, state_reason) VALUES
            ('n002', '198.18.0.12', 'spare', 'timed out', 'no report within 600 s'),
            ('n003', NULL, 'hpc', 'booting', 'run 2: booting');
        INSERT INTO macs VALUES ('52:54:00:00:00:01', 'n001', 0), ('52:54:00:00:01:01', 'n001', 1),
                                ('52:54:00:00:00:02', 'n002', 0), ('52:54:00:00:00:03', 'n003', 0);
        INSERT INTO images(label, os_name, mode, cmdline, kernel_sha, initrd_sha, prov_seconds,
                           owner, created)
            VALUES ('centos7', 'CentOS 7', 'stateless', 'quiet', 'aa', 'bb', 900, 'alice', 1.0);
        INSERT INTO settings VALUES ('run.mode', 'perjob');
        INSERT INTO runs(label, mode, created, finished, state) VALUES
            ('centos7', 'ondemand', 10.0, 20.0, 'done'),
            ('centos7', 'perjob', 30.0, NULL, 'running'),
            ('sles11', 'ondemand', 40.0, 41.0, 'failed');
        INSERT INTO run_nodes(run_id, node, state, reason, deadline, updated)
                              VALUES (1, 'n001', 'ready', '', 15.0, 19.0),
                                     (2, 'n003', 'booting', '', 630.0, 31.0),
                                     (3, 'n002', 'timed out', 'late', 41.0, 41.0);
        INSERT INTO events(ts, node, run_id, kind, detail) VALUES
            (1.0, 'n001', 1, 'run-ready', ''), (2.0, NULL, NULL, 'image-added', 'centos7');
        DELETE FROM events WHERE id = 2;
        COMMIT;
    """)
    conn.close()


# Columns later migrations append (ALTER TABLE ... ADD COLUMN): the old columns must keep their
# data; the new ones are checked by their own migration's test.
ADDED = {"images": ("version",), "nodes": ("current_version", "boot_set"),
         "run_nodes": ("image_version",)}


def rows(path: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(path)
    try:
        out = {}
        for t in TABLES:
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({t})")
                    if r[1] not in ADDED.get(t, ())]
            out[t] = conn.execute(f"SELECT {', '.join(cols)} FROM {t} ORDER BY 1, 2").fetchall()
        return out
    finally:
        conn.close()


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump()) + [str(conn.execute("PRAGMA user_version").fetchone()[0])]
    finally:
        conn.close()


@pytest.fixture
def release_1(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "dynprov.db"
    path.parent.mkdir()
    make_release_1(path)
    fill(path)
    return path


def test_frozen_release_1_schema_is_migration_1():
    """Migration 1 must stay what release-1 databases contain: editing it would fork the schema."""
    assert db.SCHEMA_V1 == SCHEMA_RELEASE_1
    assert [m.version for m in db.MIGRATIONS] == list(range(1, len(db.MIGRATIONS) + 1))
    assert db.SCHEMA_VERSION == db.MIGRATIONS[-1].version


def test_release_1_database_is_recognised_and_upgraded_with_its_data(release_1):
    before = rows(release_1)
    conn = db.connect(release_1)
    assert db.schema_version(conn) == db.SCHEMA_VERSION
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    history = conn.execute("SELECT version, description FROM schema_version ORDER BY 1").fetchall()
    assert [tuple(r) for r in history][0] == (1, "initial schema (found)")
    assert [r[0] for r in history] == list(range(1, db.SCHEMA_VERSION + 1))
    conn.close()
    assert rows(release_1) == before  # every row of every table, column for column

    conn = db.connect(release_1)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"macs_node", "events_node"} <= indexes
    # AUTOINCREMENT continues after the highest id ever used, not after the highest id kept.
    cur = conn.execute("INSERT INTO events(ts, kind) VALUES (3.0, 'x')")
    assert cur.lastrowid == 3
    cur = conn.execute("INSERT INTO runs(label, mode, created) VALUES ('x', 'ondemand', 50.0)")
    assert cur.lastrowid == 4
    # Foreign keys survived the rebuild: cascade from nodes to macs, references checked.
    conn.execute("DELETE FROM nodes WHERE name = 'n003'")
    assert conn.execute("SELECT COUNT(*) FROM macs WHERE node = 'n003'").fetchone()[0] == 0
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        conn.execute("INSERT INTO macs VALUES ('52:54:00:00:00:09', 'nope', 0)")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        conn.execute(f"INSERT INTO {RUN_NODES} VALUES (99, 'n001', 'ready', '', NULL, 1.0)")
    conn.close()


@pytest.mark.parametrize("statement", [
    "UPDATE nodes SET state = 'Ready' WHERE name = 'n001'",
    "UPDATE nodes SET state = 'down' WHERE name = 'n001'",
    "UPDATE nodes SET used = 2 WHERE name = 'n001'",
    "UPDATE runs SET state = 'cancelled' WHERE id = 1",
    "UPDATE runs SET mode = 'sometimes' WHERE id = 1",
    "UPDATE run_nodes SET state = 'off' WHERE run_id = 1",
    f"INSERT INTO {RUN_NODES} VALUES (1, 'n002', 'timed-out', '', NULL, 1.0)",
])
def test_state_columns_refuse_words_outside_the_vocabulary(release_1, statement):
    conn = db.connect(release_1)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute(statement)
    conn.close()


def test_every_state_the_code_writes_is_accepted(tmp_path):
    """The CHECK lists and the code's vocabulary move together (a new state needs a migration)."""
    conn = db.connect(tmp_path / "fresh.db")
    node_states = {"unknown", "off", *wiki.RUN_ACTIVE, *wiki.RUN_FINAL, *wiki.NODE_DOWN,
                   *pools.PROVISIONING_STATES, *pools.JOB_STATES, *pools.RUN_FINAL_STATES}
    for i, state in enumerate(sorted(node_states)):
        conn.execute("INSERT INTO nodes(name, state, used) VALUES (?, ?, ?)", (f"n{i}", state, i % 2))
    for mode in run.MODES:
        for state in ("running", "done", "failed"):
            conn.execute("INSERT INTO runs(label, mode, created, state) VALUES ('l', ?, 1.0, ?)",
                         (mode, state))
    for i, state in enumerate((*run.ACTIVE, *run.FINAL)):
        conn.execute(f"INSERT INTO {RUN_NODES} VALUES (1, ?, ?, '', NULL, 1.0)", (f"n{i}", state))
    assert conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == len(node_states)
    conn.close()


def test_old_data_outside_the_vocabulary_stops_the_upgrade_and_changes_nothing(tmp_path):
    path = tmp_path / "dynprov.db"
    make_release_1(path)
    fill(path, node_state="rebooting")
    before = dump(path)
    with pytest.raises(db.SchemaError, match=r"schema version 1 to \d+: migration 2 .*CHECK constraint "
                                             r"failed: state IN \('unknown', .*nothing was changed$"):
        db.connect(path)
    assert dump(path) == before
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'schema_version'").fetchone() is None
    conn.close()


def test_a_newer_database_is_refused_and_left_alone(release_1):
    conn = db.connect(release_1)
    conn.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (db.SCHEMA_VERSION + 1,))
    conn.close()
    before = dump(release_1)
    with pytest.raises(db.SchemaError, match=rf"schema version {db.SCHEMA_VERSION + 1}, newer than"):
        db.connect(release_1)
    assert dump(release_1) == before


def test_a_newer_legacy_style_database_is_refused(tmp_path):
    path = tmp_path / "dynprov.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(db.SchemaError, match="schema version 999, newer than this dynprov"):
        db.connect(path)


def test_the_commands_refuse_a_newer_database_with_exit_1(site):
    conn = db.connect(site.cfg.database)
    conn.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (db.SCHEMA_VERSION + 7,))
    conn.close()
    before = site.snapshot()
    proc = site.run("nodes", "list")
    assert proc.returncode == 1, proc.stderr
    assert "newer than this dynprov understands" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert site.snapshot() == before


def test_a_fresh_database_gets_every_migration(tmp_path):
    conn = db.connect(tmp_path / "new" / "dynprov.db")
    assert db.schema_version(conn) == db.SCHEMA_VERSION
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")] == \
        list(range(1, db.SCHEMA_VERSION + 1))
    assert conn.execute("SELECT name FROM pools").fetchall()[0][0] == "hpc"
    conn.close()
    assert db.connect(tmp_path / "missing.db", create=False).execute(
        "SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0


def test_concurrent_upgrades_apply_each_migration_once(release_1):
    before = rows(release_1)
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            db.connect(release_1).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert rows(release_1) == before
    conn = db.connect(release_1)
    assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == db.SCHEMA_VERSION
    conn.close()


def test_statement_splitter_keeps_semicolons_inside_strings_and_comments():
    sql = "CREATE TABLE t (x TEXT); -- a comment; with a semicolon\nINSERT INTO t VALUES ('a;b');\n"
    assert list(db.statements(sql)) == ["CREATE TABLE t (x TEXT);",
                                        "-- a comment; with a semicolon\nINSERT INTO t VALUES ('a;b');"]
    assert list(db.statements("INSERT INTO t VALUES ('a;b')")) == ["INSERT INTO t VALUES ('a;b');"]
    with pytest.raises(ValueError, match="incomplete"):
        list(db.statements("INSERT INTO t VALUES ('a;b)"))


def test_version_2_database_gets_the_installed_step_with_its_data(release_1):
    """Migration 3 (issue 16) from a version-2 database with data: every row survives and the
    stateful image's run step 'installed', refused by version 2, is accepted afterwards."""
    conn = sqlite3.connect(release_1, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(db._VERSION_TABLE)
    conn.execute("INSERT INTO schema_version VALUES (1, 'initial schema (found)', 0)")
    for statement in db.statements(db.MIGRATIONS[1].sql):  # frozen: never edited once on main
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (2, 'v2', 0)")
    conn.execute("PRAGMA user_version = 2")
    conn.execute("COMMIT")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute("UPDATE run_nodes SET state = 'installed' WHERE run_id = 2")
    conn.close()
    before = rows(release_1)
    conn = db.connect(release_1)
    assert db.schema_version(conn) == db.SCHEMA_VERSION >= 3
    conn.close()
    assert rows(release_1) == before
    conn = db.connect(release_1)
    conn.execute("UPDATE run_nodes SET state = 'installed' WHERE run_id = 2")
    conn.execute("UPDATE nodes SET state = 'installed' WHERE name = 'n003'")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        conn.execute("UPDATE run_nodes SET state = 'rebooting' WHERE run_id = 2")
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def test_migration_6_turns_images_into_version_1(tmp_path):
    """A version-5 database: each image becomes version 1 and nodes running it record it."""
    path = tmp_path / "v5.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(db._VERSION_TABLE)
    for m in db.MIGRATIONS[:5]:  # frozen: never edited once on main
        for statement in db.statements(m.sql):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, ?, 0)", (m.version, m.description))
    conn.execute("PRAGMA user_version = 5")
    conn.execute("INSERT INTO images(label, kernel_sha, initrd_sha, owner, created) "
                 "VALUES ('centos7', 'aa', 'bb', 'alice', 1.0)")
    conn.execute("INSERT INTO nodes(name, current_os) VALUES ('n001', 'centos7'), ('n002', NULL)")
    conn.execute("INSERT INTO runs(label, mode, created) VALUES ('centos7', 'ondemand', 1.0)")
    conn.execute("INSERT INTO run_nodes(run_id, node, state, updated) VALUES (1, 'n001', 'ready', 2.0)")
    conn.execute("COMMIT")
    conn.close()
    conn = db.connect(path)
    assert db.schema_version(conn) == db.SCHEMA_VERSION >= 6
    assert [tuple(r) for r in conn.execute(
        "SELECT label, version, kernel_sha, initrd_sha, owner, created FROM image_versions")] == \
        [("centos7", 1, "aa", "bb", "alice", 1.0)]
    assert conn.execute("SELECT version FROM images").fetchone()[0] == 1
    assert [tuple(r) for r in conn.execute("SELECT name, current_version FROM nodes ORDER BY 1")] \
        == [("n001", 1), ("n002", None)]
    assert conn.execute("SELECT image_version FROM run_nodes").fetchone()[0] is None
    conn.close()


def test_migration_8_keeps_the_nodes_and_starts_a_generation(tmp_path):
    """A version-7 database with nodes: they survive, each with its last per-node set-boot
    event's time as boot_set (recovery reads the same as before), a generation exists, and the
    triggers replace it on a facts write."""
    path = tmp_path / "v7.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(db._VERSION_TABLE)
    for m in db.MIGRATIONS[:7]:  # frozen: never edited once on main
        for statement in db.statements(m.sql):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, ?, 0)", (m.version, m.description))
    conn.execute("PRAGMA user_version = 7")
    conn.execute("INSERT INTO nodes(name, ip, boot_target, updated) "
                 "VALUES ('n001', '10.0.0.1', 'os', 3.0), ('n002', NULL, 'local', 4.0)")
    conn.execute("INSERT INTO macs(mac, node) VALUES ('52:54:00:00:00:01', 'n001')")
    conn.execute("INSERT INTO events(ts, node, kind, detail) VALUES (5.0, 'n001', 'set-boot', 'a'), "
                 "(6.0, 'n001', 'set-boot', 'b'), (7.0, 'n001', 'report-ready', ''), "
                 "(8.0, 'n002', 'set-boot-failed', 'x')")
    conn.execute("COMMIT")
    conn.close()
    conn = db.connect(path)
    assert db.schema_version(conn) == db.SCHEMA_VERSION >= 8
    assert [tuple(r) for r in conn.execute(
        "SELECT name, ip, boot_target, updated, boot_set FROM nodes ORDER BY 1")] == \
        [("n001", "10.0.0.1", "os", 3.0, 6.0), ("n002", None, "local", 4.0, None)]
    first = conn.execute("SELECT value FROM dhcp_generation").fetchall()
    assert len(first) == 1 and len(first[0][0]) == 16
    conn.execute("DELETE FROM macs")
    assert conn.execute("SELECT value FROM dhcp_generation").fetchone()[0] != first[0][0]
    conn.close()
