"""Render DHCP and boot-loader configs from the Jinja templates under ``templates/``.

Pure functions of (config, nodes, images): no disk writes here, so a render can be checked
before anything is installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from pxe import validate
from pxe.config import Config
from pxe.images import Image
from pxe.inventory import Node

PXELINUX_DIR = "pxelinux.cfg"
GRUB_DIR = "grub"
IPXE_DIR = "ipxe"


@dataclass(frozen=True)
class NetView:
    """Network facts the DHCP templates need, precomputed once."""

    interface: str
    network: str
    netmask: str
    server: str
    range_first: str
    range_last: str
    gateway: str | None
    dns: str | None


def boot_file_names(mac: str) -> dict[str, str]:
    """The file names each loader asks for, for one MAC (see shared facts: pxelinux, GRUB, iPXE)."""
    return {
        "pxelinux": f"{PXELINUX_DIR}/{validate.mac_dashes(mac)}",
        "grub": f"{GRUB_DIR}/grub.cfg-{mac}",
        "ipxe": f"{IPXE_DIR}/{mac.replace(':', '-')}.ipxe",
    }


class Renderer:
    def __init__(self, cfg: Config):
        self.cfg = cfg

    @cached_property
    def env(self):
        import jinja2

        return jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.cfg.paths.templates)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=False,
        )

    def template(self, name: str):
        return self.env.get_template(name)

    @cached_property
    def net(self) -> NetView:
        import netaddr

        n = self.cfg.network
        ipnet = netaddr.IPNetwork(n.subnet)
        return NetView(interface=n.interface, network=str(ipnet.network),
                       netmask=str(ipnet.netmask), server=n.server,
                       range_first=n.dynamic_range[0], range_last=n.dynamic_range[1],
                       gateway=n.gateway, dns=n.dns)

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.network.server}:{self.cfg.boot.http_port}"

    # -- DHCP ------------------------------------------------------------------------------
    def dhcp_config(self, nodes: Iterable[Node], backend: str | None = None) -> str:
        backend = backend or self.cfg.dhcp.backend
        name = "dhcp/dnsmasq.conf.j2" if backend == "dnsmasq" else "dhcp/dhcpd.conf.j2"
        if backend == "dnsmasq" and self.cfg.dhcp.mode == "proxy":
            name = "dhcp/dnsmasq-proxy.conf.j2"
        hosts = [n for n in nodes if n.macs]
        return self.template(name).render(net=self.net, boot=self.cfg.boot, hosts=hosts,
                                          dhcp=self.cfg.dhcp)

    # -- boot loaders ----------------------------------------------------------------------
    def kernel_args(self, node: Node, image: Image) -> str:
        """The kernel command line: the image's own, then what our initramfs reads."""
        args = [image.cmdline] if image.cmdline else []
        args += [
            f"dynprov.server={self.base_url}",
            f"dynprov.node={node.name}",
            f"dynprov.image={image.label}",
            f"dynprov.mode={image.mode}",
        ]
        if image.rootfs_sha:
            args += [f"dynprov.rootfs={image.blob_path(image.rootfs_sha)}",
                     f"dynprov.sha256={image.rootfs_sha}"]
        if node.boot_token:
            args.append(f"dynprov.token={node.boot_token}")
        return " ".join(args)

    def node_boot_files(self, node: Node, image: Image | None) -> dict[str, str]:
        """Every per-MAC boot file for one node: its firmware's loader config and an iPXE script."""
        if node.boot_target != "os":
            image = None
        context = {
            "node": node,
            "image": image,
            "base_url": self.base_url,
            "kernel_path": image.blob_path(image.kernel_sha) if image else "",
            "initrd_path": image.blob_path(image.initrd_sha) if image and image.initrd_sha else "",
            "append": self.kernel_args(node, image) if image else "",
        }
        # Only the loader this node's firmware runs (pxelinux on BIOS, GRUB on UEFI), plus the
        # iPXE script for HTTP boot: each file costs a create + rename, and sites have 10,000s.
        loader = ("grub", "boot/grub.cfg.j2") if node.firmware == "uefi" else \
            ("pxelinux", "boot/pxelinux.cfg.j2")
        files: dict[str, str] = {}
        for mac in node.macs:
            names = boot_file_names(mac)
            ctx = {**context, "mac": mac}
            files[names[loader[0]]] = self.template(loader[1]).render(ctx)
            files[names["ipxe"]] = self.template("boot/ipxe.j2").render(ctx)
        return files

    def shared_boot_files(self) -> dict[str, str]:
        """Files every node reads first: the unknown-MAC default and the GRUB/iPXE dispatchers."""
        ctx = {"base_url": self.base_url}
        return {
            f"{PXELINUX_DIR}/default": self.template("boot/pxelinux-default.cfg.j2").render(ctx),
            f"{GRUB_DIR}/grub.cfg": self.template("boot/grub-main.cfg.j2").render(ctx),
            "boot.ipxe": self.template("boot/ipxe-main.j2").render(ctx),
        }

    def all_boot_files(self, nodes: Iterable[Node], images: Mapping[str, Image]) -> dict[str, str]:
        files = self.shared_boot_files()
        for node in nodes:
            image = images.get(node.desired_os or "") if node.boot_target == "os" else None
            files.update(self.node_boot_files(node, image))
        return files
