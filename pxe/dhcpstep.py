"""The DHCP step of `render`: the config rendered, checked and installed only when what it is
made of changed (pxe.dhcpinputs), and the early start `set-boot --render` uses. Standard
library and pxe.dhcpinputs only until something is to render: pxe.dhcp, pxe.render and jinja2
are imported then.

Early start: the DHCP config does not depend on boot targets, so `set-boot --render` renders it
and starts the daemon's check (a child process) before the set-boot transaction, which then runs
while the daemon reads. Afterwards, under the render lock, install() renames the checked file
into place only if the DHCP inputs (nodes' facts, templates, settings) are still those it was
rendered from and the daemon passed it; otherwise the early file is dropped and the step runs as
without it (with a renderer of its own: the early one holds the templates as they were). The
install therefore
never precedes a passing check, and never installs a config older than the database.
"""

from __future__ import annotations

import contextlib

from pxe import dhcpinputs

TYPE_CHECKING = False  # not typing's: this module is on every `set-boot --render`'s path
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterator

    from pxe.config import Config
    from pxe.dhcp import PendingCheck
    from pxe.render import Renderer


class Early:
    """A DHCP config rendered before set-boot's transaction, the daemon's check running on it."""

    __slots__ = ("renderer", "snapshot", "pending", "key")

    def __init__(self, renderer: Renderer, snapshot: dhcpinputs.Snapshot,
                 pending: PendingCheck | None, key: str = ""):
        self.renderer, self.snapshot, self.pending = renderer, snapshot, pending
        self.key = key  # dhcpinputs.key of everything it was rendered from, at render time

    def discard(self) -> None:
        if self.pending is not None:
            self.pending.discard()


@contextlib.contextmanager
def early_start(cfg: Config, conn: sqlite3.Connection,
                segment: str | None = None) -> Iterator[Early | None]:
    """For `set-boot --render`: when the DHCP config must change, render it and start its check
    now (None when nothing is to install). Whatever install() did not use is dropped on exit.
    Only a head start: if anything here fails (a broken template...), None, and the render
    after set-boot meets the same error where it always did."""
    from pxe import segments
    from pxe.errors import DynprovError

    early = None
    try:
        mine = segments.load(cfg, segment).name
        if not dhcpinputs.installed(cfg, dhcpinputs.generation(conn), mine):  # one row read
            from pxe import dhcp, render

            snapshot = dhcpinputs.read(conn, mine)
            renderer = render.Renderer(cfg)
            text = renderer.dhcp_config(snapshot)
            if not dhcp.unchanged(cfg, text):
                key = dhcpinputs.key(cfg, snapshot.generation, mine, renderer.read_templates)
                early = Early(renderer, snapshot, dhcp.PendingCheck(cfg, text), key)
    except (DynprovError, OSError):
        early = None
    try:
        yield early
    finally:
        if early is not None:
            early.discard()


def install(cfg: Config, conn: sqlite3.Connection, segment: str, renderer: Renderer,
            reload: bool = True, early: Early | None = None) -> bool:
    """Render, check and install ``segment``'s DHCP config unless the installed one is still
    what its inputs make (the caller holds the render lock). True when a new file went in."""
    current = dhcpinputs.generation(conn)  # one row: replaced on every write to DHCP facts
    if dhcpinputs.installed(cfg, current, segment):  # same inputs, accepted, intact
        return False
    from pxe import dhcp, render

    # The early file goes in only if nothing changed since it was rendered: neither the nodes'
    # facts nor a template or setting (the key save() records must describe the file installed).
    usable = (early is not None and early.pending is not None
              and early.snapshot.generation == current
              and early.key == dhcpinputs.key(cfg, current, segment, renderer.read_templates))
    if early is not None and not usable:  # its renderer keeps the templates it loaded
        renderer = render.Renderer(cfg)
    with render.naming_template(renderer):
        if usable:
            snapshot = early.snapshot
            pending, early.pending = early.pending, None
            pending.install(reload)  # waits for the daemon's verdict; renames only on a pass
            changed = True
        else:
            snapshot = dhcpinputs.read(conn, segment)
            changed = dhcp.install(cfg, renderer.dhcp_config(snapshot), reload=reload)
    dhcpinputs.save(cfg, snapshot, set(renderer.read_templates), segment)
    return changed
