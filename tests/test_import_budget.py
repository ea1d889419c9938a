"""What `pxe-stage set-boot --render` imports through the `python3 -S` launcher an admin runs: with
the checked config cached (pxe.configcache) and the DHCP config unchanged, none of the modules
that cost a short command more than its work (a list of modules, not of times: the times are
measured in tools/bench_render.py)."""

from __future__ import annotations

import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import pytest

from pxe.inventory import Inventory, build

ROOT = Path(__file__).resolve().parent.parent
_loader = SourceFileLoader("install_launcher", str(ROOT / "tools" / "install-launcher"))
launcher = module_from_spec(spec_from_loader(_loader.name, _loader))
_loader.exec_module(launcher)

pytestmark = pytest.mark.integration

# Heavy or needless on this path: the config's parser and checks (tomllib, netaddr), templates
# (jinja2), the node-set library (ClusterShell), logging, typing/shutil/tempfile/subprocess/socket,
# the DHCP daemon's checker (pxe.dhcp), image versions (pxe.imageversions: set-boot reads one row),
# dataclasses and what it imports.
NOT_ON_THE_PATH = ("netaddr", "tomllib", "jinja2", "ClusterShell", "logging", "typing", "shutil",
                   "tempfile", "subprocess", "socket", "pxe.dhcp", "importlib.resources",
                   "pxe.imageversions", "pxe.userfile",
                   # dataclasses (with inspect, ast, dis, tokenize) was ~17 ms of every start:
                   # the records on the path are pxe.records.Record
                   "dataclasses", "inspect", "ast", "dis", "tokenize",
                   "base64",  # set-boot's tokens: binascii, as base64 encodes them
                   # OpenSSL (~3 ms): the record's keys and digests are BLAKE2b (_blake2)
                   "hashlib", "_hashlib",
                   # a thread (the spliced file's fsync) is _thread's
                   "threading", "selectors")
# One node's MAC changed (pxe.dhcpincremental): the daemon's check runs (pxe.dhcp, started by
# pxe.childproc's posix_spawn, its temp file pxe.atomic's), the entry is rendered from
# pxe.dhcpformat's formats - still none of the rest.
NOT_ON_THE_CHANGE_PATH = tuple(m for m in NOT_ON_THE_PATH if m != "pxe.dhcp")


def imported(proc: subprocess.CompletedProcess) -> set[str]:
    """The modules `python3 -X importtime` reported loading (its stderr)."""
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_set_boot_render_imports_nothing_it_does_not_use(site, kernel, tmp_path):
    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": f"n{i}", "mac": f"52:54:00:ee:00:0{i}"})
                        for i in range(1, 4)])
    site.run("images", "add", "centos5", "--kernel", str(kernel), check=True)
    stage = tmp_path / "pxe-stage"
    stage.write_text(launcher.launcher_text(sys.executable, ROOT, "pxe-stage"))
    argv = [sys.executable, "-S", "-X", "importtime", str(stage), "set-boot", "n[1-3]", "--os",
            "centos5", "--render", "--no-reload"]
    env = {"DYNPROV_CONFIG": str(site.config_path), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}

    def run() -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "n[1-3]: next boot centos5 (3 node(s))" in proc.stdout
        return proc

    first = run()  # renders, checks and installs the DHCP config; caches the checked config
    assert "installed" in first.stdout.split("boot files")[0]
    warm = run()
    assert "unchanged" in warm.stdout.split("boot files")[0]
    modules = imported(warm)
    assert {"pxe.configcache", "pxe.setboot", "pxe.dhcpinputs", "sqlite3"} <= modules
    assert sorted(m for m in NOT_ON_THE_PATH if m in modules) == []

    # One node's MAC changed: only its entry is rendered, checked and spliced in.
    inv = Inventory(cfg)
    inv.add([build(cfg, {"name": "n2", "mac": "52:54:00:ee:00:12"})], replace_existing=True)
    inv.conn.close()
    changed = run()
    assert "installed" in changed.stdout.split("boot files")[0]
    modules = imported(changed)
    assert {"pxe.dhcpincremental", "pxe.dhcpformat", "pxe.dhcp", "pxe.childproc"} <= modules
    assert sorted(m for m in NOT_ON_THE_CHANGE_PATH if m in modules) == []
    assert "52:54:00:ee:00:12" in cfg.dhcp.config_file.read_text()

    # The list is what a cold start pays: an edited config is parsed and checked in full.
    site.config_path.write_text(site.config_path.read_text() + "\n# edited\n")
    cold = imported(run())
    assert {"tomllib", "netaddr"} <= cold and "jinja2" not in cold
    assert sorted(m for m in ("tomllib", "netaddr") if m in imported(run())) == []  # warm again
