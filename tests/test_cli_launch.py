"""pxe.cli.guard.launch, the installed `pxe-stage` and `cluster-query`: set-boot, render and Moab's
poll run without the cyclic GC and end with os._exit once their output is flushed (no teardown);
other commands end as usual.
Real processes: a marker registered with atexit shows whether the teardown ran, a gc callback
whether a collection ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pxe.inventory import Inventory, build

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent

PROLOGUE = """\
import atexit, gc, os, sys
sys.argv = ["pxe-stage", *sys.argv[1:]]
from {module} import launch
import pxe.cli.guard  # what launch() imports first: the GC is off from there on
atexit.register(lambda: os.write(2, b"TEARDOWN\\n"))
gc.callbacks.append(lambda phase, info: phase == "start" and os.write(2, b"GC\\n"))
sys.exit(launch())
"""


def launched(site, *argv: str, module: str = "pxe.cli.main") -> subprocess.CompletedProcess:
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", PROLOGUE.format(module=module), *argv],
                          capture_output=True, text=True, env=env, timeout=120)


def on_postgresql(site) -> int:
    """1 when the state is in PostgreSQL: its connection is closed properly, the usual exit."""
    return int("postgresql" in site.config_path.read_text())


@pytest.fixture
def nodes(site):
    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": f"n{i}", "mac": f"52:54:00:ab:00:0{i}"})
                        for i in range(1, 4)])
    return cfg


def test_set_boot_render_skips_gc_and_teardown_and_loses_no_output(site, nodes):
    proc = launched(site, "set-boot", "n[1-3]", "--local", "--render", "--no-reload")
    assert proc.returncode == 0, proc.stderr
    assert "n[1-3]: next boot local disk (3 node(s))" in proc.stdout  # flushed before _exit
    assert "boot files:" in proc.stdout and "loader" in proc.stdout.splitlines()[-1]
    assert "GC" not in proc.stderr
    assert proc.stderr.count("TEARDOWN") == on_postgresql(site), proc.stderr
    assert "52:54:00:ab:00:02" in nodes.dhcp.config_file.read_text()


def test_a_failing_short_command_keeps_its_exit_code_and_message(site, nodes):
    proc = launched(site, "set-boot", "n9", "--local", "--render", "--no-reload")
    assert proc.returncode == 1 and "unknown node(s): n9" in proc.stderr  # (logged: usual exit)
    proc = launched(site, "set-boot", "n1", "--os", "../x")
    assert proc.returncode == 2 and "invalid image label" in proc.stderr


def test_other_commands_end_as_usual(site, nodes):
    proc = launched(site, "nodes", "list")
    assert proc.returncode == 0 and "n1" in proc.stdout, proc.stderr
    assert proc.stderr.count("TEARDOWN") == 1 and "GC" in proc.stderr


def test_moabs_poll_skips_gc_and_teardown_and_loses_no_line(site, nodes):
    proc = launched(site, module="msm_plugin.cluster_query")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines if not line.startswith("#")) == \
        ["n1", "n2", "n3"], proc.stdout
    assert "GC" not in proc.stderr
    assert proc.stderr.count("TEARDOWN") == on_postgresql(site), proc.stderr
