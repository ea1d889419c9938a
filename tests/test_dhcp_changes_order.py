"""PostgreSQL's DHCP change numbers (dhcp_changes, migrations 9 and 10) follow commit order for
every writer, also one that does not take the writers' lock (raw SQL by an admin): its trigger
takes the lock and waits for our writer's COMMIT, so a render that has read a number never sees
a lower one committed after it (pxe.dhcpincremental would miss that change for good).
Runs on the run's throw-away PostgreSQL cluster whatever DYNPROV_TEST_STATE says (SQLite has one
write lock for every writer: nothing to show there)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pg_support
import psycopg
import pytest

from pxe import db, dbbackend_pg, dhcpinputs

WAIT_SECONDS = 20.0  # bound on every wait below (a loaded machine is slow, never this slow)


@pytest.fixture
def store(request, monkeypatch) -> Iterator[str]:
    """A fresh store: created at today's version, or (param "upgraded") at migration 9 and then
    upgraded by db.connect, as an existing site's database is."""
    cluster = pg_support.shared()
    url = cluster.new_store()
    try:
        if getattr(request, "param", "fresh") == "upgraded":
            with monkeypatch.context() as m:
                m.setattr(db, "MIGRATIONS", db.MIGRATIONS[:9])
                m.setattr(db, "SCHEMA_VERSION", 9)
                db.connect(url).close()
                assert not _function_locks(url)  # migration 9's function: no lock
        conn = db.connect(url)
        with db.transaction(conn):
            conn.execute("INSERT INTO nodes(name, ip) VALUES ('a', '10.0.0.1'), "
                         "('b', '10.0.0.2')")
        conn.close()
        yield url
    finally:
        cluster.drop_store(url)


def _function_locks(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as raw:
        text = raw.execute("SELECT pg_get_functiondef('dynprov_dhcp_change'::regproc)"
                           ).fetchone()[0]
    return "pg_advisory_xact_lock" in text


def _seqs(conn) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {r[0]: int(r[1]) for r in conn.execute("SELECT node, seq FROM dhcp_changes")}


def _lock_waited_on(admin: psycopg.Connection, pid: int) -> tuple[str, str] | None:
    """The kind of lock backend ``pid`` waits for now (("Lock", "advisory")...), or None."""
    row = admin.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity "
                        "WHERE pid = %s", (pid,)).fetchone()
    return (row[0], row[1]) if row is not None and row[0] == "Lock" else None


@pytest.mark.integration
@pytest.mark.parametrize("store", ["fresh", "upgraded"], indirect=True)
def test_a_writer_without_our_lock_numbers_after_our_commit(store: str):
    ours = db.connect(store)
    raw = psycopg.connect(store)  # a plain client: BEGIN ... COMMIT, no advisory lock of ours
    admin = psycopg.connect(store, autocommit=True)
    raw_pid = raw.info.backend_pid
    done = threading.Event()
    failure: list[BaseException] = []

    def raw_writer() -> None:
        try:
            raw.execute("UPDATE nodes SET ip = '10.0.0.12' WHERE name = 'b'")
            raw.commit()
        except BaseException as exc:  # shown by the main thread
            failure.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=raw_writer)
    try:
        assert _function_locks(store)
        with db.transaction(ours):
            ours.execute("UPDATE nodes SET ip = '10.0.0.11' WHERE name = 'a'")
            worker.start()
            deadline = time.monotonic() + WAIT_SECONDS
            waited = None
            while not done.is_set() and waited is None and time.monotonic() < deadline:
                time.sleep(0.05)
                waited = _lock_waited_on(admin, raw_pid)
        assert done.wait(WAIT_SECONDS), "the raw writer still waits after our COMMIT"
        assert not failure, failure
        seqs = _seqs(ours)
        # Without the lock in the trigger the raw writer numbered from the MAX it saw while
        # ours was not committed yet (then queued on the dhcp_generation row, or committed):
        # both got the same number, and a render that read b's would never re-render 'a'.
        assert seqs["a"] < seqs["b"] == dhcpinputs.change_number(ours), seqs
        assert waited == ("Lock", "advisory")  # it queued on the writers' lock, in the trigger
        # What a render that read after our commit (mark = a's number) re-reads: b, later.
        assert dhcpinputs.changed_since(ours, seqs["a"], 10) == ["b"]
    finally:
        worker.join(WAIT_SECONDS)
        for c in (ours, raw, admin):
            c.close()


@pytest.mark.integration
def test_a_repeatable_read_writer_is_refused_and_writes_nothing(store: str):
    """Its snapshot may predate the lock (MAX + 1 from an old view): one clear error instead."""
    conn = db.connect(store)
    before = _seqs(conn)
    with psycopg.connect(store) as raw:
        raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                           match=r"must run at READ COMMITTED isolation, not REPEATABLE READ"):
            raw.execute("UPDATE nodes SET ip = '10.0.0.13' WHERE name = 'b'")
        raw.rollback()
    assert _seqs(conn) == before
    assert conn.execute("SELECT ip FROM nodes WHERE name = 'b'").fetchone()[0] == "10.0.0.2"
    conn.close()


@pytest.mark.integration
def test_our_writers_run_read_committed_whatever_the_session_default(store: str):
    """A site whose database defaults to SERIALIZABLE still writes (our BEGIN says which)."""
    conn = db.connect(store + "%20-cdefault_transaction_isolation%3Dserializable")
    assert conn.execute("SHOW default_transaction_isolation").fetchone()[0] == "serializable"
    before = _seqs(conn)
    with db.transaction(conn):
        conn.execute("UPDATE nodes SET ip = '10.0.0.14' WHERE name = 'b'")
    assert _seqs(conn)["b"] == dhcpinputs.change_number(conn) > max(before.values())
    # psycopg's own transactions (executemany outside one; pxe.statecopy's copy) as well
    conn.executemany("INSERT INTO nodes(name) VALUES (?)", [("c",), ("d",)])
    seqs = _seqs(conn)
    assert seqs["b"] < seqs["c"] < seqs["d"] == dhcpinputs.change_number(conn)
    conn.close()


@pytest.mark.unit
def test_sqlite_migration_10_changes_nothing():
    assert db.MIGRATIONS[9].version == 10
    assert list(db.statements(db.MIGRATIONS[9].sql)) == []
    assert 10 in dbbackend_pg.PG_MIGRATIONS
