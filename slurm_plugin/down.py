"""Failed re-images -> Slurm: the node DOWN with dynprov's reason, before ResumeTimeout.

Without this slurmctld only learns after ResumeTimeout that a rebooted node never came back,
and says "reboot timed out". With it the node is DOWN within a few seconds of the run's failure,
with our reason (``scontrol show node`` / ``sinfo -R``), and its job is requeued elsewhere.

Each failed run of a node is reported once (settings key ``slurm-down:<node>`` = run id), so an
admin's ``scontrol update State=RESUME`` is not undone by the next sync. Called as
`dynprov-slurm sync` (a timer on the slurmctld host) and, once the toolkit's state-change hook
exists, from it for each node that ends a run failed or timed out.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
from collections.abc import Sequence

from pxe.errors import DynprovError

SETTING = "slurm-down:"
_REASON_BAD = re.compile(r"[^\x20-\x7e]")


def reason_text(reason: str) -> str:
    """One printable line for scontrol's Reason= (our prefix, no control characters)."""
    return ("dynprov: " + _REASON_BAD.sub(" ", reason or "re-image failed")).strip()[:200]


def mark_down(node: str, reason: str, scontrol: str = "scontrol") -> None:
    """scontrol update NodeName=NODE State=DOWN Reason="dynprov: ..." (argv, no shell)."""
    if not shutil.which(scontrol):
        raise DynprovError(f"{scontrol} not found: is slurm-client installed?")
    proc = subprocess.run([scontrol, "update", f"NodeName={node}", "State=DOWN",
                           f"Reason={reason_text(reason)}"],
                          capture_output=True, text=True, timeout=30)
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
