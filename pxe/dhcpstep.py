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
install therefore never precedes a passing check, and never installs a config older than the
database.

Incremental: when only a few nodes' facts changed since the installed file, both paths take
pxe.dhcpincremental's plan: the daemon checks the header and footer with just the changed
entries, and the installed text with those entries spliced in is written (atomically, under the
render lock) once it passed. Otherwise the whole file is rendered, checked and installed, and
an index of where each node's entries are is saved with the record for the next change.
"""

from __future__ import annotations

import contextlib

from pxe import dhcpinputs

TYPE_CHECKING = False  # not typing's: this module is on every `set-boot --render`'s path
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterator

    from pxe import dhcpincremental
    from pxe.config import Config
    from pxe.dhcp import PendingCheck
    from pxe.render import Renderer


class Early:
    """A DHCP config rendered before set-boot's transaction, the daemon's check running on it
    (``plan``: an incremental change; ``text``: the whole file rendered)."""

    __slots__ = ("renderer", "snapshot", "pending", "key", "plan", "text")

    def __init__(self, renderer: Renderer, snapshot: dhcpinputs.Snapshot,
                 pending: PendingCheck | None, key: str = "",
                 plan: dhcpincremental.Plan | None = None, text: str = ""):
        self.renderer, self.snapshot, self.pending = renderer, snapshot, pending
        self.key = key  # dhcpinputs.key of everything it was rendered from, at render time
        self.plan, self.text = plan, text

    def discard(self) -> None:
        if self.pending is not None:
            self.pending.discard()


@contextlib.contextmanager
def early_start(cfg: Config, conn: sqlite3.Connection,
                segment: str | None = None) -> Iterator[Early | None]:
    """For `set-boot --render`: when the DHCP config must change, render it (or only the
    changed nodes' entries) and start its check now (None when nothing is to install).
    Whatever install() did not use is dropped on exit. Only a head start: if anything here
    fails (a broken template...), None, and the render after set-boot meets the same error
    where it always did."""
    from pxe import segments
    from pxe.errors import DynprovError

    early = None
    try:
        mine = segments.load(cfg, segment).name
        if not dhcpinputs.installed(cfg, dhcpinputs.generation(conn), mine):  # one row read
            from pxe import render

            renderer = render.Renderer(cfg)
            early = _prepare(cfg, conn, mine, renderer)
    except (DynprovError, OSError):
        early = None
    try:
        yield early
    finally:
        if early is not None:
            early.discard()


def _prepare(cfg: Config, conn: sqlite3.Connection, segment: str,
             renderer: Renderer) -> Early | None:
    """The early render: incremental when it can be, else in full; its check started."""
    from pxe import dhcp, dhcpincremental

    plan = dhcpincremental.plan(cfg, conn, segment, renderer)
    if plan is not None:
        snapshot, text = plan.snapshot, plan.text
    else:
        snapshot = dhcpinputs.read(conn, segment)
        text = renderer.dhcp_config(snapshot)
    if dhcp.unchanged(cfg, text):
        return None
    key = dhcpinputs.key(cfg, snapshot.generation, segment, renderer.read_templates)
    if plan is not None:  # the daemon reads header, footer and the changed entries only
        pending = dhcp.PendingCheck(cfg, plan.check_text, suffix=".check", durable=False)
        return Early(renderer, snapshot, pending, key, plan=plan)
    return Early(renderer, snapshot, dhcp.PendingCheck(cfg, text), key, text=text)


def install(cfg: Config, conn: sqlite3.Connection, segment: str, renderer: Renderer,
            reload: bool = True, early: Early | None = None) -> tuple[bool, Renderer]:
    """Render, check and install ``segment``'s DHCP config unless the installed one is still
    what its inputs make (the caller holds the render lock). Returns whether a new file went
    in, and the renderer that rendered it (not ``renderer`` when the early one was stale: its
    sources are those to report)."""
    current = dhcpinputs.generation(conn)  # one row: replaced on every write to DHCP facts
    if dhcpinputs.installed(cfg, current, segment):  # same inputs, accepted, intact
        return False, renderer
    from pxe import dhcp, dhcpincremental, render

    # The early file goes in only if nothing changed since it was rendered: neither the nodes'
    # facts nor a template or setting (the key save() records must describe the file installed)
    # nor, for a splice, the file it was spliced into.
    usable = (early is not None and early.pending is not None
              and early.snapshot.generation == current
              and early.key == dhcpinputs.key(cfg, current, segment, renderer.read_templates)
              and (early.plan is None or _file_sha(cfg) == early.plan.base_sha))
    if early is not None and not usable:  # its renderer keeps the templates it loaded
        renderer = render.Renderer(cfg)
    with render.naming_template(renderer):
        if usable:
            assert early is not None and early.pending is not None
            snapshot, plan = early.snapshot, early.plan
            pending, early.pending = early.pending, None
            if plan is not None:
                changed = _install_plan(cfg, plan, pending, reload)
                index = plan.index
            else:
                pending.install(reload)  # waits for the daemon's verdict; renames only on a pass
                changed, index = True, _index(early.renderer, early.text)
        else:
            plan = dhcpincremental.plan(cfg, conn, segment, renderer)
            if plan is not None:
                snapshot, index = plan.snapshot, plan.index
                changed = (not dhcp.unchanged(cfg, plan.text)
                           and _install_plan(cfg, plan, None, reload))
            else:
                snapshot = dhcpinputs.read(conn, segment)
                text = renderer.dhcp_config(snapshot)
                changed = dhcp.install(cfg, text, reload=reload)
                index = _index(renderer, text)
    dhcpinputs.save(cfg, snapshot, set(renderer.read_templates), segment, index)
    return changed, renderer


def _install_plan(cfg: Config, plan: dhcpincremental.Plan, pending: PendingCheck | None,
                  reload: bool) -> bool:
    """The daemon's verdict on the header, footer and changed entries, then the spliced file
    written atomically (the caller holds the render lock). Nothing is written on a rejection."""
    from pxe import atomic, dhcp

    if pending is None:
        pending = dhcp.PendingCheck(cfg, plan.check_text, suffix=".check", durable=False)
    try:
        pending.verdict()
    finally:
        pending.discard()
    atomic.write_text(cfg.dhcp.config_file, plan.text)
    if reload:
        dhcp.run_reload(cfg)
    return True


def _index(renderer: Renderer, text: str) -> dict | None:
    """Where each node's entries are in ``text``, just rendered by ``renderer``."""
    from pxe import dhcpincremental

    return dhcpincremental.index_of(renderer, text, renderer.dhcp_rows)


def _file_sha(cfg: Config) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(cfg.dhcp.config_file.read_bytes()).hexdigest()
    except OSError:
        return None
