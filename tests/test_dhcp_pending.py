"""pxe.dhcp.PendingCheck: the daemon's check started early, its file installed only on a pass.

The check is `[dhcp] check_command`, a small script standing in for the daemon where a test
needs a check that waits or cannot start; the real daemons are in test_render.py and
test_render_inputs.py.
"""

from __future__ import annotations

import os
import stat

import pytest

from pxe import dhcp
from pxe.errors import DynprovError
from tests.conftest import make_site


def site_checked_by(tmp_path, script: str | None):
    site = make_site(tmp_path / "s", backend="isc")
    if script is None:
        command = str(tmp_path / "no-such-checker")
    else:
        path = tmp_path / "checker"
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        command = str(path)
    text = site.config_path.read_text().replace(
        'backend = "isc"', f'backend = "isc"\ncheck_command = ["{command}"]', 1)
    site.config_path.write_text(text)
    return site.cfg


def temp_files(cfg):
    return sorted(p.name for p in cfg.dhcp.config_file.parent.glob(f".{cfg.dhcp.config_file.name}.*"))


@pytest.mark.integration
def test_a_passing_check_installs_exactly_the_checked_file(tmp_path):
    seen = tmp_path / "seen"
    cfg = site_checked_by(tmp_path, f'cat "$1" > {seen}\n')
    pending = dhcp.PendingCheck(cfg, "new config\n")
    pending.install(reload=False)
    assert cfg.dhcp.config_file.read_text() == "new config\n" == seen.read_text()
    assert stat.S_IMODE(cfg.dhcp.config_file.stat().st_mode) == 0o644
    assert temp_files(cfg) == []


@pytest.mark.integration
def test_a_rejected_file_is_never_installed(tmp_path):
    cfg = site_checked_by(tmp_path, 'echo "line 3: no such option" >&2\nexit 1\n')
    cfg.dhcp.config_file.write_text("old\n")
    pending = dhcp.PendingCheck(cfg, "bad\n")
    with pytest.raises(DynprovError, match="rejected the rendered config.*\n.*no such option"):
        pending.install(reload=False)
    assert cfg.dhcp.config_file.read_text() == "old\n"
    assert temp_files(cfg) == []


@pytest.mark.integration
def test_a_checker_that_cannot_start_is_one_error_and_leaves_nothing(tmp_path):
    cfg = site_checked_by(tmp_path, None)
    cfg.dhcp.config_file.write_text("old\n")
    with pytest.raises(DynprovError, match="DHCP config check .*no-such-checker could not run"):
        dhcp.install(cfg, "new\n", reload=False)
    assert cfg.dhcp.config_file.read_text() == "old\n"
    assert temp_files(cfg) == []


@pytest.mark.integration
def test_a_discarded_check_is_stopped_and_its_file_removed(tmp_path):
    cfg = site_checked_by(tmp_path, "exec sleep 60\n")
    cfg.dhcp.config_file.write_text("old\n")
    pending = dhcp.PendingCheck(cfg, "new\n")
    child = pending.proc.pid
    assert temp_files(cfg)  # the file being checked
    pending.discard()
    with pytest.raises(ProcessLookupError):  # killed and reaped by discard
        os.kill(child, 0)
    assert temp_files(cfg) == []
    assert cfg.dhcp.config_file.read_text() == "old\n"
    pending.discard()  # again: nothing left to do
