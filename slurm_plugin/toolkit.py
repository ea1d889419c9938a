"""The one adapter between the Slurm face and the toolkit (pxe/): everything the face needs.

Kept in one module so that when the toolkit's scheduler-neutral entry point lands
(``pxe.provision.start``), only this file changes. The node-side commands (helper, reboot) do not
come here: they talk to the provisioning server over HTTP (pxe.serve.nodeapi).
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
    return cfg, db.connect(cfg.db_path)


def image_labels(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Image labels by architecture: the features a node of that architecture can have."""
    from pxe.run import oslists

    return oslists(conn)


def scheduler_nodes(cfg: Config, conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(name, arch) of the nodes in the scheduler's pool, by name."""
    from pxe.pools import scheduler_pool

    return [(r[0], r[1]) for r in conn.execute(
        "SELECT name, arch FROM nodes WHERE pool = ? ORDER BY name", (scheduler_pool(cfg),))]


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
    once, the run driver does the work."""
    from pxe import run
    from pxe.pools import scheduler_pool

    req = run.request(cfg, conn, list(names), label, force=force, pool=scheduler_pool(cfg))
    if req.started or req.joined:
        run.spawn_driver(cfg)
    return Started(label=label, run_id=req.run_id, accepted=req.accepted,
                   refused={r.node: r.reason for r in req.refused})


def power(cfg: Config, conn: sqlite3.Connection, names: Sequence[str], action: str
          ) -> dict[str, str | None]:
    """Power on/off nodes outside any run: node -> None (done) or why it failed."""
    from pxe import run

    return run.power(cfg, conn, list(names), action)


def failed_runs(cfg: Config, conn: sqlite3.Connection) -> list[tuple[str, int, str]]:
    """(node, run_id, reason) of scheduler-pool nodes whose latest run ended failed or timed
    out and that have not been re-imaged since."""
    from pxe import run
    from pxe.pools import scheduler_pool

    names = [r[0] for r in conn.execute(
        "SELECT name FROM nodes WHERE pool = ? AND state IN ('failed', 'timed out')",
        (scheduler_pool(cfg),))]
    run.expire(cfg, conn)  # a due timeout counts now, not when the driver next looks
    return [(name, row["run_id"], row["reason"] or row["state"])
            for name, row in sorted(run.latest(conn, names).items())
            if row["state"] in ("failed", "timed out")]


def expand(nodelist: str) -> list[str]:
    from pxe.nodeset import expand as _expand

    return _expand(nodelist)


def fold(names: Sequence[str]) -> str:
    from pxe.nodeset import fold as _fold

    return _fold(list(names))
