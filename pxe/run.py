"""The provisioning run: plan -> set boot -> power (netboot) -> watch. Knows no scheduler.

A run is one request ("these nodes, this OS label"); each node in it moves through the states of
pxe.states (requested -> power-cycled -> booting [-> installed] -> ready, or failed, timed out,
cancelled). Every step goes through pxe.states.transition (``run_nodes`` row, its time, an
``events`` row, and ``nodes.state`` mirroring it). Callers start runs through pxe.provision.

Who drives a run (the caller must not wait for boots, e.g. Moab's blocking OS-switch call):
    request() validates and records the run in one ``BEGIN IMMEDIATE`` transaction and returns.
    Then spawn_driver() starts a detached worker (``python -m pxe.run drive``, its own session,
    stdio to ``<state_dir>/run-driver.log``) unless one is already running. One driver per state
    directory, marked by an flock on ``<state_dir>/run-driver.lock``: the kernel drops it when the
    process dies, so a dead driver leaves no stale lock, and the next request starts a new one.
    A driver starts with reconcile(): what a stopped driver left half-done ends in a defined
    state. It picks up every ``requested`` node (requests that arrive while it is busy join the
    next batch: Moab's one-node-per-call default becomes one fan-out), renders their boot files
    (set_boot), sends ``netboot`` through the power fan-out, then watches: the server's call-home
    endpoint only records reports (pxe.reports) and calls notify(); the driver acts on them
    (follow_ups: "installed" -> next boot the disk, files and BMC; run ended -> safe default). It
    is the one actor that sets boot targets and power during a run. Deadlines are checked every
    second; each database change is announced (pxe.hooks: the scheduler faces rewrite their
    reports); it exits when no node is in a run and nothing is left to do. After releasing its
    lock it looks once more, so a request recorded while it was stopping is never left behind.

Several servers (pxe.segments): each run node is driven by the driver of its node's segment, and
only while that driver holds the node's claim in the database (pxe.claims: a lease it renews), so
drivers on several servers sharing one database never drive a node twice; the flock above only
keeps one host from starting two drivers of a segment. Drivers record heartbeats (pxe.servers).

Timeouts: each node's deadline is request time + the image's ``prov_seconds`` (capped by the
caller's ``max_seconds``: the Moab face passes PROVDURATION minus a margin, so that a node shows
Down with our reason before the scheduler gives up). The rule is pxe.states.is_overdue; whoever
writes next records it (the driver, the next request() or cancel(), wait()); readers show it
through pxe.states.effective without writing. A timed-out or failed node's next boot returns to
the safe default (local disk), so it cannot loop through an install; a timed-out node keeps its
token, so a late "ready" is still believed.

Per-job mode (``settings`` key ``run.mode`` = ``perjob``): every node of a request is re-imaged,
and a node that ran a job (mark_used(), from the workload manager's epilogue) counts as dirty until
its next re-image ("ready" clears the flag). On-demand mode (default): only nodes not already
running the label and healthy are re-imaged.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pxe import claims, db, hooks, segments, servers, states
from pxe.config import Config
from pxe.errors import DynprovError, InputError, NotFound
from pxe.reports import Outcome

log = logging.getLogger("dynprov.run")

MODES = ("perjob", "ondemand")
DEFAULT_MODE = "ondemand"
MODE_SETTING = states.MODE_SETTING
ACTIVE = states.ACTIVE  # requested, power-cycled, booting, installed
FINAL = states.FINAL  # ready, failed, timed out, cancelled
UNHEALTHY = (*states.DOWN, states.OFF, *ACTIVE)
POLL = 1.0  # seconds between the driver's full looks at the database
WAKE = 0.1  # seconds between its cheap looks for a commit (a report to act on)
FOLLOW_UP_GRACE = 60.0  # wait(): how long after the last deadline follow-ups may still run
MAX_DRIVE = 7 * 86400.0  # a driver never lives longer than this, whatever the deadlines say
CHANGE_LOOKBACK = 30.0  # seconds of nodes.updated re-read for the hook's changes (NodeChanges)
MAX_FAILURES = 300  # steps failing in a row (database gone or locked) before the driver quits
_CHUNK = 500


@dataclass(frozen=True)
class Refusal:
    node: str
    reason: str


@dataclass
class Request:
    """What request() did with each node."""

    label: str
    run_id: int | None = None
    started: list[str] = field(default_factory=list)  # new run nodes
    joined: dict[str, int] = field(default_factory=dict)  # already in a run for this label
    current: list[str] = field(default_factory=list)  # already running the label, healthy
    refused: list[Refusal] = field(default_factory=list)

    @property
    def accepted(self) -> list[str]:
        return [*self.started, *self.joined, *self.current]


# -- settings -------------------------------------------------------------------------------------
def get_mode(conn: sqlite3.Connection) -> str:
    mode = db.get_setting(conn, MODE_SETTING, DEFAULT_MODE)
    return mode if mode in MODES else DEFAULT_MODE


def set_mode(conn: sqlite3.Connection, mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"invalid mode {mode!r}: expected {' or '.join(MODES)}")
    with db.transaction(conn):
        db.set_setting(conn, MODE_SETTING, mode)
        db.log_event(conn, "run-mode", detail=mode)


def oslists(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """The labels a node may be switched to, by architecture (the image catalog)."""
    out: dict[str, list[str]] = {}
    for label, arch in conn.execute("SELECT label, arch FROM images ORDER BY label"):
        out.setdefault(arch, []).append(label)
    return out


# -- small helpers ----------------------------------------------------------------------------------
def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _marks(items: Sequence[Any]) -> str:
    return ",".join("?" * len(items))


_ACTIVE_SQL = states.ACTIVE_SQL


def _active_rows(conn: sqlite3.Connection, names: Sequence[str] | None = None
                 ) -> list[sqlite3.Row]:
    """Run nodes not yet final, in runs not finished: node, run_id, state, deadline, label."""
    sql = ("SELECT rn.node, rn.run_id, rn.state, rn.deadline, r.label FROM runs r "
           "JOIN run_nodes rn ON rn.run_id = r.id "
           f"WHERE r.finished IS NULL AND rn.state IN ({_ACTIVE_SQL})")
    if names is None:
        return conn.execute(sql).fetchall()
    rows: list[sqlite3.Row] = []
    for chunk in _chunks(names):
        rows += conn.execute(f"{sql} AND rn.node IN ({_marks(chunk)})", tuple(chunk)).fetchall()
    return rows


def _set_node(conn: sqlite3.Connection, run_id: int, node: str, state: str, reason: str = "",
              now: float | None = None, *, only_from: Sequence[str] | None = None,
              node_fields: dict[str, Any] | None = None) -> bool:
    """One step of one run node (pxe.states.transition, the one writer)."""
    return states.transition(conn, run_id, node, state, reason, now, only_from=only_from,
                             node_fields=node_fields)


def _finish_runs(conn: sqlite3.Connection, now: float | None = None) -> list[int]:
    """Close every open run whose nodes are all final: done if all ready, else failed."""
    now = time.time() if now is None else now
    closed = []
    for (run_id,) in conn.execute(
            "SELECT id FROM runs WHERE finished IS NULL AND NOT EXISTS (SELECT 1 FROM run_nodes "
            f"WHERE run_id = runs.id AND state IN ({_ACTIVE_SQL}))").fetchall():
        bad = conn.execute("SELECT COUNT(*) FROM run_nodes WHERE run_id = ? AND state != ?",
                           (run_id, states.READY)).fetchone()[0]
        state = states.RUN_FAILED if bad else states.RUN_DONE
        conn.execute("UPDATE runs SET state = ?, finished = ? WHERE id = ?", (state, now, run_id))
        db.log_event(conn, f"run-{state}", None, f"{bad} node(s) not ready" if bad else "",
                     run_id)
        closed.append(run_id)
    return closed


def _reset_boot(cfg: Config, conn: sqlite3.Connection, names: Sequence[str], *,
                keep_tokens: bool = False) -> str | None:
    """Send nodes back to the safe default (local disk). Never raises: returns why it could not
    (also logged as ``set-boot-failed`` events), None when done."""
    if not names:
        return None
    from pxe.inventory import Inventory
    from pxe.setboot import set_boot

    try:
        set_boot(cfg, list(names), None, Inventory(cfg, conn), keep_tokens=keep_tokens)
    except (DynprovError, OSError, sqlite3.Error) as exc:
        log.warning("cannot reset the boot of %s: %s", ",".join(names), exc)
        with db.transaction(conn):
            for name in names:
                db.log_event(conn, "set-boot-failed", name, str(exc))
        return str(exc)
    return None


# -- timeouts: whoever looks next --------------------------------------------------------------------
def _expire_rows(conn: sqlite3.Connection, now: float) -> list[str]:
    """Record every active run node past its deadline as timed out (caller holds a
    transaction); the rule is pxe.states.is_overdue, which readers apply without writing."""
    expired = []
    for row in conn.execute(
            "SELECT rn.node, rn.run_id, rn.state, rn.deadline, r.label FROM runs r "
            "JOIN run_nodes rn ON rn.run_id = r.id WHERE r.finished IS NULL "
            f"AND {states.overdue_sql('rn')}", (now,)).fetchall():
        if _set_node(conn, row["run_id"], row["node"], states.TIMED_OUT,
                     states.timeout_reason(row["label"], row["state"]), now):
            expired.append(row["node"])
    return expired


def expire(cfg: Config, conn: sqlite3.Connection, now: float | None = None) -> list[str]:
    """Record every timeout that is due, close finished runs; returns the nodes that timed out."""
    now = time.time() if now is None else now
    with db.transaction(conn):
        expired = _expire_rows(conn, now)
        _finish_runs(conn, now)
    _reset_boot(cfg, conn, expired, keep_tokens=True)
    return expired


# -- the request ---------------------------------------------------------------------------------------
def request(cfg: Config, conn: sqlite3.Connection, names: Sequence[str], label: str, *,
            mode: str | None = None, force: bool = False, max_seconds: float | None = None,
            pool: str | None = None) -> Request:
    """Check and record a provisioning request; returns at once (spawn_driver() does the work).

    Per node: unknown node, node outside ``pool`` (if given), label not for the node's
    architecture, or node in a run for another label -> refused with a reason. Node in a run for
    the same label -> joined (no second run). On-demand mode: node already running the label and
    healthy -> current (nothing to do) unless ``force``. The rest start one new run.
    """
    if not names:
        raise InputError("empty node list")
    now = time.time()
    result = Request(label=label)
    expired: list[str] = []
    with db.transaction(conn):
        expired = _expire_rows(conn, now)
        _finish_runs(conn, now)
        mode = mode or get_mode(conn)
        image = conn.execute("SELECT label, arch, prov_seconds FROM images WHERE label = ?",
                             (label,)).fetchone()
        rows: dict[str, sqlite3.Row] = {}
        for chunk in _chunks(list(names)):
            for r in conn.execute(
                    "SELECT name, arch, pool, state, current_os FROM nodes "
                    f"WHERE name IN ({_marks(chunk)})", tuple(chunk)):
                rows[r["name"]] = r
        active = {r["node"]: r for r in _active_rows(conn, list(rows))}
        labels = oslists(conn) if image is not None else {}
        to_start: list[str] = []
        for name in names:
            row = rows.get(name)
            if row is None:
                result.refused.append(Refusal(name, "unknown node"))
            elif image is None:
                result.refused.append(Refusal(name, f"unknown OS label {label!r}"))
            elif name in active:
                run = active[name]
                if run["label"] == label:
                    result.joined[name] = run["run_id"]
                else:
                    result.refused.append(Refusal(
                        name, f"in provisioning run {run['run_id']} for {run['label']} "
                              f"(step {run['state']}); refusing {label}"))
            elif pool is not None and row["pool"] != pool:
                result.refused.append(Refusal(
                    name, f"in pool {row['pool']}, not the scheduler's pool {pool}"))
            elif row["arch"] != image["arch"]:
                allowed = ",".join(labels.get(row["arch"], [])) or "none"
                result.refused.append(Refusal(
                    name, f"OS {label} is not in this node's OSLIST ({allowed}): it is for "
                          f"{image['arch']}, the node is {row['arch']}"))
            elif (mode == "ondemand" and not force and row["current_os"] == label
                  and row["state"] not in UNHEALTHY):
                result.current.append(name)
            else:
                to_start.append(name)
        if to_start:  # a running WoL machine nothing can reboot: say so now (pxe.power.reboot)
            from pxe.power import reboot

            for name, why in reboot.refusals(cfg, conn, to_start).items():
                to_start.remove(name)
                result.refused.append(Refusal(name, why))
        if to_start:
            seconds = float(image["prov_seconds"])
            if max_seconds is not None:
                seconds = min(seconds, max_seconds)
            deadline = now + max(1.0, seconds)
            run_id = states.enter(conn, label, mode, to_start, deadline, now,
                                  detail=f"{label} ({mode}, deadline {seconds:.0f} s)")
            result.run_id = run_id
            result.started = to_start
    _reset_boot(cfg, conn, expired, keep_tokens=True)
    return result


def cancel(cfg: Config, conn: sqlite3.Connection, names: Sequence[str]) -> list[str]:
    """End the nodes' active runs (``cancelled``) and send them back to the safe default."""
    now = time.time()
    cancelled = []
    with db.transaction(conn):
        _expire_rows(conn, now)
        for row in _active_rows(conn, list(names)):
            fields: dict[str, Any]
            if row["state"] == "requested":  # never power-cycled: its OS is intact
                fields = {"state": "unknown"}
            else:
                fields = {"state": "failed", "current_os": None}
            reason = f"provisioning of {row['label']} cancelled (run {row['run_id']})"
            if _set_node(conn, row["run_id"], row["node"], "cancelled", reason, now,
                         node_fields={**fields, "state_reason": reason}):
                cancelled.append(row["node"])
        _finish_runs(conn, now)
    _reset_boot(cfg, conn, cancelled)
    return cancelled


def mark_used(conn: sqlite3.Connection, names: Sequence[str], job: str = "") -> list[str]:
    """A job ended on these nodes (the workload manager's epilogue): dirty until re-imaged."""
    if not names:
        raise InputError("empty node list")
    with db.transaction(conn):
        known = set()
        for chunk in _chunks(list(names)):
            known |= {r[0] for r in conn.execute(
                f"SELECT name FROM nodes WHERE name IN ({_marks(chunk)})", tuple(chunk))}
        missing = [n for n in names if n not in known]
        if missing:
            raise NotFound(f"unknown node(s): {', '.join(missing)}")
        now = time.time()
        conn.executemany("UPDATE nodes SET used = 1, updated = ? WHERE name = ?",
                         [(now, n) for n in names])
        for name in names:
            db.log_event(conn, "job-ended", name, job)
    return list(names)


# -- power outside a run (the scheduler's power calls) ----------------------------------------------
POWER_ACTIONS = ("on", "off", "cycle")


def power(cfg: Config, conn: sqlite3.Connection, names: Sequence[str], action: str
          ) -> dict[str, str | None]:
    """Power nodes on, off or cycle them; node -> None (done) or the reason it failed.

    A node in a provisioning run is refused (the run owns its power). Off -> node state ``off``.
    On/cycle -> the node boots its safe default: the OS it had stays only if that image is
    stateful (a stateless OS lived in memory).
    """
    if action not in POWER_ACTIONS:
        raise InputError(f"invalid power action {action!r}: expected {', '.join(POWER_ACTIONS)}")
    expire(cfg, conn)
    out: dict[str, str | None] = {}
    rows = {}
    for chunk in _chunks(list(names)):
        for r in conn.execute(
                "SELECT n.name, n.state, n.current_os, i.mode FROM nodes n "
                f"LEFT JOIN images i ON i.label = n.current_os WHERE n.name IN ({_marks(chunk)})",
                tuple(chunk)):
            rows[r["name"]] = r
    busy = {r["node"]: r for r in _active_rows(conn, list(rows))}
    todo = []
    for name in names:
        if name not in rows:
            out[name] = "unknown node"
        elif name in busy:
            out[name] = f"in provisioning run {busy[name]['run_id']} ({busy[name]['state']})"
        else:
            todo.append(name)
    if todo:
        results, rest = _reboot_running(cfg, conn, todo) if action == "cycle" else ({}, todo)
        results.update(_power_run(cfg, rest, action) if rest else {})
        now = time.time()
        with db.transaction(conn):
            for name in todo:
                error = results[name]
                out[name] = error
                if error is not None:
                    db.log_event(conn, f"power-{action}-failed", name, error)
                    continue
                row = rows[name]
                if action == "off":
                    fields: dict[str, Any] = {"state": "off", "state_reason": "powered off"}
                else:
                    os_now = row["current_os"] if row["mode"] == "stateful" else None
                    fields = {"current_os": os_now}
                    if row["state"] not in ("failed", "timed out"):  # a failure stays shown
                        fields.update(state="ready" if os_now else "unknown", state_reason="")
                states.set_node(conn, name, now, **fields)
                db.log_event(conn, f"power-{action}", name)
    return {n: out[n] for n in names}


def _reboot_running(cfg: Config, conn: sqlite3.Connection, names: Sequence[str]
                    ) -> tuple[dict[str, str | None], list[str]]:
    """Running WoL nodes rebooted by their agent or the soft command (pxe.power.reboot); the
    rest left for the power fan-out."""
    if not names:
        return {}, []
    from pxe.power import reboot

    try:
        return reboot.reboot_running(cfg, conn, names)
    except Exception as exc:  # noqa: BLE001 - fails the nodes, not the run
        return {n: f"reboot: {exc}" for n in names}, []


def _power_run(cfg: Config, names: Sequence[str], action: str) -> dict[str, str | None]:
    """The power fan-out (pxe.power) as node -> None or "kind: error"; never raises."""
    try:
        from pxe import power as power_mod
        from pxe.nodeset import fold

        results = power_mod.run(cfg, fold(names), action)
    except Exception as exc:  # noqa: BLE001 - a broken power layer fails the nodes, not the run
        return {n: f"power {action}: {exc}" for n in names}
    out: dict[str, str | None] = {}
    for name in names:
        res = results.get(name)
        if res is None:
            out[name] = f"power {action}: no result"
        elif res.ok:
            out[name] = None
        else:
            kind = f"{res.kind}: " if getattr(res, "kind", None) else ""
            out[name] = f"power {action} failed: {kind}{res.error or 'unknown error'}"
    return out


# -- the driver -------------------------------------------------------------------------------------
def _lock_path(cfg: Config, segment: str = segments.PRIMARY, instance: str = "") -> Path:
    """run-driver.lock for the primary's segment, run-driver-<segment>[-<instance>].lock else."""
    parts = [p for p in (segment, instance) if p]
    if instance and not segment:
        parts.insert(0, "primary")
    return cfg.paths.state_dir / ("-".join(["run-driver", *parts]) + ".lock")


@contextlib.contextmanager
def _driver_lock(cfg: Config, segment: str = segments.PRIMARY, instance: str = "",
                 mark: bool = False) -> Iterator[bool]:
    """Try to become this host's driver of the segment: yields True with the flock held, False
    if another has it. ``mark`` writes our PID into the lock file (for admins: who drives).
    Only a guard against starting two drivers on one host: drivers of several hosts share the
    nodes through their claims (pxe.claims)."""
    path = _lock_path(cfg, segment, instance)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        if mark:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


def driver_running(cfg: Config, segment: str | None = None) -> bool:
    """Does this host run a driver of the segment (default: the config's)?"""
    with _driver_lock(cfg, segments.load(cfg, segment).name) as mine:
        return not mine


def spawn_driver(cfg: Config, segment: str | None = None) -> int | None:
    """Start a detached driver of the segment (default: the config's) unless one runs here;
    returns its PID (None if one was running)."""
    name = segments.load(cfg, segment).name
    if driver_running(cfg, name):
        return None
    logfile = cfg.paths.state_dir / "run-driver.log"
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pxe.run", "--config", str(Path(cfg.path).resolve()),
             *(["--segment", name] if name else []), "drive"],
            stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True,
            start_new_session=True, cwd="/",
            env={**os.environ, "DYNPROV_CONFIG": str(Path(cfg.path).resolve())})
    finally:
        os.close(fd)
    return proc.pid


def _requested(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return [r for r in _active_rows(conn) if r["state"] == states.REQUESTED]


def _launch(cfg: Config, conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> None:
    """Set boot and netboot the requested nodes, one batch per label."""
    from pxe.inventory import Inventory
    from pxe.setboot import set_boot

    by_label: dict[str, list[tuple[int, str]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append((row["run_id"], row["node"]))
    for label, members in by_label.items():
        run_of = dict((n, r) for r, n in members)
        names = [n for _, n in members]
        failed: dict[str, str] = {}
        try:
            set_boot(cfg, names, label, Inventory(cfg, conn))
        except (DynprovError, OSError) as exc:  # e.g. a node removed, a full TFTP root
            failed = {n: f"set-boot: {exc}" for n in names}
        # A node cancelled meanwhile is not powered.
        still = {r["node"] for r in _active_rows(conn, names) if r["state"] == states.REQUESTED}
        todo = [n for n in names if n in still and n not in failed]
        results, wake = _reboot_running(cfg, conn, todo)
        results.update(_power_run(cfg, wake, "netboot") if wake else {})
        now = time.time()
        with db.transaction(conn):
            for name in todo:
                if results[name] is None:
                    if not _set_node(conn, run_of[name], name, states.POWER_CYCLED, "", now,
                                     only_from=(states.REQUESTED,),
                                     node_fields={"current_os": None,
                                                  "state_reason": f"run {run_of[name]}: {label} "
                                                                  "power-cycled"}):
                        # The node called home before the BMC's answer was recorded (or was
                        # cancelled): keep its newer state, log the step all the same.
                        db.log_event(conn, "run-power-cycled", name,
                                     "recorded after the node had moved on", run_of[name])
                else:
                    failed[name] = results[name] or "power failed"
            for name, reason in failed.items():
                _set_node(conn, run_of[name], name, states.FAILED, reason, now)
            _finish_runs(conn, now)
        _reset_boot(cfg, conn, sorted(failed))
        log.info("run %s: %d node(s) power-cycled, %d failed", label,
                 len(todo) - len(set(todo) & set(failed)), len(failed))


# -- after an outage of the segment's boot server (pxe.servers.watch) -------------------------------
def _interrupted(conn: sqlite3.Connection, scope: Scope) -> list[sqlite3.Row]:
    """Nodes power-cycled while their segment's boot server was down (their PXE had nothing to
    talk to) that have not been sent to the network again since it came back."""
    rows = conn.execute(
        "SELECT rn.node, rn.run_id FROM run_nodes rn JOIN runs r ON r.id = rn.run_id "
        "WHERE r.finished IS NULL AND rn.state = ? AND EXISTS (SELECT 1 FROM events e "
        "WHERE e.node = rn.node AND e.run_id = rn.run_id AND e.kind = 'segment-up' "
        "AND NOT EXISTS (SELECT 1 FROM events f WHERE f.node = rn.node AND f.run_id = rn.run_id "
        "AND f.kind = 'run-power-retried' AND f.id > e.id)) ORDER BY rn.node",
        (states.POWER_CYCLED,)).fetchall()
    return scope.claimed(conn, rows)


def _retry_netboot(cfg: Config, conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> None:
    """Netboot them once more (same run step; its deadline still holds). A power failure is
    only logged: the deadline decides, as for any node that does not boot."""
    names = [r["node"] for r in rows]
    results = _power_run(cfg, names, "netboot")
    with db.transaction(conn):
        for row in rows:
            error = results[row["node"]]
            db.log_event(conn, "run-power-retried", row["node"],
                         error or "its segment's boot server is back: netboot again",
                         row["run_id"])
    log.info("netboot again after the boot server's outage: %s", ",".join(names))


# -- follow-ups: what recorded reports call for (the driver acts; the server only records) -------
class Scope:
    """What one driver drives: the nodes of its segment, those of them it holds the claim of."""

    def __init__(self, segment: str = segments.PRIMARY, driver: str | None = None,
                 lease: float = 30.0):
        self.segment = segment
        self.driver = driver
        self.lease = lease

    def rows(self, conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[sqlite3.Row]:
        """The rows (with a ``node`` column) of nodes in this segment."""
        if not rows:
            return []
        where = segments.of_nodes(conn, {r["node"] for r in rows})
        return [r for r in rows if where.get(r["node"], segments.PRIMARY) == self.segment]

    def claimed(self, conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]
                ) -> list[sqlite3.Row]:
        """The rows of this segment whose run node this driver holds (claiming them now)."""
        mine = self.rows(conn, rows)
        if self.driver is None or not mine:
            return mine
        held = claims.claim(conn, self.driver, [(r["run_id"], r["node"]) for r in mine],
                            self.lease)
        return [r for r in mine if (r["run_id"], r["node"]) in held]


ANY = None  # follow_ups()/pending() without a scope: every node (one driver per site)


def _installed(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Stateful nodes that wrote their disk and still boot from the network next."""
    return conn.execute(
        "SELECT rn.node, rn.run_id FROM run_nodes rn JOIN runs r ON r.id = rn.run_id "
        "JOIN nodes n ON n.name = rn.node WHERE r.finished IS NULL AND rn.state = ? "
        "AND n.boot_target = 'os' ORDER BY rn.node", (states.INSTALLED,)).fetchall()


def _left_on_network(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Nodes whose last run ended (ready, failed...) but whose next boot is still the network:
    nobody has set their boot since (``nodes.boot_set``, written by every set-boot: a boot set
    by hand afterwards is the admin's and stays), and no reset of it has failed since (those
    nodes were failed with the reason)."""
    return conn.execute(
        "SELECT rn.node, rn.run_id, rn.state FROM nodes n JOIN run_nodes rn ON rn.node = n.name "
        "WHERE n.boot_target = 'os' "
        "AND rn.run_id = (SELECT MAX(run_id) FROM run_nodes WHERE node = n.name) "
        f"AND rn.state IN ({states.FINAL_SQL}) "
        "AND (n.boot_set IS NULL OR n.boot_set < rn.updated) "
        "AND NOT EXISTS (SELECT 1 FROM events e WHERE e.node = n.name "
        "AND e.kind = 'set-boot-failed' AND e.ts >= rn.updated) "
        "ORDER BY rn.node").fetchall()


def _unsettled(cfg: Config, conn: sqlite3.Connection, names: Sequence[str]) -> list[str]:
    """Which of the nodes still wait for a follow-up (see follow_ups). Taken under the render
    lock: a set-boot in progress (boot target already changed, files not yet staged) is
    finished before the answer is "none"."""
    from pxe import atomic

    wanted = set(names)
    with atomic.locked(cfg.lock_path, shared=True):
        return sorted({r["node"] for r in (*_installed(conn), *_left_on_network(conn))
                       if r["node"] in wanted})


def pending(conn: sqlite3.Connection, scope: Scope | None = ANY) -> bool:
    """Is there a follow-up to do (a boot target to reset), in ``scope``'s segment if given?"""
    rows = [*_installed(conn), *_left_on_network(conn)]
    return bool(rows if scope is None else scope.rows(conn, rows))


def follow_ups(cfg: Config, conn: sqlite3.Connection, scope: Scope | None = ANY) -> list[str]:
    """Act on what nodes reported: "installed" -> next boot from the disk (files and BMC; the
    token stays for the installed system's "ready"); a run ended -> the safe default. A node
    whose boot cannot be reset is failed (Down) with the reason, never left to re-install.
    Returns the nodes acted on."""
    done: list[str] = []
    installed = _installed(conn)
    for row in installed if scope is None else scope.claimed(conn, installed):
        node, run_id = row["node"], row["run_id"]
        why = _reset_boot(cfg, conn, [node], keep_tokens=True)
        if why is None:
            error = _power_run(cfg, [node], "boot-disk")[node]
            if error:
                with db.transaction(conn):
                    db.log_event(conn, "power-boot-disk-failed", node, error, run_id)
        else:
            with db.transaction(conn):
                _set_node(conn, run_id, node, states.FAILED,
                          f"installed, but its next boot cannot be set to the disk: {why}")
                _finish_runs(conn)
        done.append(node)
    left = _left_on_network(conn)
    left = left if scope is None else scope.rows(conn, left)
    for timed_out in (True, False):  # a timed-out node keeps its token: a late "ready" counts
        names = [r["node"] for r in left if (r["state"] == states.TIMED_OUT) == timed_out]
        keep = timed_out
        why = _reset_boot(cfg, conn, names, keep_tokens=keep)
        if why is not None:
            now = time.time()
            with db.transaction(conn):
                for name in names:
                    states.set_node(conn, name, now, state=states.FAILED,
                                    state_reason="next boot still from the network, cannot "
                                                 f"reset it to the disk: {why}")
        done += names
    if done:
        with db.transaction(conn):
            _finish_runs(conn)
    return done


def reconcile(cfg: Config, conn: sqlite3.Connection, scope: Scope | None = ANY) -> list[str]:
    """A new driver's first step: end in a defined state what a stopped driver left half-done.

    Deadlines that passed meanwhile are recorded (timed out, next boot the disk); nodes whose
    run ended while no driver ran (a report recorded by the server) but whose next boot is still
    the network go back to the disk, or are failed (Down) with the reason; runs whose nodes are
    all final are closed. Requested nodes are launched by the driver's next step, as always.
    Returns the nodes it touched (each also gets a ``run-reconciled`` event)."""
    touched = expire(cfg, conn)
    touched += follow_ups(cfg, conn, scope)
    with db.transaction(conn):
        _finish_runs(conn)
        for name in sorted(set(touched)):
            db.log_event(conn, "run-reconciled", name, "found by a starting driver")
    if touched:
        log.info("reconciled after a stopped driver: %s", ", ".join(sorted(set(touched))))
    return touched


class NodeChanges:
    """Which nodes changed state since the last announcement (for hooks.Event.changes).

    Reads nodes.updated, written by several processes with their own clocks and committed a
    little after it was taken: rows are re-read for CHANGE_LOOKBACK seconds and each
    (node, updated, state) is reported once. The first read looks back as far, so a failure
    recorded just before this driver started (a node's report to the server) is reported too.
    """

    def __init__(self, now: float | None = None) -> None:
        self.since = (time.time() if now is None else now) - CHANGE_LOOKBACK
        self.seen: set[tuple[str, float, str]] = set()

    def take(self, conn: sqlite3.Connection) -> tuple[hooks.NodeChange, ...]:
        now = time.time()
        out = []
        rows = conn.execute("SELECT name, state, state_reason, updated FROM nodes "
                            "WHERE updated >= ? ORDER BY updated, name", (self.since,)).fetchall()
        for name, state, reason, updated in rows:
            key = (name, updated, state)
            if key not in self.seen:
                self.seen.add(key)
                out.append(hooks.NodeChange(name, state, reason))
        self.since = max(self.since, now - CHANGE_LOOKBACK)
        self.seen = {k for k in self.seen if k[1] >= self.since}
        return tuple(out)


def _announce(cfg: Config, conn: sqlite3.Connection, tracker: NodeChanges) -> None:
    try:
        changes = tracker.take(conn)
        hooks.announce(cfg, hooks.Event(hooks.NODES, tuple(dict.fromkeys(c.node for c in changes)),
                                        changes=changes))
    except Exception as exc:  # noqa: BLE001 - a face's trouble never stops the driver
        log.warning("announcing the state change failed: %s", exc)


def _nap(conn: sqlite3.Connection, seconds: float) -> None:
    """Sleep up to ``seconds``, waking early when another process commits (a node's report)."""
    end = time.monotonic() + seconds
    start = db.change_counter(conn)
    while time.monotonic() < end:
        time.sleep(min(WAKE, max(0.0, end - time.monotonic())))
        if db.change_counter(conn) != start:
            return


def drive(cfg: Config, *, poll: float = POLL, segment: str | None = None,
          instance: str = "") -> int:
    """Be the driver of a segment (default: the config's, see pxe.segments) until none of its
    nodes is in a run and nothing is left to do. Returns 0; 1 if another driver of the segment
    on this host holds the lock."""
    seg = segments.load(cfg, segment)
    me = claims.driver_name(seg.name)
    scope = Scope(seg.name, me, seg.stale_seconds)
    conn = db.connect(cfg.database)
    started = time.monotonic()
    last_key: str | None = None
    last_seen: tuple[tuple[int, str, str], ...] = ()
    last_beat = 0.0
    ran = False
    failures = 0
    changes = NodeChanges()
    while time.monotonic() - started < MAX_DRIVE:
        with _driver_lock(cfg, seg.name, instance, mark=True) as mine:
            if not mine:
                return 0 if ran else 1
            if not ran:
                log.info("driver %s started", me)
                try:
                    servers.beat(conn, me, servers.DRIVER, seg.name)
                    reconcile(cfg, conn, scope)
                except (sqlite3.Error, OSError) as exc:
                    log.error("reconciling failed (the loop retries): %s", exc)
            ran = True
            while time.monotonic() - started < MAX_DRIVE:
                try:
                    if time.monotonic() - last_beat >= seg.heartbeat_seconds:
                        servers.beat(conn, me, servers.DRIVER, seg.name)
                        claims.renew(conn, me, scope.lease)
                        last_beat = time.monotonic()
                    expire(cfg, conn)
                    requested = scope.claimed(conn, _requested(conn))
                    if requested:
                        _launch(cfg, conn, requested)
                    interrupted = _interrupted(conn, scope)
                    if interrupted:
                        _retry_netboot(cfg, conn, interrupted)
                    active = scope.rows(conn, _active_rows(conn))
                    # After reading ``active``: a node that became final meanwhile is seen here.
                    follow_ups(cfg, conn, scope)
                    todo = pending(conn, scope)
                except (sqlite3.Error, OSError) as exc:  # e.g. the database busy for 30 s
                    failures += 1
                    log.error("driver step failed (%d in a row), retrying: %s", failures, exc)
                    if failures >= MAX_FAILURES:
                        log.error("driver gives up; the next request starts a new one")
                        return 1
                    time.sleep(poll)
                    continue
                failures = 0
                seen = tuple(sorted((r["run_id"], r["node"], r["state"]) for r in active))
                if seen != last_seen and len(seen) <= 20:
                    log.info("in runs: %s", ", ".join(f"{n} {s} (run {r})" for r, n, s in seen)
                             or "none")
                last_seen = seen
                # Announced after reading ``active``: whatever made the last node final is
                # committed by then, so the last announcement carries the final state.
                # Keyed on the content stamp, which every content commit moves (ours and any
                # other process's) and heartbeats, leases and agent polls do not: a faces'
                # report (Moab's file) is rewritten when something changed, not every beat.
                key = db.content_stamp(conn)
                if key != last_key:
                    _announce(cfg, conn, changes)
                    last_key = key
                if not active and not todo:
                    break
                _nap(conn, poll)
        # Lock released. A request (or report) recorded while we were stopping found our lock
        # and started no driver; it committed before that, so it is visible now.
        if not scope.rows(conn, _requested(conn)) and not pending(conn, scope):
            break
    log.info("driver exits: no node of its segment in a run")
    with contextlib.suppress(sqlite3.Error):
        claims.release(conn, me)
        servers.stopped(conn, me)
    conn.close()
    return 0


def wait(cfg: Config, conn: sqlite3.Connection, names: Sequence[str], *, poll: float = 0.5
         ) -> dict[str, sqlite3.Row]:
    """Block until none of the nodes is in a run and the driver has acted on their last
    reports (bounded by their deadlines, plus FOLLOW_UP_GRACE); their last run rows."""
    end: float | None = None
    while True:
        expire(cfg, conn)
        active = _active_rows(conn, names)
        if active:
            deadline = max((r["deadline"] or 0.0) for r in active)
            time.sleep(max(0.05, min(poll, deadline - time.time() + 0.05)))
            continue
        left = _unsettled(cfg, conn, names)
        if not left:
            break
        end = end if end is not None else time.monotonic() + FOLLOW_UP_GRACE
        if time.monotonic() >= end:
            log.warning("no driver acted on %s's last report in time", ",".join(left))
            break
        if not driver_running(cfg):
            spawn_driver(cfg)
        time.sleep(min(poll, 0.2))
    return latest(conn, names)


def latest(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, sqlite3.Row]:
    """Each node's row of its most recent run (node, run_id, state, reason, deadline, label)."""
    out: dict[str, sqlite3.Row] = {}
    for chunk in _chunks(list(names)):
        for row in conn.execute(
                "SELECT rn.node, rn.run_id, rn.state, rn.reason, rn.deadline, rn.updated, r.label "
                "FROM run_nodes rn JOIN runs r ON r.id = rn.run_id "
                f"WHERE rn.node IN ({_marks(chunk)}) ORDER BY rn.run_id", tuple(chunk)):
            out[row["node"]] = row
    return out


def history(conn: sqlite3.Connection, run_id: int) -> list[sqlite3.Row]:
    """Every event of a run, in order: the timestamped transitions of each node."""
    return conn.execute("SELECT ts, node, kind, detail FROM events WHERE run_id = ? ORDER BY id",
                        (run_id,)).fetchall()


# -- what the call-home server calls after recording a report --------------------------------------
NEEDS_DRIVER = ("installed", "ready", "failed")


def notify(cfg: Config, outcome: Outcome) -> int | None:
    """A report was recorded: make sure a driver runs to act on it (the server never acts).

    The running driver wakes on the commit by itself; if none runs (it died, or the run ended
    and a late report came), one is started and reconciles. Returns its PID if one was started.
    """
    if outcome.kind not in NEEDS_DRIVER or driver_running(cfg):
        return None
    conn = db.connect(cfg.database)
    scope = Scope(segments.load(cfg).name)
    try:
        if not pending(conn, scope) and not scope.rows(conn, _active_rows(conn)):
            return None
    finally:
        conn.close()
    return spawn_driver(cfg)


# -- `python -m pxe.run`: the detached driver -------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    from pxe import config

    parser = argparse.ArgumentParser(
        prog="python -m pxe.run",
        description="The provisioning run's driver (started by os-switch; one per state dir).")
    parser.add_argument("--config", metavar="FILE", help="site configuration (TOML)")
    parser.add_argument("--segment", metavar="NAME",
                        help="drive this segment's nodes (default: [segment] name, else the "
                             "primary's)")
    parser.add_argument("--instance", metavar="NAME", default="",
                        help="a second driver of the segment on this host (failover drills, "
                             "tests): its own lock; the nodes are shared through claims")
    parser.add_argument("command", choices=("drive",))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s pxe.run[%(process)d]: %(levelname)s: %(message)s")
    try:
        if args.instance:
            from pxe import validate

            validate.label(args.instance, "driver instance")
        return drive(config.load(args.config), segment=args.segment, instance=args.instance)
    except DynprovError as exc:
        log.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
