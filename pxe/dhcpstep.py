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
    import _thread
    import sqlite3
    from collections.abc import Iterator

    from pxe import dhcpincremental
    from pxe.config import Config
    from pxe.dhcp import PendingCheck
    from pxe.render import Renderer


class Early:
    """A DHCP config rendered before set-boot's transaction, the daemon's check running on it
    (``plan``: an incremental change; ``text``: the whole file rendered)."""

    __slots__ = ("renderer", "snapshot", "pending", "key", "plan", "text", "staged")

    def __init__(self, renderer: Renderer, snapshot: dhcpinputs.Snapshot,
                 pending: PendingCheck | None, key: str = "",
                 plan: dhcpincremental.Plan | None = None, text: str = "",
                 staged: Staged | None = None):
        self.renderer, self.snapshot, self.pending = renderer, snapshot, pending
        self.key = key  # dhcpinputs.key of everything it was rendered from, at render time
        self.plan, self.text = plan, text
        self.staged = staged  # the plan's whole file, written beside the installed one

    def discard(self) -> None:
        if self.pending is not None:
            self.pending.discard()
        if self.staged is not None:
            self.staged.discard()


class Staged:
    """A spliced DHCP config written to a temp file beside the installed one, its fsync and
    digest done by a thread (both release the GIL) while the daemon checks the changed entries
    and set-boot's transaction runs; renamed into place by install() only once they are done
    and the daemon passed the entries (the caller holds the render lock); ``sha``: the bytes'
    digest, for the record. The thread is `_thread`'s: the `threading` module costs ~1.5 ms to
    import on every such command, and one thread joined by one lock needs none of it."""

    def __init__(self, cfg: Config, text: str):
        import _thread
        import os

        from pxe.atomic import temp_beside

        data = text.encode()
        self.target = cfg.dhcp.config_file
        self.sha = ""
        self.error: BaseException | None = None
        fd, path = temp_beside(self.target, ".new")
        self.path: str | None = path
        self._done: _thread.LockType | None = None  # held while the thread runs
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            done = _thread.allocate_lock()
            done.acquire()
            _thread.start_new_thread(self._sync, (fd, data, done))
        except BaseException:
            os.close(fd)
            self.discard()
            raise
        self._done = done

    def _sync(self, fd: int, data: bytes, done: _thread.LockType) -> None:
        import os

        try:
            os.fsync(fd)
            self.sha = dhcpinputs.digest_hex(data)
        except BaseException as exc:  # noqa: BLE001 - raised again by install()
            self.error = exc
        finally:
            os.close(fd)
            done.release()

    def running(self) -> bool:
        """Whether the fsync thread has not finished yet."""
        return self._done is not None and self._done.locked()

    def _join(self) -> None:
        if self._done is not None:
            with self._done:  # released by the thread when it ends
                pass

    def install(self) -> None:
        import os

        self._join()
        if self.error is not None:
            raise self.error
        path, self.path = self.path, None
        if path is None:
            raise RuntimeError("staged DHCP config already used")
        os.replace(path, self.target)

    def discard(self) -> None:
        import os

        self._join()
        path, self.path = self.path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


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
        if plan.unchanged:
            return None
        # the record's base, when the templates it names are those rendered from
        same = sorted(set(renderer.read_templates)) == plan.templates
        key = dhcpinputs.key(cfg, plan.snapshot.generation, segment, renderer.read_templates,
                             plan.base if same else None)
        # the daemon reads header, footer and the changed entries only, while the whole
        # spliced file is written and fsynced
        early = Early(renderer, plan.snapshot, None, key, plan=plan)
        try:
            early.pending = dhcp.PendingCheck(cfg, plan.check_text, suffix=".check",
                                              durable=False)
            early.staged = Staged(cfg, plan.text)
        except BaseException:
            early.discard()
            raise
        return early
    snapshot = dhcpinputs.read(conn, segment)
    text = renderer.dhcp_config(snapshot)
    if dhcp.unchanged(cfg, text):
        return None
    key = dhcpinputs.key(cfg, snapshot.generation, segment, renderer.read_templates)
    return Early(renderer, snapshot, dhcp.PendingCheck(cfg, text), key, text=text)


def install(cfg: Config, conn: sqlite3.Connection, segment: str, renderer: Renderer | None,
            reload: bool = True, early: Early | None = None) -> tuple[bool, Renderer | None]:
    """Render, check and install ``segment``'s DHCP config unless the installed one is still
    what its inputs make (the caller holds the render lock). Returns whether a new file went
    in, and the renderer that rendered it (not ``renderer`` when the early one was stale: its
    sources are those to report; None: nothing was rendered and none was given)."""
    current = dhcpinputs.generation(conn)  # one row: replaced on every write to DHCP facts
    if dhcpinputs.installed(cfg, current, segment):  # same inputs, accepted, intact
        return False, renderer
    from pxe import dhcp, dhcpincremental, render

    if renderer is None:
        renderer = render.Renderer(cfg)
    # The early file goes in only if nothing changed since it was rendered: neither the nodes'
    # facts nor a template or setting (the key save() records must describe the file installed)
    # nor, for a splice, the file it was spliced into.
    base = None
    if early is not None and early.pending is not None and early.snapshot.generation == current:
        base = dhcpinputs.base_key(cfg, segment, renderer.read_templates)
    usable = (early is not None and base is not None
              and early.key == dhcpinputs.key(cfg, current, segment, (), base)
              and (early.plan is None or _same_file(cfg, early.plan)))
    if early is not None and not usable:  # its renderer keeps the templates it loaded
        renderer, base = render.Renderer(cfg), None
    sha = None
    with render.naming_template(renderer):
        if usable:
            assert early is not None and early.pending is not None
            snapshot, plan = early.snapshot, early.plan
            pending, early.pending = early.pending, None
            if plan is not None:
                sha = _install_plan(cfg, plan, pending, early.staged, reload)
                early.staged, changed, index = None, True, plan.index
            else:
                pending.install(reload)  # waits for the daemon's verdict; renames only on a pass
                changed, index = True, _index(early.renderer, early.text)
        else:
            plan = dhcpincremental.plan(cfg, conn, segment, renderer)
            if plan is not None:
                snapshot, index, changed = plan.snapshot, plan.index, not plan.unchanged
                if changed:
                    sha = _install_plan(cfg, plan, None, None, reload)
            else:
                snapshot = dhcpinputs.read(conn, segment)
                text = renderer.dhcp_config(snapshot)
                changed = dhcp.install(cfg, text, reload=reload)
                index = _index(renderer, text)
    dhcpinputs.save(cfg, snapshot, set(renderer.read_templates), segment, index, sha, base)
    return changed, renderer


def _install_plan(cfg: Config, plan: dhcpincremental.Plan, pending: PendingCheck | None,
                  staged: Staged | None, reload: bool) -> str:
    """The daemon's verdict on the header, footer and changed entries, then the spliced file
    (written and fsynced while the daemon read) renamed into place (the caller holds the
    render lock). Nothing is installed on a rejection. Returns the installed bytes' digest."""
    from pxe import dhcp

    try:
        if pending is None:
            pending = dhcp.PendingCheck(cfg, plan.check_text, suffix=".check", durable=False)
        if staged is None:
            staged = Staged(cfg, plan.text)
        pending.verdict()
        staged.install()
    finally:
        if pending is not None:
            pending.discard()
        if staged is not None:
            staged.discard()
    if reload:
        dhcp.run_reload(cfg)
    return staged.sha


def _index(renderer: Renderer, text: str) -> dict | None:
    """Where each node's entries are in ``text``, just rendered by ``renderer``."""
    from pxe import dhcpincremental

    return dhcpincremental.index_of(renderer, text, renderer.dhcp_rows)


def _same_file(cfg: Config, plan: dhcpincremental.Plan) -> bool:
    """Whether the installed file is still the one ``plan`` was spliced into: its identity
    unchanged since it was read, else its digest."""
    path = cfg.dhcp.config_file
    if plan.base_id is not None and dhcpinputs.file_identity(path) == plan.base_id:
        return True
    try:
        return dhcpinputs.digest_hex(path.read_bytes()) == plan.base_sha
    except OSError:
        return False
