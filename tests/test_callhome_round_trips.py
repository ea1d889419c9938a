"""A call-home report on PostgreSQL costs few round trips: each one is a wait on the network
(and on a loaded server), and a boot storm sends thousands of reports. Counted on the wire
(libpq's protocol trace: one ReadyForQuery per round trip), not timed."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator

import pg_support
import pytest

from pxe import db, reports

# BEGIN + lock + the one read (one pipeline), the agent, the node, the event, COMMIT + stamp.
BUDGET = 5


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    yield pg_support.shared().new_store()


def _round_trips(conn, call) -> int:  # type: ignore[no-untyped-def]
    raw = conn._raw()
    fd, path = tempfile.mkstemp(prefix="dynprov-trace-")
    try:
        raw.pgconn.trace(fd)
        try:
            call()
        finally:
            raw.pgconn.untrace()
        with open(path, encoding="utf-8", errors="replace") as fh:
            return sum(1 for line in fh if "\tReadyForQuery" in line)
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.integration
def test_a_ready_report_costs_at_most_the_budgeted_round_trips(url: str) -> None:
    conn = db.connect(url)
    now = time.time()
    with db.transaction(conn):
        conn.execute("INSERT INTO images(label, os_name, kernel_sha, created) "
                     "VALUES ('centos5', 'centos5', ?, ?)", ("0" * 64, now))
        conn.execute("INSERT INTO nodes(name, state, desired_os, boot_token, updated) "
                     "VALUES ('n1', 'booting', 'centos5', 'tok-1', ?)", (now,))
    stamp = db.change_counter(conn)
    trips = _round_trips(conn, lambda: reports.record_report(conn, "n1", "tok-1", "ready"))
    assert 0 < trips <= BUDGET, trips
    # ... and it recorded all of it, in one transaction that moved the stamp.
    row = conn.execute("SELECT state, current_os, current_version, boot_token FROM nodes "
                       "WHERE name = 'n1'").fetchone()
    assert tuple(row) == ("ready", "centos5", 1, None)
    assert conn.execute("SELECT COUNT(*) FROM agents WHERE node = 'n1'").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM events WHERE node = 'n1' "
                        "AND kind = 'report-ready'").fetchone()[0] == 1
    assert db.change_counter(conn) != stamp
    conn.close()
