"""The serve supervisor's beat: "this boot server is alive", the watch over the others, and a
driver for its own segment's runs (pxe.servers, pxe.segments).

Called from the supervisor's loop (the supervisor forks workers: only the prefetch, plain HTTP
and file writes, runs in a thread of its own). Every
``[segment] heartbeat_seconds`` it records the heartbeat, shows the run nodes of silent
segments Down (and those of segments back alive in their step again), tells the faces
(pxe.hooks), checkpoints SQLite's WAL (pxe.db.checkpoint), and (a service node) starts a run
driver for its segment when some of its run nodes have no live driver claim (the driver died, or
this server was restarted: it resumes its runs), and fetches the blobs its segment's runs will
boot (pxe.blobcache.prefetch). A database that fails is logged and tried again next beat:
serving boot files never depends on it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from pxe import blobcache, db, hooks, run, servers
from pxe.config import Config
from pxe.segments import SegmentSettings

log = logging.getLogger("dynprov.serve.heartbeat")


class Heartbeat:
    def __init__(self, cfg: Config, segment: SegmentSettings):
        self.cfg = cfg
        self.segment = segment
        self.name = servers.serve_name(segment.name)
        self.last = 0.0
        self.conn: sqlite3.Connection | None = None
        self.failing = False
        self.fetcher: threading.Thread | None = None

    def maybe(self) -> None:
        """One beat if it is due."""
        if time.monotonic() - self.last < self.segment.heartbeat_seconds:
            return
        self.last = time.monotonic()
        try:
            self._beat()
            if self.failing:
                log.info("state database reachable again")
            self.failing = False
        except (sqlite3.Error, OSError) as exc:
            if not self.failing:
                log.error("heartbeat: state database: %s (tried again every %g s)", exc,
                          self.segment.heartbeat_seconds)
            self.failing = True
            self._close()

    def _beat(self) -> None:
        if self.conn is None:
            self.conn = db.connect(self.cfg.database)
        conn = self.conn
        servers.beat(conn, self.name, servers.SERVE, self.segment.name)
        db.checkpoint(conn)  # the WAL copied back here, not in an admin's command (SQLite)
        down, back = servers.watch(conn, self.segment.stale_seconds)
        if down or back:
            self._announce(conn, [*down, *back])
        # The primary's drivers are started by requests and reports, as on a one-server site.
        if self.segment.name and self.segment.primary_url:
            self._prefetch(blobcache.needed(conn, self.segment.name))
        if self.segment.name and servers.waiting(conn, self.segment.name):
            pid = run.spawn_driver(self.cfg, self.segment.name)
            if pid is not None:
                log.info("started a run driver for segment %s (pid %d)",
                         self.segment.name or "(primary)", pid)

    def _prefetch(self, shas: set[str]) -> None:
        """Fetch the blobs the segment's runs need, in a thread (a fetch may take minutes; the
        beat must not wait for it). One round at a time."""
        roots = [self.cfg.paths.http_root, self.cfg.paths.tftp_root]
        if not shas or (self.fetcher is not None and self.fetcher.is_alive()):
            return
        if all((root / "blobs" / sha).exists() for root in roots for sha in shas):
            return
        self.fetcher = threading.Thread(target=blobcache.prefetch, args=(self.segment, roots, shas),
                                        name="dynprov-prefetch", daemon=True)
        self.fetcher.start()

    def _announce(self, conn: sqlite3.Connection, names: list[str]) -> None:
        marks = ",".join("?" * len(names))
        rows = conn.execute(f"SELECT name, state, state_reason FROM nodes WHERE name IN ({marks})",
                            names).fetchall()
        changes = tuple(hooks.NodeChange(r[0], r[1], r[2]) for r in rows)
        try:
            hooks.announce(self.cfg, hooks.Event(hooks.NODES, tuple(names), changes=changes))
        except Exception as exc:  # noqa: BLE001 - a face's trouble never stops the server
            log.warning("announcing the state change failed: %s", exc)

    def stop(self) -> None:
        """A clean stop: other servers see this one stopped at once (no staleness to wait)."""
        try:
            if self.conn is None:
                self.conn = db.connect(self.cfg.database)
            servers.stopped(self.conn, self.name)
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot record the stop: %s", exc)
        self._close()

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
