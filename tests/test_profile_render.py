"""tools/profile_render.py for real on a small site: both cases run through the launcher and
report what they were meant to (the tool fails unless the first says the DHCP config is
unchanged and the second that it installed one), with the slowest imports of each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "profile_render.py"


@pytest.mark.integration
def test_both_cases_run_and_report_their_imports() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(TOOL), "--nodes", "40", "--repeat", "2",
                           "--importtime", str(ROOT)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and "ms" not in line]
    assert rows == ["bare dhcpd -t", "unchanged", "one changed"]
    unchanged, changed = proc.stdout.split("\n== ")[1:3]
    assert unchanged.startswith(f"{ROOT}: unchanged") and changed.startswith(f"{ROOT}: one changed")
    for section in (unchanged, changed):
        assert 0 < section.count("import time:") <= 12
