"""set-boot and render: inventory -> plan what each node boots -> render -> stage.

set-boot is one database transaction: `pxe-stage serve` renders each node's loader config from
the database when the loader asks (pxe.serve.bootconfigs). Per-node files are written only for
sites whose TFTP/HTTP come from tftpd-hpa/nginx (`[boot] write_files`, or `render --servers`);
this is the only place that writes them, under the render lock so two commands on overlapping
nodes queue instead of interleaving.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pxe import atomic, db
from pxe.config import Config
from pxe.errors import InputError, NotFound
from pxe.images import Catalog
from pxe.inventory import Inventory

if TYPE_CHECKING:  # rendering (jinja2, netaddr) is imported only when something is rendered
    from pxe import render
    from pxe.images import Image


@dataclass
class RenderReport:
    dhcp_changed: bool
    boot_files: int
    boot_changed: int
    pruned: list[str]
    loaders: dict[str, str]
    sources: dict[str, render.TemplateSource] = field(default_factory=dict)  # template -> file


@dataclass(frozen=True)
class BootSet:
    """What set-boot recorded for one node."""

    name: str
    boot_target: str
    desired_os: str | None
    boot_token: str | None = field(default=None, repr=False)


def set_boot(cfg: Config, spec: str | Iterable[str], label: str | None,
             inventory: Inventory | None = None, *, keep_tokens: bool = False) -> list[BootSet]:
    """Point the nodes' next network boot at image ``label`` (or at their local disk if None).

    A new one-time call-home token is issued for every node sent to an image. ``keep_tokens``
    (local disk only) keeps each node's current token: a stateful node that reported "installed"
    still reports "ready" from its disk with it. Reads only the columns it needs: 10,000 nodes
    cost one query and one transaction.
    """
    from pxe.nodeset import expand, fold

    inv = inventory or Inventory(cfg)
    names = expand(spec)
    rows = _boot_rows(inv.conn, names)
    missing = [n for n in names if n not in rows]
    if missing:
        raise NotFound(f"unknown node(s): {fold(missing)}")
    image: Image | None = None
    if label is not None:
        image = Catalog(cfg, inv.conn).get(label)
        wrong = [n for n in names if rows[n][0] != image.arch]
        if wrong:
            raise InputError(f"image {label} is for {image.arch}; not for node(s) {', '.join(wrong)}")
    tokens = dict(zip(names, _tokens(len(names)), strict=True)) if image else None
    if keep_tokens and image is None:
        tokens = {n: rows[n][1] for n in names if rows[n][1]}
    target = "os" if image else "local"
    with atomic.locked(cfg.lock_path):
        with db.transaction(inv.conn):  # one transaction; readers see all nodes move at once
            inv.set_boot(names, target, label, tokens)
            db.log_events(inv.conn, "set-boot", names, label or "local")
        if cfg.boot.write_files:  # sites serving with tftpd-hpa/nginx read files
            from pxe import stage
            from pxe.render import Renderer

            renderer = Renderer(cfg)
            files: dict[str, str] = {}
            for node in inv.select(names):
                files.update(renderer.node_boot_files(node, image))
            stage.write_files(cfg, files)
    return [BootSet(n, target, label or rows[n][2], (tokens or {}).get(n)) for n in names]


def _tokens(count: int) -> list[str]:
    """``count`` one-time tokens, each as secrets.token_urlsafe(24) makes them (24 bytes of
    os.urandom, the system's CSPRNG, as 32 URL-safe characters), from one read instead of
    ``count`` (and without importing secrets: hmac and OpenSSL's hashes)."""
    import base64

    text = base64.urlsafe_b64encode(os.urandom(24 * count)).decode("ascii")
    return [text[i:i + 32] for i in range(0, 32 * count, 32)]  # 24 bytes = 32 chars, no "="


def _boot_rows(conn: sqlite3.Connection, names: list[str]) -> dict[str, tuple]:
    """name -> (arch, boot_token, desired_os) of the named nodes that exist."""
    out: dict[str, tuple] = {}
    for start in range(0, len(names), 5000):
        chunk = names[start:start + 5000]
        marks = ",".join("?" * len(chunk))
        for name, arch, token, desired in conn.execute(
                f"SELECT name, arch, boot_token, desired_os FROM nodes WHERE name IN ({marks})",
                chunk):
            out[name] = (arch, token, desired)
    return out


def render_all(cfg: Config, reload: bool = True, check_only: bool = False,
               servers: bool = False, inventory: Inventory | None = None,
               segment: str | None = None) -> RenderReport:
    """Render and install everything: DHCP config (checked by the daemon), boot loaders, and the
    boot-config file tree when files are served by others (``[boot] write_files``); with
    ``servers``, also that tree and the dnsmasq/tftpd-hpa/nginx configs of
    pxe.serve.standard_configs. ``segment`` (default: ``[segment] name``, else the primary's):
    only that segment's nodes (pxe.segments) - each boot server renders its own.

    The DHCP config is rendered and checked only when what it is made of changed since it was
    installed (pxe.dhcpinputs): a set-boot changes nothing in it.
    """
    from pxe import dhcp, dhcpinputs, render, segments, stage

    inv = inventory or Inventory(cfg)
    mine = segments.load(cfg, segment).name  # a server renders its own segment's nodes only

    def nodes() -> list:
        return [n for n in inv.all() if n.segment == mine]

    renderer = render.Renderer(cfg)

    def images() -> dict[str, Image]:
        return {i.label: i for i in Catalog(cfg, inv.conn).all()}

    if check_only:  # every output rendered in memory (a broken template fails here), none written
        text = renderer.dhcp_config(dhcpinputs.read(inv.conn, mine).hosts())
        with render.naming_template(renderer):
            dhcp.check(cfg, text)
        files = renderer.all_boot_files(nodes(), images())
        if servers:
            from pxe.serve import standard_configs

            standard_configs.render(cfg, renderer)
        return RenderReport(False, len(files), 0, [], {}, renderer.sources)
    with atomic.locked(cfg.lock_path):
        snapshot = dhcpinputs.read(inv.conn, mine)
        if dhcpinputs.installed(cfg, snapshot):  # rendered from the same inputs, accepted, intact
            dhcp_changed = False
        else:
            text = renderer.dhcp_config(snapshot.hosts())
            used = set(renderer.read_templates)
            with render.naming_template(renderer):
                dhcp_changed = dhcp.install(cfg, text, reload=reload)
            dhcpinputs.save(cfg, snapshot, used)
        if cfg.boot.write_files or servers:
            files = renderer.all_boot_files(nodes(), images())
            changed = stage.write_files(cfg, files)
            pruned = stage.prune(cfg, files)
        else:  # pxe-stage serve renders them per request: no files (and none left stale)
            files, changed = {}, 0
            pruned = stage.prune(cfg, ())
            stage.remove_shared(cfg)
        loaders = stage.install_loaders(cfg)
        if servers:
            from pxe.serve import standard_configs

            standard_configs.write(cfg)
    return RenderReport(dhcp_changed, len(files), changed, pruned, loaders, renderer.sources)
