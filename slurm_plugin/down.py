"""Failed re-images -> Slurm: the node DOWN with dynprov's reason, before ResumeTimeout.

Without this slurmctld only learns after ResumeTimeout that a rebooted node never came back,
and says "reboot timed out". With it the node is DOWN within a few seconds of the run's failure,
with our reason (``scontrol show node`` / ``sinfo -R``), and its job is requeued elsewhere.

Two callers. ``on_event`` is the face's subscriber to the toolkit's state-change hook
(entry point ``slurm`` in group ``dynprov.hooks``): the run driver calls it with the nodes whose
state changed, and it sets those that became ``failed`` or ``timed out`` DOWN at once (bounded
scontrol calls; it reads the state database, never writes it; a failure is logged, the change
stands). `dynprov-slurm sync` is the manual fallback, for a failure the hook could not pass on
(slurmctld down at that moment): it reports each failed run once (settings key
``slurm-down:<node>`` = run id), so running it again does not undo an admin's
``scontrol update State=RESUME``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pxe.errors import DynprovError

if TYPE_CHECKING:
    from pxe.config import Config
    from pxe.hooks import Event

log = logging.getLogger("dynprov.slurm")
SCONTROL_TIMEOUT = 10.0  # seconds for one scontrol call from the hook
HOOK_BUDGET = 20.0  # seconds the hook may spend on one event (it runs inside the run driver)

SETTING = "slurm-down:"
_REASON_BAD = re.compile(r"[^\x20-\x7e]")


def reason_text(reason: str) -> str:
    """One printable line for scontrol's Reason= (our prefix, no control characters)."""
    return ("dynprov: " + _REASON_BAD.sub(" ", reason or "re-image failed")).strip()[:200]


def mark_down(node: str, reason: str, scontrol: str = "scontrol", *, timeout: float = 30.0,
              env: Mapping[str, str] | None = None) -> None:
    """scontrol update NodeName=NODE State=DOWN Reason="dynprov: ..." (argv, no shell).
    ``node`` may be a folded list (n[001-004]): one call for nodes with the same reason."""
    if not shutil.which(scontrol):
        raise DynprovError(f"{scontrol} not found: is slurm-client installed?")
    try:
        proc = subprocess.run([scontrol, "update", f"NodeName={node}", "State=DOWN",
                               f"Reason={reason_text(reason)}"], capture_output=True, text=True,
                              timeout=timeout, env=None if env is None else dict(env),
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DynprovError(f"scontrol update {node}: no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        raise DynprovError(f"scontrol update {node}: "
                           f"{(proc.stderr or proc.stdout).strip() or proc.returncode}")


def sync(conn: sqlite3.Connection, failures: Sequence[tuple[str, int, str]],
         scontrol: str = "scontrol") -> tuple[list[str], dict[str, str]]:
    """Mark each (node, run_id, reason) DOWN once; returns (marked, node -> error)."""
    from pxe import db

    marked, errors = [], {}
    for node, run_id, reason in failures:
        if db.get_setting(conn, SETTING + node) == str(run_id):
            continue
        try:
            mark_down(node, reason, scontrol)
        except DynprovError as exc:
            errors[node] = str(exc)
            continue
        with db.transaction(conn):
            db.set_setting(conn, SETTING + node, str(run_id))
            db.log_event(conn, "slurm-down", node, reason_text(reason), run_id)
        marked.append(node)
    return marked, errors


def on_event(cfg: Config, event: Event) -> None:
    """The hook subscriber: nodes of the scheduler's pool that became failed or timed out ->
    DOWN in Slurm with dynprov's reason. Inactive without a ``[slurm]`` section."""
    from pxe import hooks, states

    if event.kind != hooks.NODES or "slurm" not in (getattr(cfg, "raw", None) or {}):
        return
    down = {c.node: c.reason or c.state for c in event.changes if c.state in states.DOWN}
    if not down:
        return
    from slurm_plugin import conf, toolkit

    ss = conf.settings(cfg)
    pool = toolkit.scheduler_node_names(cfg)
    by_reason: dict[str, list[str]] = {}
    for node, reason in sorted(down.items()):
        if node in pool:
            by_reason.setdefault(reason, []).append(node)
    env = {**os.environ, "SLURM_CONF": ss.slurm_conf} if ss.slurm_conf else None
    end = time.monotonic() + HOOK_BUDGET
    for reason, names in by_reason.items():
        folded = toolkit.fold(names)
        left = end - time.monotonic()
        if left <= 1:
            log.warning("slurm: no time left to set %s DOWN (run dynprov-slurm sync)", folded)
            continue
        try:
            mark_down(folded, reason, timeout=min(SCONTROL_TIMEOUT, left), env=env)
        except DynprovError as exc:
            log.warning("slurm: %s (run dynprov-slurm sync once slurmctld answers)", exc)
            continue
        log.info("slurm: %s DOWN: %s", folded, reason_text(reason))
