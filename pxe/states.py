"""Run and node states: the one vocabulary, the allowed steps, the one writer, "timed out".

A provisioning run moves each of its nodes through
    requested -> power-cycled -> booting [-> installed] -> ready
or ends ``failed`` (the node's own reason, or the power step's), ``timed out`` (no final report
before its deadline) or ``cancelled``. ``installed`` is the stateful image's step: the disk is
written and the node reboots into it, so its next boot must be the disk.

``nodes.state`` mirrors the node's step while it is in a run (the same words) and keeps the final
word afterwards; outside runs it is also ``unknown`` (never seen) or ``off`` (powered off by us),
and the workload side may write ``busy``/``running`` (pxe.pools reads those).

Writers: enter() starts a run and transition() is the only code that changes a run node's state
afterwards (pxe.run for the driver's steps, pxe.reports for what a node reports); set_node()
writes a node's state outside runs (off, unknown: pxe.run.power). Readers that must not write
(the Moab report, the status page, ``pxe-stage run list``) show a node past its deadline as timed
out through effective(); the writer records it through overdue_sql() - both with the same rule,
is_overdue().

Standard library only: cluster-query imports this on its fast path.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: cluster-query's fast path skips typing
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Mapping, Sequence

REQUESTED = "requested"
POWER_CYCLED = "power-cycled"
BOOTING = "booting"
INSTALLED = "installed"
READY = "ready"
FAILED = "failed"
TIMED_OUT = "timed out"
CANCELLED = "cancelled"

ACTIVE = (REQUESTED, POWER_CYCLED, BOOTING, INSTALLED)  # a node in a run, not yet final
FINAL = (READY, FAILED, TIMED_OUT, CANCELLED)
RUN_STATES = ACTIVE + FINAL
NETWORK_STEPS = (REQUESTED, POWER_CYCLED, BOOTING)  # the next boot must still be the network
DOWN = (FAILED, TIMED_OUT)  # a node the scheduler must not use until it is re-imaged

# Node states outside runs (nodes.state): never seen, powered off by us, running a job.
UNKNOWN, OFF = "unknown", "off"
JOB_STATES = ("busy", "running")
NODE_STATES = (UNKNOWN, OFF, *RUN_STATES, *JOB_STATES)

MODE_SETTING = "run.mode"  # settings key: perjob | ondemand (pxe.run owns it, reports read it)

# A run (runs.state): running until every node is final; done if all ready, else failed.
RUN_RUNNING, RUN_DONE, RUN_FAILED = "running", "done", "failed"

# Allowed steps of a run node. Reports may overtake the driver's own record (a fast node calls
# home before the BMC's answer is stored), so a node may skip steps forward, never go back.
TRANSITIONS: dict[str, frozenset[str]] = {
    REQUESTED: frozenset({POWER_CYCLED, BOOTING, INSTALLED, READY, FAILED, TIMED_OUT, CANCELLED}),
    POWER_CYCLED: frozenset({BOOTING, INSTALLED, READY, FAILED, TIMED_OUT, CANCELLED}),
    BOOTING: frozenset({INSTALLED, READY, FAILED, TIMED_OUT, CANCELLED}),
    INSTALLED: frozenset({READY, FAILED, TIMED_OUT, CANCELLED}),
    **{s: frozenset() for s in FINAL},
}

# What a call-home report moves a run node to (progress moves nothing).
REPORT_STEP = {"booting": BOOTING, "installed": INSTALLED, "ready": READY, "failed": FAILED}


class BadTransition(ValueError):
    """A step the state machine does not allow (a programming error, not bad input)."""


def allowed(old: str, new: str) -> bool:
    return new in TRANSITIONS.get(old, frozenset())


# -- "timed out": one rule ------------------------------------------------------------------------
def is_overdue(state: str, deadline: float | None, now: float) -> bool:
    """An active node whose deadline has passed has timed out (recorded or not)."""
    return state in ACTIVE and deadline is not None and deadline <= now


def effective(state: str, deadline: float | None, now: float | None = None) -> str:
    """What a reader shows: the recorded state, or ``timed out`` once the deadline passed."""
    now = time.time() if now is None else now
    return TIMED_OUT if is_overdue(state, deadline, now) else state


def timeout_reason(label: str, step: str) -> str:
    return f"timed out: no report within the provisioning time of {label} (last step: {step})"


def sql_list(states: Sequence[str]) -> str:
    """States as an SQL list literal (they are constants here, never user input)."""
    return ",".join(f"'{s}'" for s in states)


ACTIVE_SQL = sql_list(ACTIVE)
FINAL_SQL = sql_list(FINAL)


def overdue_sql(alias: str = "rn") -> str:
    """is_overdue() as an SQL condition on run_nodes ``alias``; one ``?`` parameter: now."""
    return f"{alias}.state IN ({ACTIVE_SQL}) AND {alias}.deadline IS NOT NULL AND " \
           f"{alias}.deadline <= ?"


# -- the one writer ---------------------------------------------------------------------------------
def enter(conn: sqlite3.Connection, label: str, mode: str, nodes: Sequence[str],
          deadline: float, now: float, detail: str = "") -> int:
    """A new run with ``nodes`` in its first step (requested): the run row, the run nodes,
    their mirror and a ``run-requested`` event each. The caller holds a transaction and has
    checked that none of the nodes is in an active run. Returns the run's id."""
    run_id = int(conn.execute("INSERT INTO runs(label, mode, created, state) VALUES (?, ?, ?, ?) "
                              "RETURNING id", (label, mode, now, RUN_RUNNING)).fetchone()[0])
    version = conn.execute("SELECT version FROM images WHERE label = ?", (label,)).fetchone()
    conn.executemany(  # image_version: what the node will boot (pxe.imageversions)
        "INSERT INTO run_nodes(run_id, node, state, reason, deadline, updated, image_version) "
        "VALUES (?, ?, ?, '', ?, ?, ?)",
        [(run_id, n, REQUESTED, deadline, now, version[0] if version else None) for n in nodes])
    conn.executemany(
        "UPDATE nodes SET state = ?, state_reason = ?, updated = ? WHERE name = ?",
        [(REQUESTED, f"run {run_id}: {label} requested", now, n) for n in nodes])
    conn.executemany(
        "INSERT INTO events(ts, node, run_id, kind, detail) VALUES (?, ?, ?, 'run-requested', ?)",
        [(now, n, run_id, detail) for n in nodes])
    return run_id


def transition(conn: sqlite3.Connection, run_id: int, node: str, new: str, reason: str = "",
               now: float | None = None, *, only_from: Sequence[str] | None = None,
               node_fields: Mapping[str, object] | None = None, event: str | None = None,
               event_detail: str | None = None) -> bool:
    """Move one run node to ``new``, mirror it into ``nodes`` and log an event.

    The caller holds a transaction. Returns False, changing nothing, when the node is not in a
    state that may step to ``new`` (or not in ``only_from``, if given): it moved on meanwhile.
    ``node_fields`` are extra ``nodes`` columns written with the mirror (current_os, ...).
    """
    if new not in RUN_STATES:
        raise BadTransition(f"unknown run state {new!r}")
    sources = [s for s in (only_from if only_from is not None else ACTIVE) if allowed(s, new)]
    if not sources:
        return False
    now = time.time() if now is None else now
    marks = ",".join("?" * len(sources))
    # Power-cycled: the node fetches its loader config now, so the image version it boots is
    # the one current now (a rollback since the run started counts; pxe.imageversions).
    version = (", image_version = COALESCE((SELECT i.version FROM images i JOIN runs r ON "
               "r.label = i.label WHERE r.id = run_nodes.run_id), image_version)"
               if new == POWER_CYCLED else "")
    cur = conn.execute(
        f"UPDATE run_nodes SET state = ?, reason = ?, updated = ?{version} WHERE run_id = ? "
        f"AND node = ? AND state IN ({marks})", (new, reason, now, run_id, node, *sources))
    if cur.rowcount == 0:
        return False
    fields: dict[str, object] = {"state": new, "state_reason": reason or f"run {run_id}: {new}",
                                 **(node_fields or {})}
    set_node(conn, node, now, **fields)
    kind = event or f"run-{new.replace(' ', '-')}"
    conn.execute("INSERT INTO events(ts, node, run_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
                 (now, node, run_id, kind, reason if event_detail is None else event_detail))
    return True


_NODE_COLUMNS = frozenset({"state", "state_reason", "current_os", "current_version", "used",
                           "boot_token"})


def set_node(conn: sqlite3.Connection, node: str, now: float | None = None,
             **fields: object) -> None:
    """Write a node's state columns (the mirror, or a state outside runs: off, unknown...)."""
    bad = set(fields) - _NODE_COLUMNS
    if bad:
        raise BadTransition(f"not a node state column: {', '.join(sorted(bad))}")
    state = fields.get("state")
    if state is not None and state not in NODE_STATES:
        raise BadTransition(f"unknown node state {state!r}")
    now = time.time() if now is None else now
    sets = ", ".join(f"{k} = ?" for k in fields)
    conn.execute(f"UPDATE nodes SET {sets}, updated = ? WHERE name = ?",
                 (*fields.values(), now, node))
