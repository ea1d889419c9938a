"""Render DHCP and boot-loader configs from the Jinja templates under ``templates/``.

Pure functions of (config, nodes, images): no disk writes here, so a render can be checked
before anything is installed.

Where a template comes from (find_template): a file of the same name under the site's override
folder (``[paths] templates_dir``, default /etc/dynprov/templates) replaces the packaged one
(pxe.assets); anything else there under that name (a directory, a dangling link, an unreadable
or non-UTF-8 file) is an error, never a silent fall-back to the packaged template. A broken
override therefore fails the render, or the daemon's check, exactly as a broken packaged one would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property

from pxe import validate
from pxe.config import Config
from pxe.dhcpinputs import DhcpHost, Snapshot
from pxe.errors import DynprovError
from pxe.images import Image
from pxe.inventory import Node
from pxe.records import Record
from pxe.templatefiles import TemplateSource, find_template

PXELINUX_DIR = "pxelinux.cfg"
GRUB_DIR = "grub"
IPXE_DIR = "ipxe"
NODE_TEMPLATES = {"pxelinux": "boot/pxelinux.cfg.j2", "grub": "boot/grub.cfg.j2",
                  "ipxe": "boot/ipxe.j2"}
SHARED_TEMPLATES = {f"{PXELINUX_DIR}/default": "boot/pxelinux-default.cfg.j2",
                    f"{GRUB_DIR}/grub.cfg": "boot/grub-main.cfg.j2",
                    "boot.ipxe": "boot/ipxe-main.j2"}


class NetView(Record):
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


# -- what the DHCP templates loop over ----------------------------------------------------------
class LazyHosts(Sequence):
    """``hosts`` for the DHCP templates: every node with a MAC as a DhcpHost, built only when a
    template looks at them (the packaged ones only count them; site overrides may loop)."""

    def __init__(self, count: int, build: Callable[[], list[DhcpHost]]):
        self._count, self._build, self._hosts = count, build, None

    def _all(self) -> list[DhcpHost]:
        if self._hosts is None:
            self._hosts = [h for h in self._build() if h.macs]
        return self._hosts

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # type: ignore[override]
        return self._all()[index]

    def __iter__(self) -> Iterator[DhcpHost]:
        return iter(self._all())


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while 10,000s of tuples and strings are made: they hold no
    cycles, and each collection would walk every object alive (the snapshot's rows too) -
    8-14 ms of a 10,000-host render. Back on (if it was) when the block ends."""
    import gc

    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def dhcp_host_context(nodes: Snapshot | Iterable[Node | DhcpHost]) -> dict[str, object]:
    """What the DHCP templates see of the nodes, in name order, nodes without a MAC left out:
    ``host_rows``  one (name, macs, ip) tuple per node (ip None when it has none);
    ``host_macs``  one (name, index, mac, ip) tuple per MAC of a node (index from 0 per node);
    ``hosts``      the same nodes as DhcpHosts (every DHCP fact; for site overrides).
    The tuples are built here, in Python, so that a template's loop over 10,000 nodes unpacks
    them instead of looking up attributes and keeping a loop context per node."""
    if isinstance(nodes, Snapshot):
        by_node: dict[str, list[str]] = {}
        for node, _idx, mac in nodes.macs:  # (node, idx, mac) sorted: each node's MACs in order
            by_node.setdefault(node, []).append(mac)
        rows = [(row[0], tuple(by_node[row[0]]), row[1]) for row in nodes.rows
                if row[0] in by_node]
        hosts = LazyHosts(len(rows), nodes.hosts)
    else:
        listed = [DhcpHost.of(n) for n in nodes if n.macs]
        rows = [(h.name, h.macs, h.ip) for h in listed]
        hosts = LazyHosts(len(listed), lambda: listed)
    host_macs = [(name, index, mac, ip) for name, macs, ip in rows
                 for index, mac in enumerate(macs)]
    return {"hosts": hosts, "host_rows": rows, "host_macs": host_macs}


# -- where templates come from: pxe.templatefiles (find_template, TemplateSource) -------------


def read_template(source: TemplateSource) -> str:
    try:
        return source.path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DynprovError(f"{source.path}: template is not UTF-8 text") from None
    except OSError as exc:
        raise DynprovError(f"{source.path}: cannot read template: {exc.strerror or exc}") from None


def template_env(cfg: Config, loaded: set[str] | None = None, **options):
    """A Jinja environment whose loader is find_template (site overrides, then packaged);
    ``loaded`` collects the name of every template it reads (includes and imports too)."""
    import jinja2

    def load(name: str):
        if loaded is not None:
            loaded.add(name)
        source = find_template(cfg, name)
        text = read_template(source)
        mtime = source.path.stat().st_mtime

        def uptodate() -> bool:  # a long-lived server notices an override added or edited
            try:
                again = find_template(cfg, name)
                return again.path == source.path and again.path.stat().st_mtime == mtime
            except (DynprovError, OSError):
                return False

        return text, str(source.path), uptodate

    return jinja2.Environment(loader=jinja2.FunctionLoader(load),
                              undefined=jinja2.StrictUndefined, **options)


def _template_error(source: TemplateSource, exc: Exception) -> DynprovError:
    line = getattr(exc, "lineno", None)
    where = f"{source.describe()}{f', line {line}' if line else ''}"
    return DynprovError(f"template {source.name} from {where}: {type(exc).__name__}: {exc}")


class CheckedTemplate:
    """A Jinja template whose errors (an override naming an unknown variable...) are one-line
    DynprovErrors naming the file, not tracebacks."""

    def __init__(self, template, source: TemplateSource):
        self.template = template
        self.source = source

    def render(self, *args, **kwargs) -> str:
        import jinja2

        try:
            return self.template.render(*args, **kwargs)
        except jinja2.TemplateError as exc:
            raise _template_error(self.source, exc) from None


@contextlib.contextmanager
def naming_template(renderer: Renderer) -> Iterator[None]:
    """A refused DHCP config names the template file it came from (a site override or ours)."""
    try:
        yield
    except DynprovError as exc:
        used = [src.describe() for name, src in renderer.sources.items() if name.startswith("dhcp/")]
        if not used:
            raise
        raise type(exc)(f"{exc}\n  rendered from {', '.join(used)}") from None


class Renderer:
    def __init__(self, cfg: Config):
        from pxe import discovery

        self.cfg = cfg
        self.sources: dict[str, TemplateSource] = {}  # every template this renderer used
        self._loaded: dict[str, CheckedTemplate] = {}
        self.read_templates: set[str] = set()  # every template file read, includes too
        self.dhcp_rows: list[tuple] = []  # host_rows of the last dhcp_config()
        # Checked here, before a render writes anything: a bad [discovery] stops it whole.
        self.discovery = discovery.load(cfg)

    @cached_property
    def env(self):
        return template_env(self.cfg, self.read_templates, autoescape=False,
                            keep_trailing_newline=True, trim_blocks=False)

    def template(self, name: str) -> CheckedTemplate:
        """Loaded once per Renderer (one render): 10,000s of nodes cost no extra stat() calls."""
        loaded = self._loaded.get(name)
        if loaded is None:
            import jinja2

            source = self.sources[name] = find_template(self.cfg, name)
            try:
                template = self.env.get_template(name)
            except jinja2.TemplateError as exc:
                raise _template_error(source, exc) from None
            loaded = self._loaded[name] = CheckedTemplate(template, source)
        return loaded

    @cached_property
    def net(self) -> NetView:
        # Formatting only: [network] was checked with netaddr when the config was loaded. The
        # standard library's ipaddress is already imported (pathlib) where netaddr costs a
        # changed DHCP config's render ~15 ms.
        import ipaddress

        n = self.cfg.network
        ipnet = ipaddress.IPv4Network(n.subnet, strict=False)
        return NetView(interface=n.interface, network=str(ipnet.network_address),
                       netmask=str(ipnet.netmask), server=n.server,
                       range_first=n.dynamic_range[0], range_last=n.dynamic_range[1],
                       gateway=n.gateway, dns=n.dns)

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.network.server}:{self.cfg.boot.http_port}"

    # -- DHCP ------------------------------------------------------------------------------
    def dhcp_config(self, nodes: Snapshot | Iterable[Node | DhcpHost],
                    backend: str | None = None) -> str:
        """The DHCP config of ``nodes`` (Nodes, DhcpHosts, or the Snapshot `render` reads).
        Templates see each node as a DhcpHost (pxe.dhcpinputs): its DHCP facts, not what
        set-boot changes, so a set-boot never changes this file."""
        with _collector_paused():
            template = self.template(self.dhcp_template_name(backend))
            hosts = dhcp_host_context(nodes)
            self.dhcp_rows = hosts["host_rows"]  # for pxe.dhcpincremental's index of the file
            return template.render(**self.dhcp_settings_context(), **hosts)

    def dhcp_template_name(self, backend: str | None = None) -> str:
        backend = backend or self.cfg.dhcp.backend
        if backend == "dnsmasq":
            return ("dhcp/dnsmasq-proxy.conf.j2" if self.cfg.dhcp.mode == "proxy"
                    else "dhcp/dnsmasq.conf.j2")
        return "dhcp/dhcpd.conf.j2"

    def dhcp_settings_context(self) -> dict[str, object]:
        """What the DHCP templates see besides the nodes."""
        return {"net": self.net, "boot": self.cfg.boot, "dhcp": self.cfg.dhcp}

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

    def node_boot_context(self, node: Node, image: Image | None) -> dict:
        """What the per-MAC templates see (without ``mac``)."""
        if node.boot_target != "os":
            image = None
        return {
            "node": node,
            "image": image,
            "base_url": self.base_url,
            "kernel_path": image.blob_path(image.kernel_sha) if image else "",
            "initrd_path": image.blob_path(image.initrd_sha) if image and image.initrd_sha else "",
            "append": self.kernel_args(node, image) if image else "",
        }

    def node_boot_file(self, kind: str, context: Mapping, mac: str) -> str:
        """One loader config (``kind`` pxelinux, grub or ipxe) for one MAC of a node."""
        return self.template(NODE_TEMPLATES[kind]).render({**context, "mac": mac})

    def node_boot_files(self, node: Node, image: Image | None) -> dict[str, str]:
        """Every per-MAC boot file for one node: its firmware's loader config and an iPXE script."""
        context = self.node_boot_context(node, image)
        # Only the loader this node's firmware runs (pxelinux on BIOS, GRUB on UEFI), plus the
        # iPXE script for HTTP boot: each file costs a create + rename, and sites have 10,000s.
        loader = "grub" if node.firmware == "uefi" else "pxelinux"
        files: dict[str, str] = {}
        for mac in node.macs:
            names = boot_file_names(mac)
            files[names[loader]] = self.node_boot_file(loader, context, mac)
            files[names["ipxe"]] = self.node_boot_file("ipxe", context, mac)
        return files

    def discovery_boot(self, images: Mapping[str, Image] | None) -> dict[str, str] | None:
        """What an unknown MAC boots with `[discovery] enabled`: the discovery image's kernel and
        initrd (the provisioning initramfs) in discover mode; None = the local disk."""
        settings = self.discovery
        image = (images or {}).get(settings.image or "") if settings.enabled else None
        if image is None:
            return None
        args = [image.cmdline] if image.cmdline else []
        args += [f"dynprov.server={self.base_url}", "dynprov.mode=discover"]
        return {"label": image.label, "kernel_path": image.blob_path(image.kernel_sha),
                "initrd_path": image.blob_path(image.initrd_sha) if image.initrd_sha else "",
                "append": " ".join(args)}

    def shared_context(self, images: Mapping[str, Image] | None = None) -> dict:
        """What the shared templates (unknown MACs, dispatchers) see."""
        return {"base_url": self.base_url, "discovery": self.discovery_boot(images)}

    def shared_boot_files(self, images: Mapping[str, Image] | None = None) -> dict[str, str]:
        """Files every node reads first: the unknown-MAC default and the GRUB/iPXE dispatchers."""
        ctx = self.shared_context(images)
        return {name: self.template(t).render(ctx) for name, t in SHARED_TEMPLATES.items()}

    def all_boot_files(self, nodes: Iterable[Node], images: Mapping[str, Image]) -> dict[str, str]:
        files = self.shared_boot_files(images)
        for node in nodes:
            image = images.get(node.desired_os or "") if node.boot_target == "os" else None
            files.update(self.node_boot_files(node, image))
        return files
