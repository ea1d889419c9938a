"""`pxe-stage install-units`: the sandboxed units of serve and the REST service, fitted to the site,
checked by the real systemd-analyze, and installed only when it is satisfied."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pxe import assets, units
from pxe.errors import DynprovError

pytestmark = pytest.mark.integration

ANALYZE = shutil.which("systemd-analyze")  # Debian package systemd (tools/install-deps)


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def exe(tmp_path) -> Path:
    """A stand-in for this installation's pxe-stage (the default one depends on the machine)."""
    path = tmp_path / "bin" / "pxe-stage"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_installed_units_are_sandboxed_fitted_to_the_site_and_verify_clean(site, tmp_path, exe):
    dnsmasq_d = tmp_path / "dnsmasq.d"  # as /etc/dnsmasq.d: outside the site's folders
    site.config_path.write_text(site.config_path.read_text().replace(
        f'config_file = "{site.root / "dnsmasq.conf"}"', f'config_file = "{dnsmasq_d / "dynprov.conf"}"'))
    root = tmp_path / "root"
    proc = site.run("install-units", "--root", str(root), "--exec", str(exe))
    assert proc.returncode == 0, proc.stderr
    cfg = site.cfg
    serve = root / "etc/systemd/system/dynprov-serve.service"
    api = root / "etc/systemd/system/dynprov-api.service"
    assert proc.stdout.splitlines() == [f"{serve}: installed", f"{api}: installed"]
    for path in (serve, api):
        check = verify(path)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stderr
        d = directives(path.read_text())
        assert d["ProtectSystem"] == ["strict"] and d["NoNewPrivileges"] == ["yes"]
        assert d["PrivateTmp"] == ["yes"] and d["Type"] == ["notify"]
        assert d["Environment"] == [f"DYNPROV_CONFIG={site.config_path}"]
    s, a = directives(serve.read_text()), directives(api.read_text())
    assert s["ExecStart"] == [f"{exe} serve"] and a["ExecStart"] == [f"{exe} api serve"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert s["ReadWritePaths"] == [f"{cfg.paths.state_dir} {cfg.paths.tftp_root} {cfg.paths.http_root}"]
    # The REST service also rewrites the DHCP config (POST images/init); the repository is inside
    # the state dir here, so it adds nothing.
    assert a["ReadWritePaths"] == [f"{cfg.paths.state_dir} {cfg.paths.tftp_root} {cfg.paths.http_root} "
                                   f"{dnsmasq_d}"]
    again = site.run("install-units", "--root", str(root), "--exec", str(exe), "--unit", "serve")
    assert again.returncode == 0 and again.stdout.strip() == f"{serve}: unchanged"


def test_the_packaged_units_differ_only_in_the_fitted_lines(site, exe):
    for which, name in units.UNITS.items():
        packaged = (assets.systemd() / name).read_text().splitlines()
        fitted = units.render(site.cfg, which, exe).text.splitlines()
        changed = [(a, b) for a, b in zip(packaged, fitted, strict=True) if a != b]
        assert sorted(b.split("=", 1)[0] for _, b in changed) == ["Environment", "ExecStart",
                                                                   "ReadWritePaths"]


def test_a_unit_systemd_rejects_is_not_installed(site, tmp_path, exe):
    unit = units.render(site.cfg, "serve", exe)
    for bad in (unit.text.replace("ProtectSystem=strict", "ProtectSystem=sideways"),
                unit.text.replace("PrivateTmp=yes", "PrivateTmp=yes\nNoSuchSetting=1"),
                unit.text.replace(f"ExecStart={exe}", f"ExecStart={tmp_path}/missing")):
        with pytest.raises(DynprovError, match="systemd-analyze rejected dynprov-serve.service"):
            units.verify(units.Unit(unit.name, bad, unit.read_write))


@pytest.mark.parametrize("edit,option,message", [
    (lambda t, root: t.replace(f'state_dir = "{root / "state"}"', f'state_dir = "{root / "my state"}"'),
     (), "cannot stand in a systemd unit"),
    (lambda t, root: t.replace(f'http_root = "{root / "http"}"', f'http_root = "{root / "h%n"}"'),
     (), "cannot stand in a systemd unit"),
    (lambda t, root: t, ("--exec", "bin/pxe-stage"), "must be an absolute path"),
    (lambda t, root: t, ("--exec", "/nonexistent/pxe-stage"), "not an executable file"),
], ids=["space", "specifier", "relative-exec", "missing-exec"])
def test_bad_paths_are_refused_and_nothing_is_written(site, tmp_path, exe, edit, option, message):
    site.config_path.write_text(edit(site.config_path.read_text(), site.root))
    root = tmp_path / "root"
    proc = site.run("install-units", "--root", str(root), *(option or ("--exec", str(exe))))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not root.exists()


def test_default_exec_is_the_script_beside_this_python():
    beside = Path(sys.executable).parent / "pxe-stage"
    if beside.exists():  # an installed dynprov (tools/install-deps); else the PATH's
        assert units.default_exec() in (beside, units.LINKED_SCRIPT)
        assert units.default_exec().resolve() == beside.resolve()
    else:
        assert units.default_exec().name == "pxe-stage"
