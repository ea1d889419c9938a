"""tools/profile_power_cycle.py for real on a few virtual BMCs: both sides power-cycle every
node, and our engine's own count says how many IPMI requests a netboot costs (9 a node: login 4,
privilege, boot flag, chassis status, chassis control, close)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "profile_power_cycle.py"


@pytest.mark.integration
def test_netboot_costs_nine_requests_a_node_and_both_sides_finish() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(TOOL), "--nodes", "6", "--bmc-processes", "1",
                           "--repeat", "2"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout
    fields = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert fields["failed"] == "0" and fields["ours_sessions"] == "12"
    assert float(fields["ours_requests_per_session"]) == 9.0
    rounds = [line for line in proc.stdout.splitlines() if "round " in line]
    assert len(rounds) == 4 and sum("0 failed" in r for r in rounds) == 2
    assert sum("6 ok" in r for r in rounds) == 2
