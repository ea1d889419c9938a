"""The package as a site installs it: sdist and wheel from the standard build front-end, the wheel
installed into a fresh venv with no source tree on its path, and the commands run from there."""

from __future__ import annotations

import os
import shutil
import site as site_module
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from pxe import assets, config
from tests.conftest import ROOT

# Copied into the venv test's work dir: what the unit tests read besides the code (their own
# helpers, the tools they run, the hand-written man-page sections, pytest's settings).
TEST_SUPPORT = ("tests", "tools", "docs", "contrib", "pyproject.toml")
BUILD_JUNK = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
                                    ".pytest_cache", ".ruff_cache", ".venv")


def tree_packages() -> set[str]:
    return {".".join(p.parent.relative_to(ROOT).parts)
            for top in ("pxe", "lab", "msm_plugin", "slurm_plugin")
            for p in (ROOT / top).rglob("__init__.py")}


@pytest.mark.unit
def test_pyproject_lists_every_package_and_maps_every_asset_folder():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {f"pxe.assets.{name}": folder for name, folder in assets.SOURCE_DIRS.items()}
    assert set(setuptools["packages"]) == tree_packages() | set(mapped)
    assert setuptools["package-dir"] == mapped
    assert set(setuptools["package-data"]) == set(mapped)
    for folder in mapped.values():
        assert (ROOT / folder).is_dir() and not (ROOT / folder / "__init__.py").exists()


@pytest.mark.unit
def test_a_checkout_reads_its_top_level_folders():
    assert assets.templates() == ROOT / "templates"
    assert assets.initramfs() == ROOT / "initramfs"
    assert assets.systemd() == ROOT / "contrib" / "systemd"


@pytest.mark.integration
def test_link_scripts_makes_every_command_callable_from_a_path_folder(tmp_path):
    """tools/install-deps runs it for /usr/local/bin; here into a throw-away folder."""
    import sysconfig

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fg-pool").write_text("#!/bin/sh\necho someone else's\n")  # not ours: kept
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "link-scripts"), str(bin_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"{bin_dir}/fg-pool is another file; not replaced" in proc.stderr
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in scripts:
        link = bin_dir / name
        if name == "fg-pool":
            assert not link.is_symlink()
            continue
        assert link.is_symlink() and link.readlink() == Path(sysconfig.get_path("scripts")) / name
    (bin_dir / "fg-pool").unlink()
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "link-scripts"), str(bin_dir)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert f"{len(scripts)} commands in {bin_dir}" in again.stdout
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(["pxe-stage", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and "usage: pxe-stage" in run.stdout, run.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """sdist, then the wheel built from the unpacked sdist (so the sdist must be complete)."""
    work = tmp_path_factory.mktemp("build")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=BUILD_JUNK)  # the checkout stays clean of build output
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                           str(work / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (work / "dist").glob("dynprov-*.whl")
    (sdist,) = (work / "dist").glob("dynprov-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "work": work}


@pytest.mark.integration
def test_sdist_and_wheel_carry_templates_initramfs_and_units(built):
    with tarfile.open(built["sdist"]) as tar:
        in_sdist = {"/".join(n.split("/")[1:]) for n in tar.getnames()}
    with zipfile.ZipFile(built["wheel"]) as zf:
        in_wheel = set(zf.namelist())
    for name, folder in assets.SOURCE_DIRS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file():
                rel = path.relative_to(ROOT / folder).as_posix()
                assert f"{folder}/{rel}" in in_sdist
                assert f"pxe/assets/{name}/{rel}" in in_wheel
    assert {"tests/conftest.py", "tools/install-deps", "pyproject.toml"} <= in_sdist
    assert not [n for n in in_wheel if n.startswith(("tests/", "templates/", "initramfs/"))]


@pytest.mark.integration
def test_wheel_in_a_fresh_venv_runs_the_commands_and_the_unit_tests(built, tmp_path):
    """~90 s, most of it the unit suite run against the installed wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies (jinja2, pytest ...) come from this interpreter's site-packages as a plain path:
    # its .pth files, among them an editable install of this checkout, are NOT processed.
    (Path(purelib) / "deps.pth").write_text("\n".join(site_module.getsitepackages()) + "\n")
    # Without PYTHONPATH: a checkout on it (with its dynprov.egg-info) makes pip see dynprov as
    # installed already and install nothing.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "--quiet", str(built["wheel"])], check=True, timeout=300, env=clean)

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DYNPROV_CONFIG")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"

    def run(*argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)

    where = run(str(python), "-c", "import pxe, msm_plugin, pxe.assets as a; "
                "print(pxe.__file__, msm_plugin.__file__, a.templates(), a.initramfs(), a.systemd())")
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert path.startswith(purelib), where.stdout  # nothing from the checkout
    assert str(ROOT) not in where.stdout

    root = tmp_path / "site"
    root.mkdir()
    conf = root / "dynprov.toml"
    conf.write_text(config.example(root))
    env["DYNPROV_CONFIG"] = str(conf)
    for i in (1, 2):
        added = run("pxe-stage", "nodes", "add", f"n00{i}", "--mac", f"52:54:00:dd:00:0{i}",
                    "--ip", f"198.18.0.{20 + i}", *(["--firmware", "uefi"] if i == 2 else []))
        assert added.returncode == 0, added.stderr
    check = run("pxe-stage", "render", "--check")  # dnsmasq --test: tools/install-deps installs it
    assert check.returncode == 0, check.stderr
    assert f"dhcp/dnsmasq.conf.j2: {purelib}/pxe/assets/templates/dhcp/dnsmasq.conf.j2 (packaged)" \
        in check.stdout
    assert "boot files: 7 rendered" in check.stdout
    query = run("cluster-query")
    assert query.returncode == 0, query.stderr
    assert [line.split()[0] for line in query.stdout.splitlines() if line.strip()][-2:] == ["n001", "n002"]
    moab = run("fg-moab", "-config")
    assert moab.returncode == 0, moab.stderr
    assert f"{venv}/bin/os-switch" in moab.stdout and f"{venv}/bin/cluster-query" in moab.stdout
    initrd = run(str(python), "-c", "from pxe import initramfs; print(len(initramfs.shell_file('init')))")
    assert initrd.returncode == 0 and int(initrd.stdout) > 1000, initrd.stderr

    # The unit tests, against the installed package: only the test support is copied, no code.
    for name in TEST_SUPPORT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, cwd / name, ignore=BUILD_JUNK)
        else:
            shutil.copy2(src, cwd / name)
    del env["DYNPROV_CONFIG"]
    units = run(str(python), "-m", "pytest", "-q", "-m", "unit", "-p", "no:cacheprovider",
                "--ignore=tests/test_packaging.py", "tests")  # its unit tests are about the checkout
    assert units.returncode == 0, units.stdout[-4000:] + units.stderr[-2000:]
    assert " passed" in units.stdout
