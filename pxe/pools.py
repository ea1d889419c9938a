"""Resource pools: which service owns each node (the HPC scheduler, an OpenStack cloud, ...).

Every node is in exactly one pool (``nodes.pool``, a foreign key to ``pools``). Only the pool the
config names as the scheduler's (``groups.scheduler_pool``, default ``hpc``) is offered to Moab:
a node moved out of it vanishes from what the scheduler may use, and comes back when moved in.

Rules kept here, whoever calls (the `fg-pool` CLI, tests, a future API):
- A move is all or nothing, in one ``BEGIN IMMEDIATE`` transaction: concurrent movers queue on
  SQLite's write lock, so two moves of the same nodes are serialised, never interleaved.
- A node that is busy is not moved unless ``force`` is given. Busy means, checked in that order:
    * in a provisioning run: a ``run_nodes`` row whose run has no ``finished`` time and whose node
      state is not final (ready, failed, timed out, cancelled);
    * provisioning: ``nodes.state`` in PROVISIONING_STATES (pxe.states.ACTIVE);
    * running a job: ``nodes.state`` in JOB_STATES (``busy``, ``running`` - what the workload side
      writes when a job starts on the node);
    * ``nodes.used`` set: it ran a job since its last re-image, and we cannot see from here that
      the job has ended, so it counts as busy until it is re-imaged (or ``force``).
- Every change (create, delete, move) is appended to the audit log (who, when, nodes, from, to)
  while the write lock is still held, so the log's order is the commit order; each moved node also
  gets a ``pool-move`` row in the ``events`` table in the same transaction.
- Authorisation (root or the ``groups.pool`` unix group) is the caller's first step: authorize().

Audit records (JSON lines in <state_dir>/audit.log; node lists in node-set notation):
    {"ts", "user", "action": "pool-move", "nodes", "from": {POOL: NODES}, "to", "force", "forced"}
    {"ts", "user", "action": "pool-create", "pool", "auto"}
    {"ts", "user", "action": "pool-delete", "pool"}

For the Moab face: usable_for_scheduler(cfg, conn) and is_usable_for_scheduler(cfg, pool) import
nothing but the standard library and cost one query (``cfg`` may be just the pool's name). After a
move the scheduler faces are told through pxe.hooks (the Moab face rewrites its report).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pxe import db, states, validate
from pxe.errors import DynprovError, NotFound

if TYPE_CHECKING:
    from pxe.config import Config

PROVISIONING_STATES = states.ACTIVE
JOB_STATES = states.JOB_STATES
RUN_FINAL_STATES = states.FINAL

_CHUNK = 500  # host parameters per IN (...) query, well under SQLite's limit


@dataclass(frozen=True)
class Pool:
    name: str
    created: float | None  # None: the scheduler's pool, named in the config, not yet created
    nodes: int
    scheduler: bool

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "nodes": self.nodes, "scheduler": self.scheduler,
                "created": self.created}


@dataclass(frozen=True)
class MoveResult:
    """What a move did. ``sources`` maps each old pool to the nodes that left it."""

    to: str
    moved: tuple[str, ...] = ()
    already: tuple[str, ...] = ()
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    forced: dict[str, str] = field(default_factory=dict)  # node -> why it was busy

    def public(self) -> dict[str, Any]:
        return {"to": self.to, "moved": list(self.moved), "already": list(self.already),
                "from": {p: list(n) for p, n in self.sources.items()},
                "forced": dict(self.forced)}


# -- the scheduler's view (cheap, stdlib only) ------------------------------------------------
def scheduler_pool(cfg: Config | str) -> str:
    """The one pool whose nodes the scheduler may use (``cfg`` may be that name already)."""
    return cfg if isinstance(cfg, str) else cfg.groups.scheduler_pool


def is_usable_for_scheduler(cfg: Config | str, pool: str) -> bool:
    """For code that already has a node row: may the scheduler use a node in ``pool``?"""
    return pool == scheduler_pool(cfg)


def usable_for_scheduler(cfg: Config | str, conn: sqlite3.Connection) -> set[str]:
    """Names of the nodes the scheduler may use: those in the scheduler's pool. Read-only.

    ``cfg`` is the site config, or just the scheduler pool's name for callers that read the
    config file with tomllib only (the Moab face).
    """
    rows = conn.execute("SELECT name FROM nodes WHERE pool = ?", (scheduler_pool(cfg),))
    return {r[0] for r in rows}


# -- who may change pools ----------------------------------------------------------------------
def authorize(cfg: Config) -> str:
    """Root or a member of ``groups.pool``; returns the user's name for the audit log."""
    from pxe.authz import require_group

    return require_group(cfg.groups.pool, "changing resource pools")


# -- reads -------------------------------------------------------------------------------------
def exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pools WHERE name = ?", (name,)).fetchone() is not None


def list_pools(cfg: Config, conn: sqlite3.Connection) -> list[Pool]:
    """Every pool with its node count, by name; the scheduler's pool is always listed."""
    rows = conn.execute(
        "SELECT p.name, p.created, COUNT(n.name) FROM pools p "
        "LEFT JOIN nodes n ON n.pool = p.name GROUP BY p.name ORDER BY p.name").fetchall()
    listed = [Pool(name=r[0], created=r[1], nodes=r[2],
                   scheduler=is_usable_for_scheduler(cfg, r[0])) for r in rows]
    if not any(p.scheduler for p in listed):  # read-only: created by the next change
        listed.append(Pool(name=scheduler_pool(cfg), created=None, nodes=0, scheduler=True))
        listed.sort(key=lambda p: p.name)
    return listed


def members(cfg: Config, conn: sqlite3.Connection, name: str) -> list[str]:
    """The nodes in pool ``name`` (sorted by name); NotFound for an unknown pool."""
    validate.label(name, "pool name")
    if not exists(conn, name) and name != scheduler_pool(cfg):
        raise NotFound(f"unknown pool {name!r}")
    return [r[0] for r in conn.execute("SELECT name FROM nodes WHERE pool = ? ORDER BY name",
                                       (name,))]


def busy(conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, str]:
    """Why each busy node in ``names`` must not be moved without force (see module doc)."""
    marks_final = ",".join("?" * len(RUN_FINAL_STATES))
    reasons: dict[str, str] = {}
    for chunk in _chunks(names):
        marks = ",".join("?" * len(chunk))
        for node, run_id, state in conn.execute(
                f"SELECT rn.node, rn.run_id, rn.state FROM run_nodes rn "
                f"JOIN runs r ON r.id = rn.run_id WHERE rn.node IN ({marks}) "
                f"AND r.finished IS NULL AND rn.state NOT IN ({marks_final}) "
                f"ORDER BY rn.run_id", (*chunk, *RUN_FINAL_STATES)):
            reasons.setdefault(node, f"in provisioning run {run_id} ({state})")
        for node, state, used in conn.execute(
                f"SELECT name, state, used FROM nodes WHERE name IN ({marks})", tuple(chunk)):
            if node in reasons:
                continue
            if state in PROVISIONING_STATES:
                reasons[node] = f"being provisioned (state {state})"
            elif state in JOB_STATES:
                reasons[node] = f"running a job (state {state})"
            elif used:
                reasons[node] = "ran a job since its last re-image"
    return reasons


# -- changes -----------------------------------------------------------------------------------
def ensure_scheduler_pool(cfg: Config, conn: sqlite3.Connection, user: str | None = None) -> bool:
    """Create the scheduler's pool if the config names one the database lacks. True if created."""
    name = cfg.groups.scheduler_pool
    if exists(conn, name):
        return False
    with db.transaction(conn):
        if exists(conn, name):  # another process made it while we waited for the lock
            return False
        conn.execute("INSERT INTO pools(name, created) VALUES (?, ?)", (name, time.time()))
        _audit(cfg, user, "pool-create", pool=name, auto=True)
    return True


def create(cfg: Config, conn: sqlite3.Connection, name: str, *, user: str) -> None:
    validate.label(name, "pool name")
    ensure_scheduler_pool(cfg, conn, user)
    with db.transaction(conn):
        if exists(conn, name):
            raise DynprovError(f"pool {name!r} already exists")
        conn.execute("INSERT INTO pools(name, created) VALUES (?, ?)", (name, time.time()))
        _audit(cfg, user, "pool-create", pool=name, auto=False)


def delete(cfg: Config, conn: sqlite3.Connection, name: str, *, user: str) -> None:
    """Delete an empty pool. The scheduler's pool is never deleted."""
    validate.label(name, "pool name")
    if name == cfg.groups.scheduler_pool:
        raise DynprovError(f"pool {name!r} is the scheduler's pool (groups.scheduler_pool) and "
                           "cannot be deleted")
    with db.transaction(conn):
        left = members(cfg, conn, name)
        if left:
            raise DynprovError(f"pool {name!r} is not empty ({len(left)} node(s): "
                               f"{_fold(left)}); move them to another pool first")
        conn.execute("DELETE FROM pools WHERE name = ?", (name,))
        _audit(cfg, user, "pool-delete", pool=name)


def move(cfg: Config, conn: sqlite3.Connection, nodes: str | Iterable[str], to: str, *,
         user: str, from_pool: str | None = None, force: bool = False) -> MoveResult:
    """Move the nodes of a node set to pool ``to``, all or nothing.

    With ``from_pool``, every node must be in that pool now, else nothing moves and the error
    names the nodes that are not. Nodes already in ``to`` are left alone (reported in
    ``already``). Busy nodes (see busy()) stop the whole move unless ``force``.
    """
    from pxe.nodeset import expand, max_nodes

    validate.label(to, "pool name")
    if from_pool is not None:
        validate.label(from_pool, "pool name")
    names = expand(nodes if isinstance(nodes, str) else list(nodes), max_nodes(cfg))
    ensure_scheduler_pool(cfg, conn, user)
    with db.transaction(conn):
        for pool in (to, from_pool):
            if pool is not None and not exists(conn, pool):
                raise NotFound(f"unknown pool {pool!r}")
        current: dict[str, str] = {}
        for chunk in _chunks(names):
            marks = ",".join("?" * len(chunk))
            current.update(conn.execute(f"SELECT name, pool FROM nodes WHERE name IN ({marks})",
                                        tuple(chunk)).fetchall())
        missing = [n for n in names if n not in current]
        if missing:
            raise NotFound(f"unknown node(s): {_fold(missing)}; nothing moved")
        if from_pool is not None:
            elsewhere = _by_pool({n: p for n, p in current.items() if p != from_pool})
            if elsewhere:
                where = "; ".join(f"{_fold(ns)} in {p}" for p, ns in sorted(elsewhere.items()))
                count = sum(len(ns) for ns in elsewhere.values())
                raise DynprovError(f"{count} node(s) not in pool {from_pool!r} ({where}); "
                                   "nothing moved")
        already = [n for n in names if current[n] == to]
        moving = [n for n in names if current[n] != to]
        if not moving:
            return MoveResult(to=to, already=tuple(already))
        reasons = busy(conn, moving)
        if reasons and not force:
            raise DynprovError(f"busy node(s) not moved without -force: "
                               f"{describe_reasons(reasons)}; nothing moved")
        sources = {p: tuple(ns) for p, ns in sorted(_by_pool({n: current[n] for n in moving})
                                                     .items())}
        now = time.time()
        for chunk in _chunks(moving):
            marks = ",".join("?" * len(chunk))
            conn.execute(f"UPDATE nodes SET pool = ?, updated = ? WHERE name IN ({marks})",
                         (to, now, *chunk))
        conn.executemany(
            "INSERT INTO events(ts, node, run_id, kind, detail) VALUES (?, ?, NULL, ?, ?)",
            [(now, n, "pool-move", f"{current[n]} -> {to} by {user}"
              + (f" (forced: {reasons[n]})" if n in reasons else "")) for n in moving])
        _audit(cfg, user, "pool-move", nodes=_fold(moving),
               **{"from": {p: _fold(ns) for p, ns in sources.items()}}, to=to, force=force,
               forced=_fold(reasons) if reasons else "")
    _announce(cfg, moving)
    return MoveResult(to=to, moved=tuple(moving), already=tuple(already), sources=sources,
                      forced=reasons)


def describe_reasons(reasons: dict[str, str]) -> str:
    """'n[001-004] being provisioned (state booting); n009 ran a job ...': short for 1000s."""
    groups: dict[str, list[str]] = {}
    for node, why in reasons.items():
        groups.setdefault(why, []).append(node)
    return "; ".join(f"{_fold(ns)} {why}" for why, ns in sorted(groups.items()))


# -- helpers -----------------------------------------------------------------------------------
def _audit(cfg: Config, user: str | None, action: str, **details: Any) -> None:
    from pxe import audit

    if user is None:
        from pxe.authz import real_user

        user = real_user()
    audit.append(cfg.paths.state_dir, user, action, **details)


def _announce(cfg: Config, names: Sequence[str]) -> None:
    """Tell the scheduler faces (pxe.hooks) that nodes changed pools, so moved nodes leave or
    rejoin the scheduler's view at once (the Moab face rewrites its file:// report). Best
    effort: the move is committed, and the faces' readers rebuild a stale view anyway."""
    from pxe import hooks

    try:
        hooks.announce(cfg, hooks.Event(hooks.POOLS, tuple(names)))
    except Exception as exc:  # noqa: BLE001 - a bad [hooks] section must not fail the move
        logging.getLogger("dynprov.pools").warning(
            "pool change saved, but the scheduler faces were not told: %s", exc)


def _chunks(names: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(names), _CHUNK):
        yield names[start:start + _CHUNK]


def _by_pool(where: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node, pool in where.items():
        out.setdefault(pool, []).append(node)
    return out


def _fold(names: Iterable[str]) -> str:
    if not isinstance(names, list):
        names = list(names)
    if not names:
        return ""
    from pxe.nodeset import fold

    return fold(names)
