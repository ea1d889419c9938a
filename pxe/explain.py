"""`pxe-stage explain NODE`: the boot chain one node will see, each link checked live.

Reads the inventory, the installed DHCP config and the catalog, renders what the node should
get, then fetches every link from the running `pxe-stage serve` over TFTP and HTTP the way the
firmware would (pxe.bootfetch) and compares. Traffic goes only to loopback or to an address of
this machine: a server elsewhere is reported as not checked. Each problem is one sentence plus
the command that fixes it. Nothing is written.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pxe import bootfetch, db, validate
from pxe.config import Config
from pxe.errors import NotFound
from pxe.images import Catalog, Image
from pxe.inventory import Inventory, Node
from pxe.render import Renderer, boot_file_names

_TOKEN = re.compile(r"(dynprov\.token=)\S+")
START_SERVER = "start it: `pxe-stage serve` (systemd: `systemctl start dynprov-serve`)"


def redact(text: str) -> str:
    """The call-home token is a credential: explain output gets pasted into tickets."""
    return _TOKEN.sub(r"\1<redacted>", text)


@dataclass
class Step:
    """One link of the chain: what it is, the facts found, and a problem with its fix."""

    link: str
    facts: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    fix: str | None = None

    def fail(self, problem: str, fix: str) -> Step:
        if self.problem is None:  # the first problem of a link is the one to fix first
            self.problem, self.fix = problem, fix
        return self


@dataclass
class Explanation:
    node: dict[str, Any]
    steps: list[Step]

    @property
    def problems(self) -> list[Step]:
        return [s for s in self.steps if s.problem]

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "ok": not self.problems,
                "steps": [asdict(s) for s in self.steps]}


@dataclass(frozen=True)
class Endpoint:
    """Where explain may send its fetches for one server, or why it may not."""

    host: str | None
    port: int
    note: str = ""


def reachable_address(address: str) -> str | None:
    """The address to fetch from: loopback for a wildcard, the address itself if it is loopback
    or one of this machine's; None for anything else (explain never sends off the machine)."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    if ip.is_loopback:
        return address
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))  # succeeds only for an address this machine has
        except OSError:
            return None
    return address


def _endpoints(cfg: Config) -> tuple[Endpoint, Endpoint, Any]:
    from pxe.serve import settings

    s = settings.load(cfg)

    def one(enabled: bool, address: str, port: int, what: str) -> Endpoint:
        if not enabled:
            return Endpoint(None, port, f"{what} is off in [serve]")
        host = reachable_address(address)
        if host is None:
            return Endpoint(None, port, f"{what} address {address} is not on this machine; "
                                        "run explain on the provisioning server")
        return Endpoint(host, port)

    return (one(s.tftp, s.tftp_address, s.tftp_port, "TFTP"),
            one(s.http, s.http_address, s.http_port, "HTTP"), s)


IPXE_NAMES = ("undionly.kpxe", "undionly.kkpxe", "ipxe.pxe", "ipxe.efi", "snponly.efi")


def is_ipxe_loader(name: str) -> bool:
    """An iPXE binary (Debian's `ipxe` package names, or "ipxe" in the name): it sends DHCP
    option 175 and so gets boot.ipxe; pxelinux and GRUB do not."""
    base = name.rsplit("/", 1)[-1].lower()
    return base in IPXE_NAMES or "ipxe" in base or base.endswith((".kpxe", ".kkpxe"))


def _url(host: str, port: int, rel: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/{rel.lstrip('/')}"


class _Explainer:
    def __init__(self, cfg: Config, node: Node, conn: sqlite3.Connection, timeout: float):
        self.cfg, self.node, self.conn, self.timeout = cfg, node, conn, timeout
        self.renderer = Renderer(cfg)
        self.tftp, self.http, self.serve = _endpoints(cfg)
        self.steps: list[Step] = []
        self.image: Image | None = None
        self.expected: dict[str, str] = {}
        self.shared: dict[str, str] = {}
        self._fetched: dict[tuple[str, str], bootfetch.Fetched] = {}
        self.down: dict[str, str] = {}  # protocol -> why its server is taken as down

    # -- fetching, once per (protocol, name) ---------------------------------------------------
    def fetch(self, proto: str, rel: str) -> bootfetch.Fetched | None:
        """None when that server cannot be checked from here (its note says why)."""
        key = (proto, rel)
        if key not in self._fetched:
            if proto in self.down:
                return None
            if proto == "tftp":
                if self.tftp.host is None:
                    return None
                got = bootfetch.tftp_get(self.tftp.host, self.tftp.port, rel,
                                         timeout=self.timeout)
            else:
                if self.http.host is None:
                    return None
                got = bootfetch.http_get(_url(self.http.host, self.http.port, rel),
                                         timeout=self.timeout)
            if got.unreachable:
                self.down[proto] = got.error
            self._fetched[key] = got
        return self._fetched[key]

    def note(self, proto: str) -> str:
        if proto in self.down:
            return f"{proto.upper()} server does not answer (see the first problem)"
        return (self.tftp if proto == "tftp" else self.http).note

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        return step

    # -- the links ------------------------------------------------------------------------------
    @property
    def loader(self) -> str:
        """The first loader this node's PXE ROM is given (by its firmware)."""
        return self.cfg.boot.uefi_loader if self.node.firmware == "uefi" else \
            self.cfg.boot.bios_loader

    @property
    def via_ipxe(self) -> bool:
        """True when the first loader is iPXE and DHCP answers it with boot.ipxe (option 175):
        then scripts, kernel and initrd come over HTTP and no pxelinux/GRUB config is read."""
        return self.cfg.boot.ipxe_http and is_ipxe_loader(self.loader)

    def run(self) -> list[Step]:
        self.servers()
        self.dhcp()
        self.resolve_image()
        for mac in self.node.macs:
            if self.via_ipxe:
                self.ipxe_chain(mac)
            elif self.node.firmware == "uefi":
                self.grub_chain(mac)
            else:
                self.pxelinux_chain(mac)
        self.blobs()
        self.callhome()
        self.current_run()
        return self.steps

    def servers(self) -> None:
        step = self.add(Step("servers"))
        base = self.renderer.base_url
        step.facts = {"nodes are told": base,
                      "tftp": f"{self.serve.tftp_address}:{self.serve.tftp_port}"
                              if self.serve.tftp else "off",
                      "http": f"{self.serve.http_address}:{self.serve.http_port}"
                              if self.serve.http else "off",
                      "checked from": {"tftp": self.tftp.host and f"{self.tftp.host}:{self.tftp.port}"
                                       or self.tftp.note,
                                       "http": self.http.host and f"{self.http.host}:{self.http.port}"
                                       or self.http.note}}
        server = self.cfg.network.server
        if self.serve.http and self.serve.http_port != self.cfg.boot.http_port:
            step.fail(f"boot configs point nodes at port {self.cfg.boot.http_port} but serve "
                      f"listens for HTTP on port {self.serve.http_port}",
                      "make [boot] http_port and [serve] http_port the same, then restart serve")
        for what, enabled, address in (("TFTP", self.serve.tftp, self.serve.tftp_address),
                                       ("HTTP", self.serve.http, self.serve.http_address)):
            ip = ipaddress.ip_address(address)
            if enabled and not ip.is_unspecified and address != server:
                step.fail(f"serve listens for {what} on {address} but DHCP sends nodes to "
                          f"{server}", f"set [serve] {what.lower()}_address to {server} (or "
                                       "0.0.0.0) and restart serve")

    def dhcp(self) -> None:
        cfg, node = self.cfg, self.node
        step = self.add(Step("dhcp"))
        loader = self.loader
        first, last = cfg.network.dynamic_range
        rom = f"{node.firmware.upper()} PXE ROM"
        if cfg.dhcp.mode == "proxy":
            options: dict[str, Any] = {
                "address": "from the site's DHCP server (dynprov answers only the PXE part)",
                "boot server": cfg.network.server,
                f"boot file ({rom}, pxe-service)": loader,
            }
        else:
            options = {
                "address": node.ip or f"dynamic, from {first}-{last}",
                "next-server": cfg.network.server,
                f"filename ({rom})": loader,
            }
            if cfg.boot.ipxe_http:
                options["filename (iPXE, option 175)"] = f"{self.renderer.base_url}/boot.ipxe"
        if self.via_ipxe:
            chain = (f"{loader} over TFTP, then iPXE fetches boot.ipxe, its script, kernel and "
                     "initrd over HTTP")
        elif node.firmware == "uefi":
            chain = f"{loader} (GRUB) over TFTP, then its config, kernel and initrd over TFTP"
        else:
            chain = f"{loader} over TFTP, then its config, kernel and initrd over TFTP"
        step.facts = {"backend": cfg.dhcp.backend, "config": str(cfg.dhcp.config_file),
                      "mode": ("proxy: the site's DHCP server gives the address, dynprov the "
                               "boot answer" if cfg.dhcp.mode == "proxy"
                               else "server: dynprov gives the address and the boot answer"),
                      "chain": chain, "options": options,
                      "live check": "not done: DHCP answers on "
                                    f"{cfg.network.interface}; explain does not broadcast "
                                    "(`pxe-stage dhcp probe` does: who answers a PXE ROM)"}
        try:
            installed = cfg.dhcp.config_file.read_text()
        except OSError as exc:
            step.fail(f"the DHCP config {cfg.dhcp.config_file} is not there ({exc.strerror})",
                      "run `pxe-stage render` to install it")
            return
        lines = installed.splitlines()
        hosts = {}
        for mac in node.macs:
            found = [(i + 1, text.strip()) for i, text in enumerate(lines)
                     if mac in text.lower() and not text.lstrip().startswith("#")]
            hosts[mac] = [f"line {n}: {t}" for n, t in found]
            if not found:
                step.fail(f"the installed DHCP config has no entry for {mac}: the node gets "
                          "no fixed address and may be ignored by the DHCP server",
                          "run `pxe-stage render` (it adds every inventory node)")
        step.facts["host lines"] = hosts
        boot_words = ("dhcp-boot=", "filename ", "pxe-service=")
        step.facts["boot file lines"] = [f"line {i + 1}: {t.strip()}" for i, t in enumerate(lines)
                                         if t.strip().startswith(boot_words)]
        expected = self.renderer.dhcp_config(Inventory(cfg, self.conn).all())
        if expected != installed:
            step.fail("the installed DHCP config differs from what the inventory renders to "
                      "(it is stale or was edited by hand)",
                      "run `pxe-stage render` (it checks the new config with the daemon first)")

    def resolve_image(self) -> None:
        node = self.node
        step = self.add(Step("image"))
        step.facts = {"boot target": node.boot_target,
                      "image": node.desired_os if node.boot_target == "os" else None}
        if node.boot_target != "os":
            step.facts["note"] = "the node boots its local disk (loader configs say so)"
        else:
            try:
                self.image = Catalog(self.cfg, self.conn).get(node.desired_os or "")
            except NotFound:
                step.fail(f"the node is set to boot image {node.desired_os!r}, which is not in "
                          "the catalog: its loader config falls back to the local disk",
                          f"`pxe-stage set-boot {node.name} --os LABEL` with a label from "
                          "`pxe-stage images list`")
            else:  # its next boot gets the label's current version (pxe.imageversions)
                step.facts.update({"version": self.image.version, "mode": self.image.mode,
                                   "arch": self.image.arch,
                                   "kernel args": redact(self.renderer.kernel_args(node,
                                                                                   self.image))})
        step.facts["last booted"] = ({"image": node.current_os, "version": node.current_version}
                                     if node.current_os else None)
        self.expected = self.renderer.node_boot_files(node, self.image)
        catalog = Catalog(self.cfg, self.conn)
        self.shared = self.renderer.shared_boot_files({i.label: i for i in catalog.all()})

    def _fetch_step(self, link: str, proto: str, rel: str, fix_missing: str,
                    expect_text: str | None = None) -> Step:
        for done in self.steps:  # a shared link (loader, boot.ipxe) once, not once per MAC
            if done.link == link:
                return done
        step = self.add(Step(link))
        host = self.tftp if proto == "tftp" else self.http
        where = (f"tftp://{self.cfg.network.server}/{rel}" if proto == "tftp"
                 else f"{self.renderer.base_url}/{rel}")
        step.facts["fetch"] = where
        got = self.fetch(proto, rel)
        if got is None:
            step.facts["live"] = f"not checked: {self.note(proto)}"
            return step
        step.facts["live"] = ("fetched" if got.ok else f"FAILED: {got.error}")
        if got.ok:
            step.facts.update(size=got.size, sha256=got.sha256)
        if expect_text is not None and got.ok:
            step.facts["content"] = redact(got.text)
        if not got.ok:
            if got.unreachable:
                step.fail(f"the {proto.upper()} server at {host.host}:{host.port} does not "
                          f"answer ({got.error})", START_SERVER)
            else:
                step.fail(f"{where} cannot be fetched ({got.error})", fix_missing)
        elif expect_text is not None and got.text != expect_text:
            step.fail(f"the served {rel} is not what the inventory renders now (a stale file in "
                      "the boot root, or serve runs an older config)",
                      "run `pxe-stage render`; if it persists restart `pxe-stage serve`")
        return step

    def pxelinux_chain(self, mac: str) -> None:
        loader = self.cfg.boot.bios_loader
        for name in (loader, "ldlinux.c32") if loader == "pxelinux.0" else (loader,):
            self._fetch_step(f"loader (BIOS PXE ROM): {name}", "tftp", name,
                             "run `pxe-stage render` to copy the boot loaders into the TFTP "
                             "root (Debian: apt install pxelinux syslinux-common)")
        rel = boot_file_names(mac)["pxelinux"]
        self._fetch_step(f"loader config ({mac})", "tftp", rel,
                         "run `pxe-stage render` (or `pxe-stage set-boot`) for this node",
                         self.expected.get(rel))

    def grub_chain(self, mac: str) -> None:
        loader = self.cfg.boot.uefi_loader
        self._fetch_step(f"loader (UEFI PXE ROM): {loader}", "tftp", loader,
                         "run `pxe-stage render` to copy the boot loaders into the TFTP root "
                         "(Debian: apt install grub-efi-amd64-bin)")
        self._fetch_step("loader dispatcher (GRUB)", "tftp", "grub/grub.cfg",
                         "run `pxe-stage render`", self.shared["grub/grub.cfg"])
        rel = boot_file_names(mac)["grub"]
        self._fetch_step(f"loader config ({mac})", "tftp", rel,
                         "run `pxe-stage render` (or `pxe-stage set-boot`) for this node",
                         self.expected.get(rel))

    def ipxe_chain(self, mac: str) -> None:
        rom = "UEFI" if self.node.firmware == "uefi" else "BIOS"
        self._fetch_step(f"loader (iPXE, {rom} PXE ROM): {self.loader}", "tftp", self.loader,
                         "run `pxe-stage render` to copy the boot loaders into the TFTP root "
                         "(Debian: apt install ipxe)")
        self._fetch_step("iPXE script (shared)", "http", "boot.ipxe", "run `pxe-stage render`",
                         self.shared["boot.ipxe"])
        rel = boot_file_names(mac)["ipxe"]
        self._fetch_step(f"iPXE script ({mac})", "http", rel,
                         "run `pxe-stage render` (or `pxe-stage set-boot`) for this node",
                         self.expected.get(rel))

    def blobs(self) -> None:
        image = self.image
        if image is None:
            return
        firmware_proto = ["http"] if self.via_ipxe else ["tftp"]
        parts = [("kernel", image.kernel_sha, firmware_proto),
                 ("initrd", image.initrd_sha, firmware_proto),
                 ("rootfs", image.rootfs_sha, ["http"])]  # /init's wget
        for what, sha, protos in parts:
            if not sha:
                continue
            rel = image.blob_path(sha)
            for proto in protos:
                root: Path = self.cfg.paths.tftp_root if proto == "tftp" else self.cfg.paths.http_root
                step = self._fetch_step(
                    f"{what} over {proto.upper()}", proto, rel,
                    f"re-add the image: `pxe-stage images remove {image.label} --force` then "
                    f"`pxe-stage images add {image.label} ...` (blobs are stored by content)")
                step.facts["image sha256"] = sha
                on_disk = root / rel
                try:
                    step.facts["size on disk"] = on_disk.stat().st_size
                except OSError:
                    step.fail(f"the {what} of image {image.label} is missing from {root} "
                              f"({on_disk.name[:12]}...)",
                              f"re-add the image: `pxe-stage images remove {image.label} "
                              f"--force` then `pxe-stage images add {image.label} ...`")
                if step.facts.get("sha256") and step.facts["sha256"] != sha:
                    step.fail(f"the served {what} does not match its sha256 (the blob is damaged)",
                              f"re-add the image {image.label} (remove --force, then add)")

    def callhome(self) -> None:
        node = self.node
        step = self.add(Step("call-home"))
        step.facts["url"] = f"{self.renderer.base_url}/report"
        step.facts["token"] = "issued" if node.boot_token else "none"
        if node.boot_target == "os" and not node.boot_token:
            step.fail("the node boots an image but has no call-home token: its reports will "
                      "be refused", f"run `pxe-stage set-boot {node.name} --os "
                                    f"{node.desired_os}` to issue one")
        got = self.fetch("http", "healthz")
        if got is None:
            step.facts["live"] = f"not checked: {self.note('http')}"
        elif got.ok:
            step.facts["live"] = "serve answers /healthz"
        else:
            step.fail(f"the call-home server does not answer ({got.error})", START_SERVER)

    def current_run(self) -> None:
        step = self.add(Step("run"))
        step.facts["node state"] = f"{self.node.state}" + (
            f" ({self.node.state_reason})" if self.node.state_reason else "")
        try:
            row = self.conn.execute(
                "SELECT rn.run_id, rn.state, rn.reason, r.label FROM run_nodes rn "
                "JOIN runs r ON r.id = rn.run_id WHERE rn.node = ? "
                "ORDER BY rn.run_id DESC LIMIT 1", (self.node.name,)).fetchone()
        except sqlite3.Error:
            row = None
        if row is None:
            step.facts["current run"] = None
        else:
            step.facts["current run"] = {"id": row["run_id"], "image": row["label"],
                                         "state": row["state"], "reason": row["reason"]}


def explain(cfg: Config, name: str, *, timeout: float = 2.0) -> Explanation:
    """The chain ``name`` will see; NotFound for a node the inventory does not know."""
    name = validate.hostname(name)
    conn = db.connect(cfg.database)
    try:
        node = Inventory(cfg, conn).get(name)
    except NotFound:
        raise NotFound(f"unknown node {name!r}: it is not in the inventory "
                       "(`pxe-stage nodes list`; add it with `pxe-stage nodes add`)") from None
    steps = _Explainer(cfg, node, conn, timeout).run()
    return Explanation(node=node.public() | {"bmc_secret": None}, steps=steps)


def format_text(result: Explanation) -> str:
    """The chain as indented text, then every problem as a sentence with its fix."""
    out = [f"node {result.node['name']}: macs {', '.join(result.node['macs'])}, "
           f"firmware {result.node['firmware']}, arch {result.node['arch']}"]
    for step in result.steps:
        live = str(step.facts.get("live", ""))
        mark = "PROBLEM" if step.problem else "--" if live.startswith("not checked") else "ok"
        out.append(f"[{mark}] {step.link}")
        for key, value in step.facts.items():
            out.extend(_fact_lines(key, value, "    "))
    problems = result.problems
    out.append("")
    if not problems:
        out.append("no problems found")
    for i, step in enumerate(problems, 1):
        out.append(f"problem {i}: {step.link}: {step.problem}.")
        out.append(f"  fix: {step.fix}.")
    return "\n".join(out)


def _fact_lines(key: str, value: Any, indent: str) -> list[str]:
    if isinstance(value, dict):
        lines = [f"{indent}{key}:"]
        for k, v in value.items():
            lines.extend(_fact_lines(k, v, indent + "  "))
        return lines
    if isinstance(value, list):
        return [f"{indent}{key}:"] + [f"{indent}  {v}" for v in value] if value \
            else [f"{indent}{key}: -"]
    if key == "content" and isinstance(value, str):
        body = value.rstrip("\n").splitlines()
        return [f"{indent}content:"] + [f"{indent}  | {line}" for line in body]
    return [f"{indent}{key}: {'-' if value in (None, '') else value}"]
