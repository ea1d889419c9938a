"""The toolkit's one entry point for provisioning: request -> driver -> optional wait.

Every face calls these, never pxe.run's parts directly: `os-switch` (Moab), the REST service
(pxe/api), `pxe-stage run` (admins, sites with no scheduler) and a Slurm face. The contract is in
docs/ARCHITECTURE.md ("Contracts"):

    start(cfg, nodes, os_label, *, wait=False, force=False, pool=None, max_seconds=None)
        -> Started         record a run, make sure a driver works on it, optionally block
    cancel(cfg, nodes) -> list[str]                  end the nodes' runs, next boot the disk
    wait(cfg, nodes | run_id) -> dict[str, NodeResult]   block until the run(s) ended
    runs(cfg, *, active=False, limit=50) -> list[dict]   runs, newest first, with node steps
    show(cfg, run_id) -> dict                        one run: nodes, their steps and times

``nodes`` is a node set ("n[001-004],n010") or a list of names. Bad input (malformed node set
or label, empty list) raises InputError before anything is stored; per-node refusals (unknown
node, label not for its architecture, outside ``pool``, in a run for another label) are
returned in ``Started.refused`` while the other nodes start.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pxe import db, states, validate
from pxe.config import Config
from pxe.errors import InputError, NotFound


@dataclass(frozen=True)
class NodeResult:
    node: str
    run_id: int
    state: str
    reason: str


@dataclass
class Started:
    """What start() did with each node (and, with ``wait``, how each ended)."""

    label: str
    run_id: int | None = None  # the new run, if any node started one
    started: list[str] = field(default_factory=list)
    joined: dict[str, int] = field(default_factory=dict)  # already in a run for this label
    current: list[str] = field(default_factory=list)  # already running it, healthy: no run
    refused: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    driver_pid: int | None = None  # a driver this call started (None: one was running)
    results: dict[str, NodeResult] = field(default_factory=dict)  # with wait=True

    @property
    def accepted(self) -> list[str]:
        return [*self.started, *self.joined, *self.current]

    @property
    def ok(self) -> bool:
        """No node refused and, after a wait, every node ready."""
        return not self.refused and all(r.state == states.READY for r in self.results.values())

    def summary(self) -> list[str]:
        """What became of the accepted nodes, one line per group, for stdout: every face
        (os-switch, `pxe-stage run start`) prints these same lines."""
        from pxe.nodeset import fold

        lines = []
        if self.started:
            lines.append(f"{fold(self.started)}: provisioning {self.label} (run {self.run_id})")
        for run_id in sorted(set(self.joined.values())):
            nodes = [n for n, r in self.joined.items() if r == run_id]
            lines.append(f"{fold(nodes)}: already provisioning {self.label} (run {run_id})")
        if self.current:
            lines.append(f"{fold(self.current)}: already running {self.label}")
        return lines

    def refusals(self) -> list[str]:
        """One ``NODE: reason`` line per refused node, for stderr (a face may prefix them with
        its name; Moab's os-switch prints them bare)."""
        return [f"{node}: {reason}" for node, reason in self.refused]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["refused"] = [{"node": n, "reason": r} for n, r in self.refused]
        out["results"] = {n: asdict(r) for n, r in self.results.items()}
        return out


def node_names(nodes: str | Iterable[str]) -> list[str]:
    """A node set or names -> validated names (InputError when malformed or empty)."""
    from pxe.nodeset import expand

    if isinstance(nodes, str):
        return expand(nodes)
    names = [validate.hostname(n) for n in nodes]
    if not names:
        raise InputError("empty node list")
    return names


def _connect(cfg: Config) -> sqlite3.Connection:
    return db.connect(cfg.database)


def start(cfg: Config, nodes: str | Iterable[str], os_label: str, *, wait: bool = False,
          force: bool = False, pool: str | None = None, max_seconds: float | None = None,
          mode: str | None = None, spawn: Callable[[Config], Any] | None = None,
          conn: sqlite3.Connection | None = None) -> Started:
    """Switch nodes to ``os_label``: record the run, start a driver, optionally wait for it.

    Returns as soon as the run is recorded unless ``wait``. ``pool`` refuses nodes outside it
    (a scheduler face passes its pool); ``max_seconds`` caps each node's deadline (the image's
    prov_seconds otherwise); ``force`` re-images nodes already running the label. ``spawn``
    replaces pxe.run.spawn_driver (tests).
    """
    from pxe import run

    names = node_names(nodes)
    label = validate.label(os_label, "OS label")
    if pool is not None:
        validate.label(pool, "pool name")
    own = conn is None
    conn = conn or _connect(cfg)
    try:
        req = run.request(cfg, conn, names, label, mode=mode, force=force,
                          max_seconds=max_seconds, pool=pool)
        out = Started(label=label, run_id=req.run_id, started=req.started, joined=req.joined,
                      current=req.current, refused=[(r.node, r.reason) for r in req.refused])
        if req.started or req.joined:
            out.driver_pid = (spawn or run.spawn_driver)(cfg)
        if wait and (req.started or req.joined):
            out.results = _wait(cfg, conn, [*req.started, *req.joined])
        return out
    finally:
        if own:
            conn.close()


def cancel(cfg: Config, nodes: str | Iterable[str]) -> list[str]:
    """End the nodes' active runs (``cancelled``); their next boot is the disk again."""
    from pxe import run

    names = node_names(nodes)
    conn = _connect(cfg)
    try:
        cancelled = run.cancel(cfg, conn, names)
    finally:
        conn.close()
    if cancelled:
        _announce(cfg, cancelled)
    return cancelled


def _announce(cfg: Config, names: Sequence[str]) -> None:
    """Tell the faces at once (a running driver would within a second; none may run)."""
    from pxe import hooks

    try:
        hooks.announce(cfg, hooks.Event(hooks.NODES, tuple(names)))
    except Exception:  # noqa: BLE001 - the change is committed; the faces' readers catch up
        pass


def cancel_run(cfg: Config, run_id: int) -> list[str]:
    """cancel() for every node of run ``run_id`` still in it."""
    return cancel(cfg, [n["node"] for n in show(cfg, run_id)["nodes"]])


def wait(cfg: Config, target: int | str | Iterable[str]) -> dict[str, NodeResult]:
    """Block until the nodes (or every node of run ``target``, an int) are out of their runs
    and the driver has acted on their last reports; bounded by their deadlines."""
    if isinstance(target, int):
        names = [n["node"] for n in show(cfg, target)["nodes"]]
    else:
        names = node_names(target)
    conn = _connect(cfg)
    try:
        return _wait(cfg, conn, names)
    finally:
        conn.close()


def _wait(cfg: Config, conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, NodeResult]:
    from pxe import run

    rows = run.wait(cfg, conn, names)
    return {n: NodeResult(n, rows[n]["run_id"], rows[n]["state"], rows[n]["reason"])
            for n in names if n in rows}


# -- reading runs (no writes: a node past its deadline shows as timed out, pxe.states) ----------
def run_rows(conn: sqlite3.Connection, *, run_id: int | None = None, active: bool = False,
             limit: int | None = None, now: float | None = None,
             steps: bool = False) -> list[dict[str, Any]]:
    """Runs (newest first; or run ``run_id``), each with its nodes' states and, with ``steps``,
    each node's timestamped steps (the run's events)."""
    now = time.time() if now is None else now
    sql = "SELECT id, label, mode, created, finished, state FROM runs"
    args: list[Any] = []
    if run_id is not None:
        sql += " WHERE id = ?"
        args.append(run_id)
    elif active:
        sql += " WHERE finished IS NULL"
    sql += " ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(int(limit))
    out = []
    for r in conn.execute(sql, args).fetchall():
        members = []
        counts: dict[str, int] = {}
        history: dict[str, list[dict[str, Any]]] = {}
        if steps:
            for e in conn.execute("SELECT ts, node, kind, detail FROM events WHERE run_id = ? "
                                  "ORDER BY id", (r[0],)):
                history.setdefault(e[1] or "", []).append(
                    {"ts": e[0], "kind": e[2], "detail": e[3]})
        for n in conn.execute("SELECT node, state, reason, deadline, updated, image_version "
                              "FROM run_nodes WHERE run_id = ? ORDER BY node", (r[0],)):
            state = states.effective(n[1], n[3], now)
            counts[state] = counts.get(state, 0) + 1
            member = {"node": n[0], "state": state, "reason": n[2], "deadline": n[3],
                      "updated": n[4], "image_version": n[5]}
            if state != n[1]:
                member["reason"] = member["reason"] or "past its deadline (not yet recorded)"
            if steps:
                member["steps"] = history.get(n[0], [])
            members.append(member)
        done = sum(v for k, v in counts.items() if k in states.FINAL)
        out.append({"id": r[0], "label": r[1], "mode": r[2], "created": r[3], "finished": r[4],
                    "state": r[5], "steps": counts, "done": done, "total": len(members),
                    "nodes": members})
    return out


def runs(cfg: Config, *, active: bool = False, limit: int | None = 50) -> list[dict[str, Any]]:
    """Runs, newest first: each with its nodes' states (``active``: only unfinished runs)."""
    conn = _connect(cfg)
    try:
        return run_rows(conn, active=active, limit=limit)
    finally:
        conn.close()


def show(cfg: Config, run_id: int) -> dict[str, Any]:
    """One run with each node's state and timestamped steps; NotFound if there is none."""
    conn = _connect(cfg)
    try:
        found = run_rows(conn, run_id=run_id, steps=True)
    finally:
        conn.close()
    if not found:
        raise NotFound(f"unknown run {run_id}")
    return found[0]
