"""SQLite's WAL is copied back into the database file by `serve`'s heartbeat (pxe.db.checkpoint),
not by an admin's command: with serve's connection open, a command's close does not checkpoint,
so without the heartbeat's checkpoint the file would never catch up. Read through an
``immutable`` connection, which ignores the WAL: it sees only what was checkpointed. SQLite
only (conftest.SQLITE_ONLY)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_power_support import add_nodes
from test_run_support import add_images

from pxe import db, segments
from pxe.serve.heartbeat import Heartbeat
from pxe.setboot import set_boot
from tests.conftest import Site

MACS = {"n001": "52:54:00:33:00:01", "n002": "52:54:00:33:00:02"}


def _in_file(path: Path) -> dict[str, str]:
    """Boot targets as the database file alone holds them (the WAL ignored)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return dict(conn.execute("SELECT name, boot_target FROM nodes"))
    finally:
        conn.close()


@pytest.mark.unit
def test_the_heartbeat_copies_a_commands_writes_into_the_database_file(site: Site,
                                                                       tmp_path: Path) -> None:
    cfg = site.cfg
    add_nodes(cfg, [{"name": n, "mac": m} for n, m in MACS.items()])
    add_images(cfg, tmp_path, centos5={})
    beat = Heartbeat(cfg, segments.load(cfg))
    beat.maybe()  # serve's connection, open from here on (as while serve runs)
    assert beat.conn is not None
    before = _in_file(cfg.database)
    assert set(before.values()) == {"local"}

    set_boot(cfg, "n[001-002]", "centos5")  # a command: its own connection, closed at its end
    assert _in_file(cfg.database) == before, "the command's close checkpointed (serve was open)"

    beat.last = 0.0  # the next beat is due
    beat.maybe()
    assert _in_file(cfg.database) == {"n001": "os", "n002": "os"}
    beat.stop()


@pytest.mark.unit
def test_checkpoint_reports_the_frames_it_copied(site: Site) -> None:
    add_nodes(site.cfg, [{"name": "n001", "mac": MACS["n001"]}])
    conn = db.connect(site.cfg.database)
    try:
        with db.transaction(conn):
            conn.execute("UPDATE nodes SET groups = 'g1' WHERE name = 'n001'")
        busy, frames, copied = db.checkpoint(conn)
        assert (busy, frames == copied, frames > 0) == (0, True, True)
    finally:
        conn.close()
