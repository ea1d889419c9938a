"""Rendering: DHCP configs checked by the real daemons, boot files under the names loaders ask for."""

import shutil
from pathlib import Path

import pytest

from pxe import dhcp
from pxe.errors import DynprovError
from pxe.images import Catalog
from pxe.inventory import Inventory, build
from pxe.render import Renderer, boot_file_names, find_template
from pxe.setboot import render_all, set_boot
from tests.conftest import make_site

needs_daemons = pytest.mark.skipif(
    not (shutil.which("dnsmasq", path="/usr/sbin") and shutil.which("dhcpd", path="/usr/sbin")),
    reason="dnsmasq and isc-dhcp-server are installed by tools/install-deps")


def populate(site, count=3):
    cfg = site.cfg
    nodes = [build(cfg, {"name": f"n{i:03d}", "macs": [f"52:54:00:aa:00:{i:02x}"],
                         "ip": f"198.18.0.{10 + i}", "firmware": "uefi" if i % 2 == 0 else "bios"})
             for i in range(1, count + 1)]
    nodes.append(build(cfg, {"name": "multi", "macs": ["52:54:00:bb:00:01", "52:54:00:bb:00:02"]}))
    Inventory(cfg).add(nodes)
    return cfg


@pytest.mark.unit
def test_boot_file_names_match_what_loaders_ask_for():
    names = boot_file_names("52:54:00:aa:00:02")
    assert names["pxelinux"] == "pxelinux.cfg/01-52-54-00-aa-00-02"
    assert names["grub"] == "grub/grub.cfg-52:54:00:aa:00:02"  # ${net_default_mac}, colon form
    assert names["ipxe"] == "ipxe/52-54-00-aa-00-02.ipxe"  # ${mac:hexhyp}


@pytest.mark.unit
def test_dhcp_configs_have_a_host_per_node_and_arch_boot_files(site):
    cfg = populate(site)
    nodes = Inventory(cfg).all()
    dnsmasq_text = Renderer(cfg).dhcp_config(nodes, "dnsmasq")
    assert "dhcp-host=52:54:00:aa:00:01,198.18.0.11,n001,infinite" in dnsmasq_text
    assert "dhcp-host=52:54:00:bb:00:01,52:54:00:bb:00:02,multi,infinite" in dnsmasq_text
    # iPXE over HTTP by default: TFTP carries only the first loader.
    assert "dhcp-boot=tag:ipxe,http://198.18.0.1:8080/boot.ipxe" in dnsmasq_text
    assert "dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi,,198.18.0.1" in dnsmasq_text
    assert "dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe,,198.18.0.1" in dnsmasq_text
    isc_text = Renderer(cfg).dhcp_config(nodes, "isc")
    assert "host multi-1 { hardware ethernet 52:54:00:bb:00:02;" in isc_text
    assert "fixed-address 198.18.0.12;" in isc_text


@pytest.mark.integration
@needs_daemons
@pytest.mark.parametrize("backend", ["dnsmasq", "isc"])
def test_real_daemon_accepts_rendered_config(tmp_path, backend):
    site = make_site(tmp_path / "s", backend=backend)
    cfg = populate(site, count=50)
    report = render_all(cfg)
    assert report.dhcp_changed
    text = cfg.dhcp.config_file.read_text()
    assert text.count("n0") >= 50
    dhcp.check(cfg, text)  # the daemon itself again, on the installed file's content


@pytest.mark.integration
@needs_daemons
@pytest.mark.parametrize("backend", ["dnsmasq", "isc"])
def test_rejected_config_keeps_the_old_one(tmp_path, backend):
    site = make_site(tmp_path / "s", backend=backend)
    cfg = populate(site)
    render_all(cfg)
    good = cfg.dhcp.config_file.read_text()
    # An admin's broken site override: the daemon must refuse it, nothing is installed and the
    # packaged template is not used in its place.
    name = "dnsmasq.conf.j2" if backend == "dnsmasq" else "dhcpd.conf.j2"
    broken = cfg.paths.templates_dir / "dhcp" / name
    broken.parent.mkdir(parents=True)
    broken.write_text(find_template(cfg, f"dhcp/{name}").path.read_text()
                      + "\nthis-is-not-a-valid-line {\n")
    Inventory(site.cfg).add([build(site.cfg, {"name": "late", "mac": "52:54:00:cc:00:01"})])
    with pytest.raises(DynprovError, match=f"rejected the rendered config(.|\n)*rendered from "
                                           f"{broken} \\(site override\\)"):
        render_all(site.cfg)
    assert cfg.dhcp.config_file.read_text() == good
    assert not [p for p in cfg.dhcp.config_file.parent.iterdir() if p.name.endswith(".new")]


def write_files(site):
    """A site whose TFTP/HTTP come from tftpd-hpa/nginx: loader configs as files (and pxelinux
    and GRUB over TFTP, as such sites boot)."""
    site.config_path.write_text(site.config_path.read_text()
                                + "\n[boot]\nwrite_files = true\nipxe_http = false\n")
    return site


@pytest.mark.unit
def test_boot_files_for_os_and_local(site, kernel, tmp_path):
    cfg = populate(write_files(site))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * 100)
    image = Catalog(cfg).add("centos5", kernel, initrd, cmdline="console=ttyS0,115200")
    set_boot(cfg, "n[001-002]", "centos5")
    tftp = cfg.paths.tftp_root
    pxe = (tftp / "pxelinux.cfg/01-52-54-00-aa-00-01").read_text()
    assert f"KERNEL blobs/{image.kernel_sha}" in pxe
    assert f"INITRD blobs/{image.initrd_sha}" in pxe
    node = Inventory(cfg).get("n001")
    assert f"dynprov.token={node.boot_token}" in pxe and "dynprov.node=n001" in pxe
    grub = (tftp / "grub/grub.cfg-52:54:00:aa:00:02").read_text()
    assert f"linux /blobs/{image.kernel_sha} console=ttyS0,115200" in grub
    ipxe = (cfg.paths.http_root / "ipxe/52-54-00-aa-00-01.ipxe").read_text()
    assert f"kernel http://198.18.0.1:8080/blobs/{image.kernel_sha}" in ipxe
    set_boot(cfg, "n001", None)
    assert "LOCALBOOT 0" in (tftp / "pxelinux.cfg/01-52-54-00-aa-00-01").read_text()
    assert "\nexit\n" in (cfg.paths.http_root / "ipxe/52-54-00-aa-00-01.ipxe").read_text()
    assert not (tftp / "grub/grub.cfg-52:54:00:aa:00:01").exists()  # a BIOS node: pxelinux only
    assert Inventory(cfg).get("n001").boot_token is None


@pytest.mark.integration
@needs_daemons
def test_full_render_writes_defaults_loaders_and_prunes(site, kernel):
    cfg = populate(write_files(site))
    report = render_all(cfg)
    tftp = cfg.paths.tftp_root
    assert "LOCALBOOT 0" in (tftp / "pxelinux.cfg/default").read_text()
    assert "configfile /grub/grub.cfg-${net_default_mac}" in (tftp / "grub/grub.cfg").read_text()
    assert report.loaders["pxelinux.0"] in ("installed", "up to date")
    assert (tftp / "pxelinux.0").stat().st_size > 10_000
    Inventory(cfg).remove(["multi"])
    report = render_all(cfg)
    assert "pxelinux.cfg/01-52-54-00-bb-00-02" in report.pruned
    assert not (tftp / "pxelinux.cfg/01-52-54-00-bb-00-01").exists()
    assert not (cfg.paths.http_root / "ipxe/52-54-00-bb-00-01.ipxe").exists()


@pytest.mark.integration
@needs_daemons
@pytest.mark.parametrize("backend", ["dnsmasq", "isc"])
def test_ipxe_http_variant_passes_the_daemon_check(tmp_path, backend):
    site = make_site(tmp_path / "s", backend=backend)
    cfg = populate(site)  # the default: iPXE over HTTP
    text = Renderer(cfg).dhcp_config(Inventory(cfg).all())
    assert "http://198.18.0.1:8080/boot.ipxe" in text
    dhcp.check(cfg, text)
    tftp_only = make_site(tmp_path / "t", backend)
    tftp_only.config_path.write_text(tftp_only.config_path.read_text()
                                     + "\n[boot]\nipxe_http = false\n")
    text = Renderer(populate(tftp_only)).dhcp_config(Inventory(tftp_only.cfg).all())
    assert "boot.ipxe" not in text
    dhcp.check(tftp_only.cfg, text)


@pytest.mark.unit
def test_loaders_are_copied_once_and_again_when_the_copy_changed(site):
    from pxe import stage

    cfg = site.cfg
    first = stage.install_loaders(cfg)
    present = [n for n, st in first.items() if st != "not available on this machine"]
    if not present:
        pytest.skip("no boot loader on this machine (tools/install-deps installs them)")
    assert all(first[n] == "installed" for n in present)
    assert all(st == "up to date" for n, st in stage.install_loaders(cfg).items() if n in present)
    name = present[0]
    copy = cfg.paths.tftp_root / name
    copy.write_bytes(b"tampered")  # another size and mtime: copied again
    assert stage.install_loaders(cfg)[name] == "installed"
    source = next(Path(c) for c in stage.LOADER_SOURCES[name] if Path(c).is_file())
    assert copy.read_bytes() == source.read_bytes()


@pytest.mark.unit
@pytest.mark.parametrize("subnet", ["10.0.0.0/24", "192.168.0.0/16", "10.1.2.0/23",
                                    "172.16.0.0/12", "10.9.8.4/30", "10.0.0.7/32"])
def test_the_dhcp_network_facts_are_netaddrs_view_of_the_subnet(site, subnet):
    """Renderer.net formats the checked subnet with the standard library (no netaddr import on
    the render path): network and netmask as netaddr gives them."""
    import netaddr

    from pxe import records
    from pxe.render import Renderer

    cfg = records.replace(site.cfg, network=records.replace(site.cfg.network, subnet=subnet))
    net = Renderer(cfg).net
    expected = netaddr.IPNetwork(subnet)
    assert (net.network, net.netmask) == (str(expected.network), str(expected.netmask))
