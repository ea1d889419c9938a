"""`render` checks and installs the DHCP config only when what it is made of changed
(pxe.dhcpinputs): a set-boot never changes it, anything that could change it renders and checks.

The daemon's check is counted through `[dhcp] check_command`: a script that logs each call and
then runs the real `dhcpd -t` on the file.
"""

import shutil
import stat

import pytest

from pxe import dhcpinputs
from pxe.errors import DynprovError
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from pxe.render import Renderer
from pxe.setboot import _tokens, render_all
from tests.conftest import fake_bzimage, make_site

needs_dhcpd = pytest.mark.skipif(not shutil.which("dhcpd", path="/usr/sbin:/usr/bin"),
                                 reason="isc-dhcp-server is installed by tools/install-deps")


def counted_site(tmp_path):
    """An isc site whose daemon check is the real dhcpd -t, counted in ``checks.log``."""
    site = make_site(tmp_path / "s", backend="isc")
    log = tmp_path / "checks.log"
    script = tmp_path / "check-dhcpd"
    dhcpd = shutil.which("dhcpd", path="/usr/sbin:/usr/bin")
    script.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec {dhcpd} -t -q -4 -cf "$1"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    text = site.config_path.read_text().replace(
        'backend = "isc"', f'backend = "isc"\ncheck_command = ["{script}"]', 1)
    site.config_path.write_text(text)
    cfg = site.cfg
    assert cfg.dhcp.check_command == (str(script),)
    nodes = [build(cfg, {"name": f"n{i:02d}", "mac": f"52:54:00:cc:00:{i:02x}",
                         "ip": f"198.18.0.{20 + i}"}) for i in range(1, 5)]
    Inventory(cfg).add(nodes)
    Catalog(cfg).add("centos5", fake_bzimage(tmp_path / "vmlinuz", b"k" * 512))
    return site, log


def installed_then_broken(cfg):
    """Render and install the DHCP config, then put a site override dhcpd rejects in place:
    (the installed text, the override's path)."""
    render_all(cfg, reload=False)
    good = cfg.dhcp.config_file.read_text()
    override = cfg.paths.templates_dir / "dhcp" / "dhcpd.conf.j2"
    override.parent.mkdir(parents=True)
    override.write_text("this is not dhcpd syntax;\n")
    return good, override


def checks(log):
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.integration
@needs_dhcpd
def test_set_boot_renders_without_a_second_check_and_changes_are_checked(tmp_path):
    site, log = counted_site(tmp_path)
    cfg = site.cfg
    assert render_all(cfg, reload=False).dhcp_changed and checks(log) == 1
    installed = cfg.dhcp.config_file.read_bytes()

    # set-boot (both ways) changes nothing the DHCP config is made of: no render, no check.
    for target in (["--os", "centos5"], ["--local"]):
        out = site.run("set-boot", "n[01-04]", *target, "--render", "--no-reload", check=True)
        assert "next boot" in out.stdout and "unchanged" in out.stdout
    assert checks(log) == 1 and cfg.dhcp.config_file.read_bytes() == installed
    assert Inventory(cfg).get("n01").boot_target == "local"
    assert dhcpinputs.installed(cfg, dhcpinputs.generation(Inventory(cfg).conn), "")

    # A node added: rendered, checked, installed.
    Inventory(cfg).add([build(cfg, {"name": "n09", "mac": "52:54:00:cc:00:09"})])
    assert not dhcpinputs.installed(cfg, dhcpinputs.generation(Inventory(cfg).conn), "")
    assert render_all(cfg, reload=False).dhcp_changed and checks(log) == 2
    assert "52:54:00:cc:00:09" in cfg.dhcp.config_file.read_text()

    # The installed file edited by hand: rendered and checked again, the edit undone.
    cfg.dhcp.config_file.write_text(cfg.dhcp.config_file.read_text() + "# hand edit\n")
    assert render_all(cfg, reload=False).dhcp_changed and checks(log) == 3
    assert "hand edit" not in cfg.dhcp.config_file.read_text()

    # A site override of the template: rendered from it and checked.
    override = cfg.paths.templates_dir / "dhcp" / "dhcpd.conf.j2"
    override.parent.mkdir(parents=True)
    packaged = (Renderer(cfg).template("dhcp/dhcpd.conf.j2").source.path).read_text()
    override.write_text(packaged + "# site override\n")
    assert render_all(cfg, reload=False).dhcp_changed and checks(log) == 4
    assert "# site override" in cfg.dhcp.config_file.read_text()
    assert not render_all(cfg, reload=False).dhcp_changed and checks(log) == 4


@pytest.mark.integration
@needs_dhcpd
def test_a_rejected_change_is_tried_again_and_the_old_file_kept(tmp_path):
    site, log = counted_site(tmp_path)
    cfg = site.cfg
    good, override = installed_then_broken(cfg)
    for attempt in (2, 3):  # never recorded as installed: every render checks again
        with pytest.raises(DynprovError, match="rejected"):
            render_all(cfg, reload=False)
        assert checks(log) == attempt and cfg.dhcp.config_file.read_text() == good
    override.unlink()  # back to what is installed and was accepted: nothing to check
    assert not render_all(cfg, reload=False).dhcp_changed and checks(log) == 3


@pytest.mark.integration
@needs_dhcpd
def test_the_record_is_keyed_by_the_dhcp_facts_generation(tmp_path):
    site, log = counted_site(tmp_path)
    cfg = site.cfg
    render_all(cfg, reload=False)
    conn = Inventory(cfg).conn
    before = dhcpinputs.generation(conn)
    Inventory(cfg).update_state("n01", state="ready", current_os="centos5", boot_target="os")
    assert dhcpinputs.generation(conn) == before  # state, OS, boot target: not DHCP facts
    assert dhcpinputs.installed(cfg, before, "")
    assert not dhcpinputs.installed(cfg, before, "rack1")  # another segment's file: not this one
    conn.execute("UPDATE nodes SET firmware = 'uefi' WHERE name = 'n02'")
    assert dhcpinputs.generation(conn) != before
    assert render_all(cfg, reload=False).dhcp_changed is False  # same text: confirmed, no check
    assert checks(log) == 1

    # A raw SQL change of an IP: a new generation; rendered, checked by dhcpd -t, installed.
    conn.execute("UPDATE nodes SET ip = '198.18.0.99' WHERE name = 'n03'")
    assert render_all(cfg, reload=False).dhcp_changed and checks(log) == 2
    assert "198.18.0.99" in cfg.dhcp.config_file.read_text()
    assert not render_all(cfg, reload=False).dhcp_changed and checks(log) == 2

    # A database restored from an older backup (its generation is not the recorded one): again.
    conn.execute("UPDATE dhcp_generation SET value = 'restored' WHERE id = 1")
    render_all(cfg, reload=False)
    assert '"generation": "restored"' in dhcpinputs.stamp_path(cfg).read_text()


@pytest.mark.unit
def test_dhcp_templates_cannot_see_what_set_boot_changes(site):
    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": "n01", "mac": "52:54:00:cc:00:01"})])
    override = cfg.paths.templates_dir / "dhcp" / "dnsmasq.conf.j2"
    override.parent.mkdir(parents=True)
    override.write_text("{% for h in hosts %}{{ h.name }} {{ h.boot_target }}\n{% endfor %}")
    with pytest.raises(DynprovError, match="boot_target"):
        Renderer(cfg).dhcp_config(Inventory(cfg).all())
    override.write_text("{% for h in hosts %}{{ h.name }} {{ h.macs | join(',') }} "
                        "{{ h.firmware }} {{ h.pool }}\n{% endfor %}")
    assert Renderer(cfg).dhcp_config(Inventory(cfg).all()) == "n01 52:54:00:cc:00:01 bios hpc\n"


@pytest.mark.unit
def test_set_boot_tokens_are_token_urlsafe_24_each():
    tokens = _tokens(1000)
    assert len(set(tokens)) == 1000
    assert all(len(t) == 32 and t.replace("-", "a").replace("_", "a").isalnum() for t in tokens)
