"""Can a running Wake-on-LAN machine be rebooted into the network, and how: the one decision.

A magic packet only wakes a machine that is off; a running one ignores it. So before a run (or
``node-power ... cycle``) touches a WoL node, this module says which way applies:
- ``agent``: its image's agent polled within ``power.agent_stale`` seconds (or the node reported
  ready less than FIRST_POLL_GRACE seconds ago: its agent's first poll is due): ask it to reboot;
- ``soft``: it is running (it called home ``ready``; no live agent) and ``power.soft_reboot_command``
  is set: run that (argv, bounded by ``power.soft_reboot_timeout``; a hanging one is killed);
- ``none``: it is running and neither exists: refuse at once, never pretend (NO_WAY);
- ``wake``: nothing says it runs (off, never booted, or its agent went silent): the magic packet.
Nodes with a BMC always take the ordinary power path (``wake`` here means "not ours").
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from pxe.config import Config
from pxe.errors import InputError
from pxe.power import agent
from pxe.power.settings import Settings, soft_off_argv

NO_WAY = "running, no way to reboot it (Wake-on-LAN only wakes a machine that is off)"
RUNNING_STATES = ("ready",)  # what the call-home last said of a node that is up
# An agent polls at once after its ready report: for this long after it, a first poll is still due.
FIRST_POLL_GRACE = 10.0


@dataclass(frozen=True)
class Way:
    kind: str  # agent | soft | none | wake
    why: str


def decide(conn: sqlite3.Connection, settings: Settings, row: sqlite3.Row) -> Way:
    """``row``: name, bmc_type, state, current_os of one node."""
    if row["bmc_type"] != "wol":
        return Way("wake", "has a BMC")
    age = agent.heartbeat_age(conn, row["name"])
    if age is not None:
        if age <= settings.agent_stale:
            return Way("agent", f"agent heard {age:.0f} s ago")
        return Way("wake", f"agent silent for {age:.0f} s: taken to be off")
    new = agent.adopted_age(conn, row["name"])
    if new is not None and new <= FIRST_POLL_GRACE and row["state"] in RUNNING_STATES:
        return Way("agent", f"ready {new:.0f} s ago: its agent's first poll is due")
    if row["state"] in RUNNING_STATES and row["current_os"]:
        if settings.soft_reboot_command:
            return Way("soft", f"called home ready ({row['current_os']})")
        return Way("none", NO_WAY)
    return Way("wake", f"state {row['state']}: not known to run")


def _rows(conn: sqlite3.Connection, names: Sequence[str]) -> list[sqlite3.Row]:
    out: list[sqlite3.Row] = []
    for start in range(0, len(names), 500):
        chunk = list(names[start:start + 500])
        out += conn.execute("SELECT name, bmc_type, state, current_os FROM nodes WHERE name IN "
                            f"({','.join('?' * len(chunk))})", tuple(chunk)).fetchall()
    return out


def ways(cfg: Config, conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, Way]:
    from pxe.power import settings as power_settings

    settings = power_settings.load(cfg)
    return {r["name"]: decide(conn, settings, r) for r in _rows(conn, names)}


def refusals(cfg: Config, conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, str]:
    """The nodes that cannot be rebooted, with the reason (asked before a run is recorded)."""
    return {n: w.why for n, w in ways(cfg, conn, names).items() if w.kind == "none"}


def run_soft(settings: Settings, node: str, ip: str | None) -> str | None:
    """``power.soft_reboot_command`` for one node; None when it succeeded, else the reason."""
    assert settings.soft_reboot_command
    try:
        argv = soft_off_argv(settings.soft_reboot_command, node, ip)
    except InputError as exc:
        return str(exc)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=settings.soft_reboot_timeout)
    except subprocess.TimeoutExpired:
        return (f"soft reboot command {argv[0]} still running after "
                f"{settings.soft_reboot_timeout:g} s: killed; nothing rebooted for sure")
    except OSError as exc:
        return f"soft reboot command {argv[0]}: {exc.strerror or exc}"
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        return (f"soft reboot command {argv[0]} exited {proc.returncode}"
                + (f": {detail[-1][:200]}" if detail else ""))
    return None


def reboot_running(cfg: Config, conn: sqlite3.Connection, names: Sequence[str]
                   ) -> tuple[dict[str, str | None], list[str]]:
    """Reboot the running WoL nodes among ``names`` into the network (their boot files are set).

    Returns (node -> None or the reason it failed, for the nodes handled here; the nodes left for
    the ordinary power path: magic packet or BMC)."""
    from pxe.power import settings as power_settings

    settings = power_settings.load(cfg)
    rows = {r["name"]: r for r in _rows(conn, names)}
    decided = {n: decide(conn, settings, rows[n]) for n in names if n in rows}
    out: dict[str, str | None] = {}
    by_agent = [n for n, w in decided.items() if w.kind == "agent"]
    if by_agent:
        agent.request_reboot(conn, by_agent)
        taken = agent.wait_taken(conn, by_agent, timeout=settings.agent_stale)
        for n in by_agent:
            out[n] = None if n in taken else (
                f"its agent did not take the reboot request within {settings.agent_stale:g} s")
        agent.forget(conn, sorted(taken))
    ips = {r["name"]: r for r in conn.execute(
        f"SELECT name, ip FROM nodes WHERE name IN ({','.join('?' * len(decided))})",
        tuple(decided))} if decided else {}
    for n, w in decided.items():
        if w.kind == "soft":
            out[n] = run_soft(settings, n, ips[n]["ip"] if n in ips else None)
        elif w.kind == "none":
            out[n] = w.why
    rest = [n for n in names if n not in out]
    return out, rest
