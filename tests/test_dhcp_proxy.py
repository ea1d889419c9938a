"""proxyDHCP (`[dhcp] mode = "proxy"`): rendered for dnsmasq, checked by the real daemon, refused
for ISC dhcpd (which cannot proxy). The boots through it are in test_e2e_school.py."""

from __future__ import annotations

import shutil

import pytest

from pxe.errors import InputError
from pxe.inventory import Inventory, build
from pxe.render import Renderer, find_template
from pxe.setboot import render_all
from tests.conftest import make_site


def proxy_site(tmp_path, extra: str = "", backend: str = "dnsmasq"):
    site = make_site(tmp_path / "s", backend=backend)
    site.config_path.write_text(site.config_path.read_text().replace(
        "[dhcp]\n", f'[dhcp]\nmode = "proxy"\n{extra}'))
    return site


def add_nodes(cfg) -> None:
    Inventory(cfg).add([
        build(cfg, {"name": "ws1", "macs": ["52:54:00:5c:00:01"], "ip": "198.18.0.11"}),
        build(cfg, {"name": "ws2", "macs": ["52:54:00:5c:00:02", "52:54:00:5c:00:03"],
                    "firmware": "uefi"}),
    ])


@pytest.mark.unit
def test_proxy_config_answers_pxe_only_and_only_known_macs(tmp_path):
    site = proxy_site(tmp_path)
    cfg = site.cfg
    add_nodes(cfg)
    text = Renderer(cfg).dhcp_config(Inventory(cfg).all())
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert "dhcp-range=198.18.0.0,proxy,255.255.255.0" in lines
    # never an address: no ranges of addresses, no fixed IPs, no router/DNS options
    assert not [ln for ln in lines if ln.startswith(("dhcp-boot", "dhcp-option"))]
    assert "198.18.0.100" not in text and "198.18.0.11" not in text
    assert 'pxe-service=tag:dynprov,x86PC,"dynprov",pxelinux.0,198.18.0.1' in lines
    assert 'pxe-service=tag:dynprov,x86-64_EFI,"dynprov",grubx64.efi,198.18.0.1' in lines
    assert 'pxe-service=tag:dynprov,BC_EFI,"dynprov",grubx64.efi,198.18.0.1' in lines
    assert "dhcp-host=52:54:00:5c:00:01,set:dynprov,ws1" in lines
    assert "dhcp-host=52:54:00:5c:00:02,52:54:00:5c:00:03,set:dynprov,ws2" in lines
    # every pxe line is tagged: an unknown MAC gets no boot answer
    assert all("tag:dynprov," in ln for ln in lines if ln.startswith("pxe-"))


@pytest.mark.unit
def test_proxy_unknown_answers_every_pxe_client(tmp_path):
    site = proxy_site(tmp_path, "proxy_unknown = true\n")
    cfg = site.cfg
    text = Renderer(cfg).dhcp_config([])
    pxe = [ln for ln in text.splitlines() if ln.startswith("pxe-service")]
    assert len(pxe) == 3 and not [ln for ln in pxe if "tag:" in ln]


@pytest.mark.unit
def test_isc_cannot_proxy_and_mode_is_checked(tmp_path):
    with pytest.raises(InputError, match=r"dhcp.mode: proxy needs backend = \"dnsmasq\""):
        _ = proxy_site(tmp_path / "a", backend="isc").cfg
    site = make_site(tmp_path / "b")
    site.config_path.write_text(site.config_path.read_text().replace(
        "[dhcp]\n", '[dhcp]\nmode = "relay"\n'))
    with pytest.raises(InputError, match="dhcp.mode"):
        _ = site.cfg


@pytest.mark.integration
def test_isc_proxy_is_refused_by_the_cli_with_exit_2(tmp_path):
    site = proxy_site(tmp_path, backend="isc")
    proc = site.run("render")
    assert proc.returncode == 2
    assert "ISC dhcpd cannot answer as a proxyDHCP server" in proc.stderr
    assert not list((tmp_path / "s").glob("dhcpd.conf*"))


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("dnsmasq", path="/usr/sbin:/usr/bin"),
                    reason="dnsmasq is installed by tools/install-deps")
@pytest.mark.parametrize("unknown", [False, True])
def test_dnsmasq_accepts_the_rendered_proxy_config(tmp_path, unknown):
    site = proxy_site(tmp_path, f"proxy_unknown = {str(unknown).lower()}\n")
    cfg = site.cfg
    add_nodes(cfg)
    report = render_all(cfg)  # render -> `dnsmasq --test` -> atomic rename
    assert report.dhcp_changed
    assert "proxy" in cfg.dhcp.config_file.read_text()


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("dnsmasq", path="/usr/sbin:/usr/bin"),
                    reason="dnsmasq is installed by tools/install-deps")
def test_a_proxy_config_dnsmasq_rejects_is_never_installed(tmp_path):
    site = proxy_site(tmp_path)
    cfg = site.cfg
    add_nodes(cfg)
    render_all(cfg)
    good = cfg.dhcp.config_file.read_text()
    # a site override of the proxy template that dnsmasq refuses
    proxy = cfg.paths.templates_dir / "dhcp" / "dnsmasq-proxy.conf.j2"
    proxy.parent.mkdir(parents=True)
    proxy.write_text(find_template(cfg, "dhcp/dnsmasq-proxy.conf.j2").path.read_text()
                     .replace(",proxy,", ",prxy,"))
    Inventory(site.cfg).add([build(site.cfg, {"name": "ws3", "macs": ["52:54:00:5c:00:09"]})])
    proc = site.run("render")
    assert proc.returncode == 1
    assert "dnsmasq rejected the rendered config (old config kept)" in proc.stderr
    assert cfg.dhcp.config_file.read_text() == good


@pytest.mark.unit
def test_proxy_mode_boots_the_tftp_chain_and_refuses_ipxe_http(tmp_path):
    """iPXE over HTTP is the default, but not through a proxy: the proxy would offer iPXE its own
    loader again. Proxy mode defaults to the pxelinux/GRUB chain; asking for both is refused."""
    site = proxy_site(tmp_path)
    assert site.cfg.boot.ipxe_http is False
    assert (site.cfg.boot.bios_loader, site.cfg.boot.uefi_loader) == ("pxelinux.0", "grubx64.efi")
    text = site.config_path.read_text()
    site.config_path.write_text(text + "\n[boot]\nipxe_http = true\n" if "[boot]" not in text
                                else text.replace("[boot]\n", "[boot]\nipxe_http = true\n"))
    with pytest.raises(InputError, match="ipxe_http"):
        site.cfg  # noqa: B018 - loading is the check
