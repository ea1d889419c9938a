"""tools/install-launcher: `python3 -S` launchers for cluster-query and pxe-stage that print what
pip's entry points print, and a launcher that does not start never replaces the one in place."""

import importlib.util
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

from pxe.inventory import Inventory, build

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "install-launcher"
_loader = SourceFileLoader("install_launcher", str(TOOL))
launcher = importlib.util.module_from_spec(importlib.util.spec_from_loader(_loader.name, _loader))
_loader.exec_module(launcher)

pytestmark = pytest.mark.integration


def test_launchers_answer_as_the_modules_do(site, tmp_path):
    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": f"n{i}", "mac": f"52:54:00:dd:00:0{i}"})
                        for i in range(1, 4)])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = subprocess.run([sys.executable, str(TOOL), "--dir", str(bin_dir)], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "cluster-query" in out and "pxe-stage" in out
    for name in ("cluster-query", "pxe-stage"):
        assert (bin_dir / name).read_text().startswith(f"#!{sys.executable} -S\n")
    assert list((ROOT / "msm_plugin" / "__pycache__").glob("cluster_query.*.pyc"))
    env_argv = {"cluster-query": [], "pxe-stage": ["nodes", "list"]}
    for name, argv in env_argv.items():
        lean = subprocess.run([str(bin_dir / name), *argv], capture_output=True, text=True,
                              timeout=120, env={"DYNPROV_CONFIG": str(site.config_path),
                                                "PATH": "/usr/bin:/bin"})
        module = site.run(*argv, cmd=name)
        assert lean.returncode == module.returncode == 0, lean.stderr
        body = [ln for ln in lean.stdout.splitlines() if not ln.startswith("#")]
        assert body == [ln for ln in module.stdout.splitlines() if not ln.startswith("#")]
        assert "n1" in lean.stdout


def test_a_launcher_that_does_not_start_replaces_nothing(tmp_path):
    dest = tmp_path / "pxe-stage"
    dest.write_text("#!/bin/sh\necho pip's wrapper\n")
    empty_root = tmp_path / "no-checkout"
    (empty_root / "pxe").mkdir(parents=True)
    (empty_root / "pxe" / "__init__.py").write_text("")  # a pxe without pxe.cli.main
    with pytest.raises(SystemExit, match="does not start"):
        launcher.install(dest, sys.executable, empty_root, "pxe-stage")
    assert dest.read_text() == "#!/bin/sh\necho pip's wrapper\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-checkout", "pxe-stage"]


def test_unknown_command_is_bad_usage(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--dir", str(tmp_path), "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown command 'nope'" in proc.stderr
    assert not list(tmp_path.iterdir())
