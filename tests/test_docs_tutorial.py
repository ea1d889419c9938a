"""e2e: every command of docs/tutorial.md, in order, in the lab, so the tutorial fails CI when it
goes stale.

The ```sh blocks are joined into one bash script (cd, variables and exports carry over, as when
a reader pastes them into one shell) and run with `set -e` from the top of the source tree, with
WORK pointing into the test's temp dir. The tutorial's own waiting loop is bounded (120 x 5 s)
and the whole script has a time limit. Whatever happens, the lab is taken down and its
namespace must be gone; on failure the VMs' serial logs and the lab's logs are printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_e2e_support import need_root_tools, serial_logs_on_failure

from lab import netns

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
NETNS = "dptutorial"  # the tutorial's [lab] netns
SCRIPT_TIMEOUT = 1500


def sh_blocks(text: str) -> list[str]:
    """The bodies of the ```sh fenced blocks, in order."""
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)


def test_tutorial_has_the_walk():
    """The steps the tutorial promises are all there (cheap guard, no lab)."""
    script = "\n".join(sh_blocks(TUTORIAL.read_text()))
    for needle in ("dynprov-lab up", "fg-moab-image -upload", "cluster-query",
                   "lab exec -- os-switch", "dynprov-lab down"):
        assert needle in script, needle


def test_every_tutorial_command_runs_in_the_lab(tmp_path):
    need_root_tools()
    if netns.exists(NETNS):
        pytest.skip(f"network namespace {NETNS} exists already (another run of the tutorial?)")
    work = tmp_path / "work"
    script = "set -e -x\n" + "\n".join(sh_blocks(TUTORIAL.read_text()))
    env = {**os.environ, "WORK": str(work)}
    env.pop("DYNPROV_CONFIG", None)
    bindir = str(Path(sys.executable).parent)  # our console scripts live beside python
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    config = work / "dynprov.toml"
    lab_dir = work / "state" / "lab"
    try:
        with serial_logs_on_failure([lab_dir / "serial", lab_dir, work / "state"]):
            proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
            print(proc.stdout[-20000:])
            print(proc.stderr[-20000:], file=sys.stderr)
            assert proc.returncode == 0, f"tutorial failed (exit {proc.returncode}):\n" \
                                         f"{proc.stderr[-4000:]}"
            assert "2 of 2 nodes ready" in proc.stdout
            assert "OS=_used-mpi-demo" in proc.stdout
    finally:
        if config.exists() and (lab_dir / "lab.json").exists():
            subprocess.run([sys.executable, "-m", "lab.cli", "down"], cwd=ROOT,
                           env={**env, "DYNPROV_CONFIG": str(config)}, capture_output=True,
                           text=True, timeout=120)
        assert not netns.exists(NETNS), "the tutorial left its namespace behind"
    assert not work.exists(), "the tutorial's last step removes its directory"
