"""Moving a site's state from its SQLite file to PostgreSQL (`pxe-stage state copy`).

A site that outgrows one boot server moves to the shared store ([state] url) without losing its
nodes, images and their versions, run history, pools, segments, settings...: every table the
schema has (read from the file, never a list here, so a new migration's table comes along).

All or nothing. The source's write lock (BEGIN IMMEDIATE) is held from the liveness check to the
end, so nothing changes while copying; a live serve or run driver (a fresh heartbeat, an unexpired
claim) refuses the copy. On PostgreSQL one transaction drops the previous dynprov tables (only with
--replace when they hold data), creates the schema through dbbackend_pg's own migration path,
COPYs each table in foreign-key order, moves the identity sequences past the copied ids, and
compares each table's row count and checksum with the source before COMMIT; any failure rolls
the target back to what it was. The URL's password is never shown (db.where).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pxe import db
from pxe.errors import DynprovError, InputError

BATCH = 5000  # rows read from the source / fetched back from PostgreSQL at a time
_BOOKKEEPING = ("schema_version", "dynprov_stamp")  # each store writes its own
# Kept by triggers on other tables (db migrations 8 and 9: nodes, macs, node_segments) or seeded
# by a fresh schema: not "held", and copied after those tables so the source's values land (the
# installed DHCP record names the source's generation and change numbers).
_TRIGGER_KEPT = ("dhcp_generation", "dhcp_changes")
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_MODULUS = 1 << 256
_FLOAT_TYPES = frozenset({"double precision", "real", "numeric"})
_INT_TYPES = frozenset({"bigint", "integer", "smallint"})


@dataclass(frozen=True)
class TableCopy:
    """One table: rows read from the source, rows found in the target, the common checksum."""

    name: str
    rows: int
    copied: int
    checksum: str


@dataclass(frozen=True)
class CopyResult:
    source: str
    target: str  # without the password
    version: int
    tables: list[TableCopy]
    dropped: list[tuple[str, int]] = field(default_factory=list)  # --replace: table, rows before

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


class CopyFailed(DynprovError):
    """The copy stopped; the target was rolled back to what it was (exit 1)."""


# -- the source ---------------------------------------------------------------------------------
def open_source(path: Path) -> sqlite3.Connection:
    """The SQLite file, upgraded to this dynprov's schema as any command would; never created."""
    if not path.is_file():
        raise InputError(f"--from {path}: no such file (the SQLite state database, "
                         "STATE_DIR/dynprov.db)")
    try:
        conn = db.connect(path, create=False)
    except sqlite3.DatabaseError as exc:
        raise InputError(f"--from {path}: not an SQLite state database ({exc})") from None
    if db.schema_version(conn) == 0:
        conn.close()
        raise InputError(f"--from {path}: not a dynprov state database (no schema)")
    return conn


def source_tables(conn: sqlite3.Connection) -> list[str]:
    """Every table of the file's schema (what its migrations built), bookkeeping aside."""
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name")]
    return [_checked_name(n) for n in names if n not in _BOOKKEEPING]


def live_writers(conn: Any, stale_seconds: float, now: float) -> list[str]:
    """Serve processes and run drivers that beat within ``stale_seconds`` and did not stop, and
    run-node claims whose lease runs: whoever could write while we copy."""
    out = [f"{r[0]} (heartbeat {now - r[1]:.0f} s ago)" for r in conn.execute(
        "SELECT name, heartbeat FROM servers WHERE stopped IS NULL AND heartbeat >= ? "
        "ORDER BY name", (now - stale_seconds,))]
    nodes, drivers, first = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT driver), MIN(driver) FROM run_claims WHERE expires > ?",
        (now,)).fetchone()
    if nodes:
        out.append(f"{nodes} run node(s) claimed by {first}"
                   + (f" and {drivers - 1} other driver(s)" if drivers > 1 else ""))
    return out


def _sequence_floor(conn: sqlite3.Connection, table: str) -> int:
    """AUTOINCREMENT's high-water mark: ids of deleted rows are never handed out again."""
    has = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone()
    if not has:
        return 0
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return int(row[0]) if row else 0


# -- the target ---------------------------------------------------------------------------------
def _checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise CopyFailed(f"unexpected table or column name {name!r}; nothing was copied")
    return name


def _q(name: str) -> str:
    return '"' + _checked_name(name) + '"'


def target_tables(raw: Any) -> list[str]:
    return [r[0] for r in raw.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
        "AND table_type = 'BASE TABLE' ORDER BY table_name")]


def target_columns(raw: Any, table: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in raw.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,))]


def dependency_order(raw: Any, tables: Sequence[str]) -> list[str]:
    """Referenced tables first (the target's foreign keys); ties by name."""
    wanted = set(tables)
    needs: dict[str, set[str]] = {t: set() for t in tables}
    for child, parent in raw.execute(
            "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE c.contype = 'f' AND n.nspname = current_schema()"):
        child, parent = child.strip('"'), parent.strip('"')
        if child in wanted and parent in wanted and child != parent:
            needs[child].add(parent)
    order: list[str] = []
    while needs:
        ready = sorted(t for t, deps in needs.items() if not deps - set(order))
        if not ready:
            raise CopyFailed(f"the foreign keys of tables {', '.join(sorted(needs))} form a "
                             "cycle; nothing was copied")
        order += ready
        for t in ready:
            del needs[t]
    return order


def _held_rows(raw: Any, tables: Iterable[str]) -> list[tuple[str, int]]:
    """The target's dynprov tables with rows, leaving aside what a fresh schema holds itself
    (its version rows, its change stamp, the default pool)."""
    out = []
    for table in tables:
        if table in _BOOKKEEPING or table in _TRIGGER_KEPT:
            continue
        extra = " WHERE name <> 'hpc'" if table == "pools" else ""
        n = int(raw.execute(f"SELECT COUNT(*) FROM {_q(table)}{extra}").fetchone()[0])
        if n:
            out.append((table, n))
    return out


def _counts(raw: Any, tables: Iterable[str]) -> list[tuple[str, int]]:
    return [(t, int(raw.execute(f"SELECT COUNT(*) FROM {_q(t)}").fetchone()[0])) for t in tables]


# -- checksums: one per table, independent of row order (the stores may sort text differently) --
def _canonical(value: Any, kind: str) -> tuple[str, str]:
    """A value as both stores give it back, typed by the target's column: floats exactly."""
    if value is None:
        return ("n", "")
    if kind in _FLOAT_TYPES and isinstance(value, int | float):
        return ("f", float(value).hex())
    if kind in _INT_TYPES and isinstance(value, int):
        return ("i", str(value))
    if isinstance(value, str):
        return ("s", value)
    return (type(value).__name__, repr(value))


class Checksum:
    """The sum of the rows' SHA-256 digests modulo 2**256: equal multisets of rows, equal sums."""

    def __init__(self, kinds: Sequence[str]):
        self._kinds = kinds
        self.total = 0
        self.rows = 0

    def add(self, row: Sequence[Any]) -> None:
        text = repr(tuple(_canonical(v, k) for v, k in zip(row, self._kinds, strict=True)))
        self.total = (self.total + int.from_bytes(hashlib.sha256(text.encode()).digest(),
                                                  "big")) % _MODULUS
        self.rows += 1

    @property
    def hex(self) -> str:
        return f"{self.total:064x}"


def _source_rows(conn: sqlite3.Connection, table: str, columns: Sequence[str]
                 ) -> Iterator[tuple[Any, ...]]:
    cur = conn.cursor()
    cur.row_factory = None
    cur.execute(f"SELECT {', '.join(_q(c) for c in columns)} FROM {_q(table)}")
    while batch := cur.fetchmany(BATCH):
        yield from batch


def _target_checksum(raw: Any, table: str, columns: Sequence[str], kinds: Sequence[str]
                     ) -> Checksum:
    """Read back what landed (a server-side cursor: a large events table is never held whole)."""
    check = Checksum(kinds)
    with raw.cursor(name=f"dynprov_verify_{table}") as cur:
        cur.itersize = BATCH
        cur.execute(f"SELECT {', '.join(_q(c) for c in columns)} FROM {_q(table)}")
        for row in cur:
            check.add(tuple(row))
    return check


# -- the copy ------------------------------------------------------------------------------------
def copy(source: Path, url: str, *, replace: bool = False, stale_seconds: float = 30.0
         ) -> CopyResult:
    """Copy the SQLite state file ``source`` into the PostgreSQL store ``url`` (validated by the
    caller as [state] url is)."""
    where = db.where(url)
    src = open_source(source)
    try:
        src.execute("BEGIN IMMEDIATE")  # nobody writes the file until we are done
        try:
            live = live_writers(src, stale_seconds, time.time())
            if live:
                raise DynprovError(
                    f"{source}: {len(live)} writer(s) active on the source: {'; '.join(live)}; "
                    "stop every pxe-stage serve and run driver of this site (systemctl stop "
                    "dynprov-serve), wait for their runs to end, then copy; nothing was copied")
            tables = source_tables(src)
            version = db.schema_version(src)
            return _copy_into(src, source, url, where, tables, version, replace, stale_seconds)
        finally:
            src.execute("ROLLBACK")  # read only: nothing to keep
    finally:
        src.close()


def _copy_into(src: sqlite3.Connection, source: Path, url: str, where: str, tables: list[str],
               version: int, replace: bool, stale_seconds: float) -> CopyResult:
    import psycopg

    from pxe import dbbackend_pg

    pg = dbbackend_pg.PgConnection(url)
    raw = pg.raw
    try:
        try:
            with raw.transaction():
                raw.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                            (dbbackend_pg.WRITE_LOCK, pg.lock_space))
                dropped = _clear_target(pg, raw, where, tables, replace, stale_seconds)
                dbbackend_pg.migrate(pg)  # inside our transaction: a savepoint, no COMMIT
                found = dbbackend_pg.schema_version(pg)
                if found != version:
                    raise CopyFailed(f"{where}: the schema was created at version {found}, the "
                                     f"source is at {version}; nothing was copied")
                result = _copy_tables(src, raw, where, tables)
                _reset_identities(src, raw)
                raw.execute("UPDATE dynprov_stamp SET value = %s WHERE id = 1",
                            (dbbackend_pg.new_stamp(),))
        except (psycopg.Error, db.Error) as exc:  # (db.Error: either store, translated)
            raise CopyFailed(f"{where}: the copy failed and was rolled back, the target is as it "
                             f"was: {' '.join(str(exc).split())}") from None
    finally:
        pg.close()
    return CopyResult(str(source), where, version, result, dropped)


def _clear_target(pg: Any, raw: Any, where: str, tables: list[str], replace: bool,
                  stale_seconds: float) -> list[tuple[str, int]]:
    """Refuse a target that holds a dynprov state (unless --replace) or a newer schema, or has
    live writers of its own; drop the dynprov tables it has. Returns what held rows."""
    from pxe import dbbackend_pg

    found = dbbackend_pg.schema_version(pg)
    if found > db.SCHEMA_VERSION:
        raise CopyFailed(f"{where}: holds a state of schema version {found}, written by a newer "
                         f"dynprov (this one: {db.SCHEMA_VERSION}); nothing was changed")
    present = set(target_tables(raw))
    ours = sorted(present & {*tables, *_BOOKKEEPING})
    if not ours:
        return []
    held = _held_rows(raw, ours)
    if held and "servers" in present:
        live = live_writers(pg, stale_seconds, time.time())
        if live:
            raise CopyFailed(f"{where}: the target is in use: {'; '.join(live)}; nothing was "
                             "changed")
    if held and not replace:
        shown = ", ".join(f"{t} {n}" for t, n in sorted(held, key=lambda h: -h[1]))
        raise CopyFailed(f"{where}: already holds a dynprov state; --replace drops its dynprov "
                         f"tables and copies over them; nothing was changed (rows: {shown})")
    dropped = _counts(raw, [t for t in ours if t not in _BOOKKEEPING]) if held else []
    raw.execute("DROP TABLE " + ", ".join(_q(t) for t in ours))
    return dropped


def _copy_tables(src: sqlite3.Connection, raw: Any, where: str, tables: list[str]
                 ) -> list[TableCopy]:
    missing = sorted(set(tables) - set(target_tables(raw)))  # (other tables may live there)
    if missing:
        raise CopyFailed(f"{where}: the schema created lacks the source's tables "
                         f"{', '.join(missing)}; nothing was copied")
    done: list[TableCopy] = []
    order = dependency_order(raw, tables)
    for table in [t for t in order if t not in _TRIGGER_KEPT] + [t for t in order
                                                                  if t in _TRIGGER_KEPT]:
        columns = target_columns(raw, table)
        names = [c for c, _ in columns]
        kinds = [k for _, k in columns]
        have = {d[0] for d in src.execute(f"SELECT * FROM {_q(table)} LIMIT 0").description}
        if set(names) != have:
            raise CopyFailed(f"{where}: table {table} has columns {sorted(have ^ set(names))} on "
                             "one side only; nothing was copied")
        raw.execute(f"DELETE FROM {_q(table)}")  # what the schema seeds (the default pool)
        source_sum = Checksum(kinds)
        with raw.cursor() as cur, cur.copy(
                f"COPY {_q(table)} ({', '.join(_q(c) for c in names)}) FROM STDIN") as pipe:
            for row in _source_rows(src, table, names):
                source_sum.add(row)
                pipe.write_row(row)
        counted = int(src.execute(f"SELECT COUNT(*) FROM {_q(table)}").fetchone()[0])
        landed = _target_checksum(raw, table, names, kinds)
        if not (counted == source_sum.rows == landed.rows and source_sum.hex == landed.hex):
            raise CopyFailed(f"{where}: table {table}: {counted} rows in the source, "
                             f"{landed.rows} in the target, checksums "
                             f"{source_sum.hex[:12]} / {landed.hex[:12]}; rolled back, the "
                             "target is as it was")
        done.append(TableCopy(table, counted, landed.rows, landed.hex))
    return done


def _reset_identities(src: sqlite3.Connection, raw: Any) -> None:
    """Identity columns continue after the copied ids (and after SQLite's high-water mark)."""
    for table, column in raw.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND (is_identity = 'YES' "
            "OR column_default LIKE 'nextval(%')").fetchall():
        top = raw.execute(f"SELECT COALESCE(MAX({_q(column)}), 0) FROM {_q(table)}").fetchone()[0]
        start = max(int(top), _sequence_floor(src, table)) + 1
        raw.execute("SELECT setval(pg_get_serial_sequence(%s, %s), %s, false)",
                    (_q(table), column, start))
