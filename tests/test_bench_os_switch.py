"""tools/bench_os_switch.py for real on a few virtual BMCs: both sides (os-switch and the
ipmipower baseline) run interleaved, every node of each side is counted, and a baseline that
fails is reported as such and fails the run (never a ratio against an incomplete baseline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "tools" / "bench_os_switch.py"


def bench(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(BENCH), "--nodes", "12", "--bmc-processes", "2",
                           "--repeat", "2", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout + proc.stderr
    return proc, dict(kv.split("=", 1) for kv in last.split()[1:])


@pytest.mark.integration
def test_both_sides_cycle_every_node_interleaved() -> None:
    proc, fields = bench()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fields["ours_ok"] == "12" and fields["ipmipower_ok"] == "12"
    assert fields["repeat"] == "2"
    rounds = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("round ")]
    assert len(rounds) == 2 and all("12/12 cycled" in r and "12/12 ok" in r for r in rounds)
    ratio = float(fields["vs_ipmipower"])
    assert ratio == pytest.approx(float(fields["ours_s"]) / float(fields["ipmipower_s"]),
                                  rel=1e-3)
    lo, hi = (float(x) for x in fields["vs_ipmipower_spread"].split("-"))
    assert 0 < lo <= hi
    assert 0 < float(fields["power_s"]) < float(fields["ours_s"])
    per_round = [line for line in proc.stdout.splitlines() if "per round:" in line]
    assert len(per_round) == 1 and len(per_round[0].split(":")[1].split(",")) == 2


@pytest.mark.integration
def test_a_failing_baseline_is_reported_and_fails_the_run() -> None:
    # -u overrides the config file's user: every BMC refuses the unknown name.
    proc, fields = bench("--ipmipower-args", "--session-timeout 5000 -u nobody")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert fields["ipmipower_ok"] == "0" and fields["ours_ok"] == "12"
    assert "ipmipower failed: 12 x " in proc.stdout
