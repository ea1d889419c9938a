"""The Slurm face without daemons: config lines, the marked-block install, the node side's
reading of its boot (cmdline, os-release), and bad input."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_slurm_support import cli

from pxe.errors import DynprovError, InputError
from slurm_plugin import conf, node
from tests.conftest import Site, fake_bzimage

pytestmark = pytest.mark.unit


@pytest.fixture
def slurm_site(site: Site, tmp_path: Path) -> Site:
    kernel = fake_bzimage(tmp_path / "vmlinuz", b"k" * 64)
    for i, name in enumerate(("n001", "n002"), start=1):
        site.run("nodes", "add", name, "--mac", f"52:54:00:ab:01:{i:02x}", check=True)
    for label in ("sles11", "centos5"):
        site.run("images", "add", label, "--kernel", str(kernel), check=True)
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("helper", "reboot", "resume", "suspend"):
        path = tools / f"dynprov-slurm-{name}"
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    with open(site.config_path, "a") as fh:
        fh.write(f'\n[slurm]\ntools_dir = "{tools}"\nresume_timeout = 900\n')
    return site


def _config(site: Site, *argv: str):
    return cli("config", *argv, env={"DYNPROV_CONFIG": str(site.config_path)})


def test_config_prints_both_files(slurm_site: Site, tmp_path: Path) -> None:
    proc = _config(slurm_site)
    assert proc.returncode == 0, proc.stderr
    slurm, helpers = proc.stdout.split("# --- helpers.conf (beside slurm.conf) ---\n")
    tools = tmp_path / "tools"
    assert "NodeFeaturesPlugins=node_features/helpers\n" in slurm
    assert f"RebootProgram={tools}/dynprov-slurm-reboot\n" in slurm
    assert f"ResumeProgram={tools}/dynprov-slurm-resume\n" in slurm
    assert "ResumeTimeout=900\n" in slurm
    assert "# NodeName=n001 Feature=centos5,sles11\n" in slurm
    # one Feature= line per label: Slurm 22.05 refuses the comma form
    assert helpers.splitlines() == [
        "ExecTime=10", f"Feature=centos5 Helper={tools}/dynprov-slurm-helper",
        f"Feature=sles11 Helper={tools}/dynprov-slurm-helper"]


def test_helper_path_can_be_the_fast_one(slurm_site: Site) -> None:
    with open(slurm_site.config_path, "a") as fh:
        fh.write('helper = "/usr/local/sbin/dynprov-slurm-helper"\n')
    proc = _config(slurm_site)
    assert "Feature=sles11 Helper=/usr/local/sbin/dynprov-slurm-helper\n" in proc.stdout
    with open(slurm_site.config_path, "a") as fh:
        fh.write('\n[slurm]\nhelper = "rel/path"\n')
    proc = _config(slurm_site)
    assert proc.returncode == 2 and "slurm" in proc.stderr


def test_default_helper_is_the_sh_fast_path(site: Site, tmp_path: Path) -> None:
    """Without [slurm] helper/tools_dir, helpers.conf names the sh helper shipped with dynprov
    (slurmd runs it at every registration), not the Python console script; it answers."""
    kernel = fake_bzimage(tmp_path / "vmlinuz", b"k" * 64)
    site.run("images", "add", "sles11", "--kernel", str(kernel), check=True)
    bin_dir = tmp_path / "bin"  # RebootProgram= & co. are still found on PATH
    bin_dir.mkdir()
    for name in ("reboot", "resume", "suspend"):
        (bin_dir / f"dynprov-slurm-{name}").write_text("#!/bin/sh\n")
        (bin_dir / f"dynprov-slurm-{name}").chmod(0o755)
    with open(site.config_path, "a") as fh:
        fh.write("\n[slurm]\nresume_timeout = 900\n")
    proc = cli("config", env={"DYNPROV_CONFIG": str(site.config_path),
                              "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    helpers = proc.stdout.split("# --- helpers.conf (beside slurm.conf) ---\n")[1]
    helper = Path(helpers.splitlines()[1].split("Helper=")[1])
    assert helper.name == "dynprov-slurm-helper" and helper.is_absolute()
    assert helper.read_text().startswith("#!/bin/sh\n"), helper
    assert "warning" not in proc.stderr
    node_root = tmp_path / "node"
    (node_root / "etc").mkdir(parents=True)
    (node_root / "etc" / "os-release").write_text("ID=debian\nIMAGE_ID=sles11\n")
    run = subprocess.run([str(helper)], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "DYNPROV_NODE_ROOT": str(node_root)})
    assert (run.returncode, run.stdout) == (0, "sles11\n"), run.stderr


def test_config_warns_of_a_python_helper(slurm_site: Site, tmp_path: Path) -> None:
    (tmp_path / "tools" / "dynprov-slurm-helper").write_text("#!/usr/bin/python3\n")
    proc = _config(slurm_site)
    assert proc.returncode == 0, proc.stderr
    assert "warning: Helper=" in proc.stderr and "Python program" in proc.stderr
    assert "sh fast path" in proc.stderr


def test_install_marked_block_with_backup(slurm_site: Site, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    slurm_conf = etc / "slurm.conf"
    original = "ClusterName=c1\nRebootProgram=/sbin/reboot\n"
    slurm_conf.write_text(original)
    proc = _config(slurm_site, "-install", str(slurm_conf))
    assert proc.returncode == 0, proc.stderr
    assert "also set outside the dynprov block" in proc.stderr  # the admin's RebootProgram
    text = slurm_conf.read_text()
    assert text.startswith(original) and text.count(conf.BEGIN) == 1
    backups = list(etc.glob("slurm.conf.dynprov-*.bak"))
    assert [b.read_text() for b in backups] == [original]
    helpers = (etc / "helpers.conf").read_text()
    assert helpers.count("Feature=") == 2 and conf.BEGIN in helpers
    # idempotent; a new image becomes a feature on the next -install
    proc = _config(slurm_site, "-install", str(slurm_conf))
    assert proc.stdout.count("already up to date") == 2
    fake_bzimage(tmp_path / "k2", b"x")
    slurm_site.run("images", "add", "rocky9", "--kernel", str(tmp_path / "k2"), check=True)
    proc = _config(slurm_site, "-install", str(slurm_conf))
    assert proc.returncode == 0 and "scontrol reconfigure" in proc.stdout
    assert "Feature=rocky9 Helper=" in (etc / "helpers.conf").read_text()
    assert (etc / "helpers.conf").read_text().count(conf.BEGIN) == 1


def test_install_refuses_damaged_markers(slurm_site: Site, tmp_path: Path) -> None:
    path = tmp_path / "slurm.conf"
    path.write_text(f"ClusterName=c1\n{conf.BEGIN}\nfoo\n")
    before = path.read_bytes()
    proc = _config(slurm_site, "-install", str(path))
    assert proc.returncode == 1 and "markers are damaged" in proc.stderr
    assert path.read_bytes() == before and not (tmp_path / "helpers.conf").exists()
    proc = _config(slurm_site, "-install", str(tmp_path / "missing.conf"))
    assert proc.returncode == 1 and "no such file" in proc.stderr


def test_settings_checked(site: Site) -> None:
    with open(site.config_path, "a") as fh:
        fh.write('\n[slurm]\nresume_timeout = "soon"\n')
    with pytest.raises(InputError, match="slurm.resume_timeout"):
        conf.settings(site.cfg)


def test_node_reads_its_boot(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "proc" / "cmdline").write_text(
        "quiet dynprov.server=http://10.0.0.1:8080 dynprov.node=n007 dynprov.token=abc\n")
    (tmp_path / "etc" / "os-release").write_text('ID=debian\nIMAGE_ID="sles11"\n')
    assert node.identity(tmp_path) == ("http://10.0.0.1:8080", "n007")
    assert node.os_label(tmp_path) == "sles11"
    (tmp_path / "etc" / "os-release").write_text("ID=debian\n")
    assert node.os_label(tmp_path) == "debian"
    (tmp_path / "etc" / "os-release").write_text("ID=../../x\n")
    with pytest.raises(DynprovError, match="cannot tell the image"):
        node.os_label(tmp_path)
    (tmp_path / "proc" / "cmdline").write_text("dynprov.server=http://x;rm dynprov.node=n1\n")
    with pytest.raises(DynprovError, match="not a dynprov boot"):
        node.identity(tmp_path)


def test_helper_without_argument_prints_the_image(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").write_text("IMAGE_ID=centos5\n")
    proc = cli("helper", env={"DYNPROV_NODE_ROOT": str(tmp_path)})
    assert (proc.returncode, proc.stdout) == (0, "centos5\n")
    os.remove(tmp_path / "etc" / "os-release")
    proc = cli("helper", env={"DYNPROV_NODE_ROOT": str(tmp_path)})
    assert proc.returncode == 1 and "cannot tell the image" in proc.stderr


def test_node_side_errors_are_one_line(tmp_path: Path) -> None:
    env = {"DYNPROV_NODE_ROOT": str(tmp_path)}
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cmdline").write_text("dynprov.server=http://127.0.0.1:9 dynprov.node=n1\n")
    proc = cli("reboot", env=env)
    assert proc.returncode == 1 and "run 'dynprov-slurm enroll'" in proc.stderr
    (tmp_path / "etc" / "dynprov").mkdir(parents=True)
    (tmp_path / "etc" / "dynprov" / "node-key").write_text("k" * 43)
    proc = cli("helper", "sles11", env=env)  # nothing listens on port 9: server unreachable
    assert proc.returncode == 1 and "unreachable" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli("enroll", env=env)
    assert proc.returncode == 1 and "no dynprov.token" in proc.stderr
    proc = cli("helper", "a", "b", env=env)
    assert proc.returncode == 2


@pytest.mark.parametrize("text", [
    'NAME="Debian"\nID=debian\nIMAGE_ID="sles11"\n', "IMAGE_ID='centos5'\nID=centos\n",
    "ID=debian\n", "ID=debian", "IMAGE_ID=../etc\n", "NAME=none\n", "IMAGE_ID=a b\n",
    "ID=-x\n",
])
def test_fast_sh_helper_agrees_with_the_python_one(tmp_path: Path, text: str) -> None:
    import subprocess

    from test_slurm_support import FAST_HELPER

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").write_text(text)
    env = {"DYNPROV_NODE_ROOT": str(tmp_path)}
    py = cli("helper", env=env)
    sh = subprocess.run(["dash", str(FAST_HELPER)], capture_output=True, text=True, timeout=30,
                        env={**os.environ, **env})
    assert (sh.returncode, sh.stdout) == (py.returncode, py.stdout), (sh.stderr, py.stderr)
    if py.returncode:
        assert "cannot tell the image" in sh.stderr
    proc = subprocess.run(["dash", str(FAST_HELPER), "a", "b"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2


def test_down_reason_is_one_printable_line() -> None:
    from slurm_plugin import down

    assert down.reason_text("disk\nnot found\x1b[31m") == "dynprov: disk not found [31m"
    assert down.reason_text("") == "dynprov: re-image failed"
    assert len(down.reason_text("x" * 1000)) == 200
