"""set-boot and render: inventory -> plan what each node boots -> render -> stage.

set-boot is one database transaction: `pxe-stage serve` renders each node's loader config from
the database when the loader asks (pxe.serve.bootconfigs). Per-node files are written only for
sites whose TFTP/HTTP come from tftpd-hpa/nginx (`[boot] write_files`, or `render --servers`);
this is the only place that writes them, under the render lock so two commands on overlapping
nodes queue instead of interleaving.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace

from pxe import atomic, db, dhcp, stage
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
    target = "os" if image else "local"
    with atomic.locked(cfg.lock_path):
        with db.transaction(inv.conn):  # one transaction; readers see all nodes move at once
            inv.set_boot(names, target, label, tokens)
            db.log_events(inv.conn, "set-boot", names, label or "local")
        updated = [replace(n, boot_target=target, desired_os=label or n.desired_os,
                           boot_token=(tokens or {}).get(n.name)) for n in nodes]
        if cfg.boot.write_files:  # sites serving with tftpd-hpa/nginx read files
            renderer = Renderer(cfg)
            files: dict[str, str] = {}
            for node in updated:
                files.update(renderer.node_boot_files(node, image))
            stage.write_files(cfg, files)
    return updated


def render_all(cfg: Config, reload: bool = True, check_only: bool = False,
               servers: bool = False) -> RenderReport:
    """Render and install everything: DHCP config (checked by the daemon), boot loaders, and the
    boot-config file tree when files are served by others (``[boot] write_files``); with
    ``servers``, also that tree and the dnsmasq/tftpd-hpa/nginx configs of
    pxe.serve.standard_configs."""
    inv = Inventory(cfg)
    nodes = inv.all()
    renderer = Renderer(cfg)
    text = renderer.dhcp_config(nodes)
    if check_only:
        dhcp.check(cfg, text)
        return RenderReport(False, 0, 0, [], {})
    with atomic.locked(cfg.lock_path):
        dhcp_changed = dhcp.install(cfg, text, reload=reload)
        if cfg.boot.write_files or servers:
            images = {i.label: i for i in Catalog(cfg, inv.conn).all()}
            files = renderer.all_boot_files(nodes, images)
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
    return RenderReport(dhcp_changed, len(files), changed, pruned, loaders)
