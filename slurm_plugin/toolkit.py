"""The one adapter between the Slurm face and the toolkit (pxe/): everything the face needs.

Runs start only through the toolkit's one provisioning entry point (``pxe.provision``), with the
scheduler's pool, like every other face. The node-side commands (helper, reboot) do not come
here: they talk to the provisioning server over HTTP (pxe.serve.nodeapi), which calls
``pxe.provision.start`` as well.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from pxe.config import Config


@dataclass
class Started:
    """What a start request did: run id, nodes started or already on their way, refusals."""

    label: str
    run_id: int | None = None
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def load(config_path: str | None) -> tuple[Config, sqlite3.Connection]:
    from pxe import config, db

    cfg = config.load(config_path)
    return cfg, db.connect(cfg.database)


def image_labels(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Image labels by architecture: the features a node of that architecture can have."""
    from pxe.run import oslists

    return oslists(conn)


def scheduler_nodes(cfg: Config, conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(name, arch) of the nodes in the scheduler's pool, by name."""
    from pxe.pools import scheduler_pool

    return [(r[0], r[1]) for r in conn.execute(
        "SELECT name, arch FROM nodes WHERE pool = ? ORDER BY name", (scheduler_pool(cfg),))]


def scheduler_node_names(cfg: Config) -> set[str]:
    """Names of the nodes in the scheduler's pool (read on a connection of its own)."""
    from pxe import db
    from pxe.pools import scheduler_pool

    conn = db.connect(cfg.database)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM nodes WHERE pool = ?",
                                           (scheduler_pool(cfg),))}
    finally:
        conn.close()


def node_images(conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, str | None]:
    """The image each node runs or is about to boot (its next network boot), if any."""
    out: dict[str, str | None] = {}
    for name in names:
        row = conn.execute("SELECT current_os, desired_os, boot_target FROM nodes WHERE name = ?",
                           (name,)).fetchone()
        if row is not None:
            out[name] = (row["desired_os"] if row["boot_target"] == "os" and row["desired_os"]
                         else row["current_os"])
    return out


def start(cfg: Config, conn: sqlite3.Connection, names: Sequence[str], label: str, *,
          force: bool = False) -> Started:
    """Provision ``names`` into ``label`` (power-cycling them through their BMCs); returns at
    once, the run driver does the work (pxe.provision.start, refusing nodes outside the pool)."""
    from pxe import provision
    from pxe.pools import scheduler_pool

    out = provision.start(cfg, list(names), label, force=force, pool=scheduler_pool(cfg),
                          conn=conn)
    return Started(label=out.label, run_id=out.run_id, accepted=out.accepted,
                   refused=dict(out.refused))


def power(cfg: Config, conn: sqlite3.Connection, names: Sequence[str], action: str
          ) -> dict[str, str | None]:
    """Power on/off nodes outside any run: node -> None (done) or why it failed."""
    from pxe import run

    return run.power(cfg, conn, list(names), action)


def failed_runs(cfg: Config, conn: sqlite3.Connection) -> list[tuple[str, int, str]]:
    """(node, run_id, reason) of scheduler-pool nodes whose latest run ended failed or timed
    out (a passed deadline counts, pxe.states.effective), or that the driver set failed after
    it (next boot could not be reset), and that have not been re-imaged since. Reads only."""
    from pxe import states
    from pxe.pools import scheduler_pool

    out = []
    for name, node_state, node_reason in conn.execute(
            "SELECT name, state, state_reason FROM nodes WHERE pool = ? ORDER BY name",
            (scheduler_pool(cfg),)).fetchall():
        row = conn.execute("SELECT run_id, state, reason, deadline FROM run_nodes WHERE node = ? "
                           "ORDER BY run_id DESC LIMIT 1", (name,)).fetchone()
        if row is None:
            continue
        state = states.effective(row[1], row[3])
        if state in states.DOWN:
            out.append((name, row[0], row[2] or state))
        elif state == states.READY and node_state in states.DOWN:
            out.append((name, row[0], node_reason or node_state))
    return out


def expand(nodelist: str) -> list[str]:
    from pxe.nodeset import expand as _expand

    return _expand(nodelist)


def fold(names: Sequence[str]) -> str:
    from pxe.nodeset import fold as _fold

    return _fold(list(names))
