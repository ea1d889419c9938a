"""set-boot and render: inventory -> plan what each node boots -> render -> stage.

The only place that writes boot files, always under the render lock so two commands on
overlapping nodes queue instead of interleaving.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from pxe import atomic, db, dhcp, render, stage
from pxe.config import Config
from pxe.errors import InputError
from pxe.images import Catalog, Image
from pxe.inventory import Inventory, Node
from pxe.render import Renderer


@dataclass
class RenderReport:
    dhcp_changed: bool
    boot_files: int
    boot_changed: int
    pruned: list[str]
    loaders: dict[str, str]
    sources: dict[str, render.TemplateSource] = field(default_factory=dict)  # template -> file


def set_boot(cfg: Config, spec: str | Iterable[str], label: str | None,
             inventory: Inventory | None = None, *, keep_tokens: bool = False) -> list[Node]:
    """Point the nodes' next network boot at image ``label`` (or at their local disk if None).

    A new one-time call-home token is issued for every node sent to an image. ``keep_tokens``
    (local disk only) keeps each node's current token: a stateful node that reported "installed"
    still reports "ready" from its disk with it.
    """
    inv = inventory or Inventory(cfg)
    nodes = inv.select(spec)
    image: Image | None = None
    if label is not None:
        image = Catalog(cfg, inv.conn).get(label)
        wrong = [n.name for n in nodes if n.arch != image.arch]
        if wrong:
            raise InputError(f"image {label} is for {image.arch}; not for node(s) {', '.join(wrong)}")
    names = [n.name for n in nodes]
    tokens = {n: secrets.token_urlsafe(24) for n in names} if image else None
    if keep_tokens and image is None:
        tokens = {n.name: n.boot_token for n in nodes if n.boot_token}
    renderer = Renderer(cfg)
    with atomic.locked(cfg.lock_path):
        inv.set_boot(names, "os" if image else "local", label, tokens)
        with db.transaction(inv.conn):
            for name in names:
                db.log_event(inv.conn, "set-boot", name, label or "local")
        updated = inv.select(names)
        files: dict[str, str] = {}
        for node in updated:
            files.update(renderer.node_boot_files(node, image))
        stage.write_files(cfg, files)
    return updated


def render_all(cfg: Config, reload: bool = True, check_only: bool = False,
               servers: bool = False) -> RenderReport:
    """Render and install everything: DHCP config (checked by the daemon), boot files, loaders;
    with ``servers``, also the dnsmasq/tftpd-hpa/nginx configs of pxe.serve.standard_configs."""
    inv = Inventory(cfg)
    nodes = inv.all()
    images = {i.label: i for i in Catalog(cfg, inv.conn).all()}
    renderer = Renderer(cfg)
    text = renderer.dhcp_config(nodes)
    if check_only:  # every output rendered in memory (a broken template fails here), none written
        with render.naming_template(renderer):
            dhcp.check(cfg, text)
        files = renderer.all_boot_files(nodes, images)
        if servers:
            from pxe.serve import standard_configs

            standard_configs.render(cfg, renderer)
        return RenderReport(False, len(files), 0, [], {}, renderer.sources)
    with atomic.locked(cfg.lock_path):
        with render.naming_template(renderer):
            dhcp_changed = dhcp.install(cfg, text, reload=reload)
        files = renderer.all_boot_files(nodes, images)
        changed = stage.write_files(cfg, files)
        pruned = stage.prune(cfg, files)
        loaders = stage.install_loaders(cfg)
        if servers:
            from pxe.serve import standard_configs

            standard_configs.write(cfg)
    return RenderReport(dhcp_changed, len(files), changed, pruned, loaders, renderer.sources)
