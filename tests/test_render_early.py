"""`set-boot --render` starts the DHCP config's check before set-boot's transaction
(pxe.dhcpstep.early_start): the file goes in only after the daemon passed it, only when the
DHCP inputs are still those it was rendered from, and a failure anywhere leaves the old file.

The daemon's check is the real dhcpd -t, counted (tests/test_render_inputs.counted_site).
"""

from __future__ import annotations

import pytest

from pxe import dhcpstep as step
from pxe.errors import NotFound
from pxe.inventory import Inventory, build
from pxe.setboot import render_all, set_boot
from tests.test_render_inputs import checks, counted_site, installed_then_broken, needs_dhcpd


def leftovers(cfg):
    target = cfg.dhcp.config_file
    return sorted(p.name for p in target.parent.glob(f".{target.name}.*"))


def add_node(cfg, name: str, mac: str):
    Inventory(cfg).add([build(cfg, {"name": name, "mac": mac})])


@pytest.mark.integration
@needs_dhcpd
def test_set_boot_render_checks_a_changed_config_once_and_installs_it(tmp_path):
    site, log = counted_site(tmp_path)
    cfg = site.cfg
    render_all(cfg, reload=False)
    assert checks(log) == 1
    add_node(cfg, "n10", "52:54:00:cc:00:10")
    out = site.run("set-boot", "n[01-04]", "--os", "centos5", "--render", "--no-reload",
                   check=True)
    assert "installed" in out.stdout and checks(log) == 2
    assert "52:54:00:cc:00:10" in cfg.dhcp.config_file.read_text()
    assert Inventory(cfg).get("n01").boot_target == "os"
    assert leftovers(cfg) == []
    out = site.run("set-boot", "n[01-04]", "--local", "--render", "--no-reload", check=True)
    assert "unchanged" in out.stdout and checks(log) == 2  # nothing started early


@pytest.mark.integration
@needs_dhcpd
def test_inputs_changed_meanwhile_drop_the_early_file_and_render_again(tmp_path):
    site, log = counted_site(tmp_path)
    cfg = site.cfg
    render_all(cfg, reload=False)
    add_node(cfg, "n10", "52:54:00:cc:00:10")
    inv = Inventory(cfg)
    with step.early_start(cfg, inv.conn) as early:
        assert early is not None and early.pending is not None
        set_boot(cfg, "n[01-04]", "centos5", inv)
        add_node(cfg, "n11", "52:54:00:cc:00:11")  # another writer, after the early render
        report = render_all(cfg, reload=False, inventory=inv, early=early)
    text = cfg.dhcp.config_file.read_text()
    assert report.dhcp_changed and "52:54:00:cc:00:11" in text and "52:54:00:cc:00:10" in text
    assert checks(log) == 3  # the early check (dropped) and the one of the current inputs
    assert leftovers(cfg) == []


@pytest.mark.integration
@needs_dhcpd
def test_a_template_edited_meanwhile_drops_the_early_file_and_renders_again(tmp_path):
    """The early file was rendered from the packaged template; an override written before the
    install must be what goes in (and what the record says went in)."""
    from pxe.templatefiles import find_template

    site, log = counted_site(tmp_path)
    cfg = site.cfg
    render_all(cfg, reload=False)
    add_node(cfg, "n10", "52:54:00:cc:00:10")
    packaged = find_template(cfg, "dhcp/dhcpd.conf.j2").path.read_text()
    inv = Inventory(cfg)
    with step.early_start(cfg, inv.conn) as early:
        assert early is not None and early.pending is not None
        override = cfg.paths.templates_dir / "dhcp" / "dhcpd.conf.j2"
        override.parent.mkdir(parents=True)
        override.write_text(packaged + "# site override, written meanwhile\n")
        report = render_all(cfg, reload=False, inventory=inv, early=early)
    assert report.dhcp_changed and checks(log) == 3  # the early check dropped, one more
    assert "# site override, written meanwhile" in cfg.dhcp.config_file.read_text()
    # The report names the file the config was rendered from, not the early renderer's.
    assert report.sources["dhcp/dhcpd.conf.j2"].path == override
    assert not render_all(cfg, reload=False).dhcp_changed and checks(log) == 3
    assert leftovers(cfg) == []


@pytest.mark.integration
@needs_dhcpd
def test_a_rejected_early_config_is_not_installed(tmp_path):
    site, log = counted_site(tmp_path)
    cfg = site.cfg
    good, override = installed_then_broken(cfg)
    proc = site.run("set-boot", "n[01-04]", "--local", "--render", "--no-reload")
    assert proc.returncode == 1 and "rejected the rendered config" in proc.stderr
    assert f"rendered from {override} (site override)" in proc.stderr
    assert cfg.dhcp.config_file.read_text() == good and checks(log) == 2
    assert leftovers(cfg) == []


@pytest.mark.integration
@needs_dhcpd
def test_a_failed_set_boot_drops_the_early_check(tmp_path):
    site, log = counted_site(tmp_path)
    cfg = site.cfg
    render_all(cfg, reload=False)
    good = cfg.dhcp.config_file.read_text()
    add_node(cfg, "n10", "52:54:00:cc:00:10")
    inv = Inventory(cfg)
    with pytest.raises(NotFound), step.early_start(cfg, inv.conn) as early:
        assert early is not None and early.pending is not None
        assert early.plan is not None and early.staged is not None  # the spliced file, written
        child, staged = early.pending, early.staged
        set_boot(cfg, "nosuchnode", None, inv)
    assert child.proc is None  # stopped and reaped
    assert staged.path is None and not staged.running()  # its fsync joined, file gone
    assert cfg.dhcp.config_file.read_text() == good and leftovers(cfg) == []
    proc = site.run("set-boot", "nosuchnode", "--local", "--render", "--no-reload")
    assert proc.returncode == 1 and "unknown node" in proc.stderr
    assert cfg.dhcp.config_file.read_text() == good and leftovers(cfg) == []


@pytest.mark.integration
@needs_dhcpd
def test_a_template_error_is_met_where_it_always_was(tmp_path):
    """The early start is only a head start: a broken template gives no early check, and the
    render after set-boot names the file, as without it."""
    site, log = counted_site(tmp_path)
    cfg = site.cfg
    render_all(cfg, reload=False)
    good = cfg.dhcp.config_file.read_text()
    override = cfg.paths.templates_dir / "dhcp" / "dhcpd.conf.j2"
    override.parent.mkdir(parents=True)
    override.write_text("{% for h in %}\n")
    with step.early_start(cfg, Inventory(cfg).conn) as early:
        assert early is None
    proc = site.run("set-boot", "n[01-04]", "--local", "--render", "--no-reload")
    assert proc.returncode == 1 and str(override) in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert cfg.dhcp.config_file.read_text() == good and checks(log) == 1
    assert leftovers(cfg) == []
