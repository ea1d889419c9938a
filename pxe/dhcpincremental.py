"""A DHCP config change that costs the changed hosts, not the whole file.

Between two renders a site changes a few nodes (a NIC replaced, a node added or removed). The
database records which (table ``dhcp_changes``, pxe.db migration 9); when the installed file is
ours and intact (the record's key apart from the nodes' facts, and its sha256, as
pxe.dhcpinputs checks them) and at most CUTOFF of its hosts changed, plan() renders only those
nodes' entries, has the daemon check a file of the same header and footer with exactly those
entries, and splices them into the installed text at their sorted places.

The template contract (packaged templates keep it; a site override without it always renders
in full): the host entries are the Jinja block ``hosts``; in it, one group of whole lines per
node with a MAC, in the order of ``host_rows``, each group containing the node's name and
depending on that node alone; outside it the templates may use the host lists' lengths only.
Nothing is assumed: the block must exist, the header and footer must frame the installed text
exactly, each node's lines must be where the index (saved with the record) says and name it,
and the block of all changed nodes must be their single renders joined. Anything else: None,
and the caller renders in full.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pxe import dhcpinputs
from pxe.dhcpinputs import DhcpHost, Snapshot
from pxe.errors import DynprovError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3

    from pxe.config import Config
    from pxe.render import Renderer

BLOCK = "hosts"
SENTINEL = "\0dynprov host entries\0"
MIN_CUTOFF = 8  # small sites: a few nodes still go the short way
MAX_CUTOFF = 500  # one IN (...) list; above it a full render is as quick


def cutoff(hosts: int) -> int:
    """How many changed nodes still take the incremental path: 5% of the hosts (8..500)."""
    return max(MIN_CUTOFF, min(MAX_CUTOFF, hosts // 20))


class NotIncremental(Exception):
    """The template or the installed file does not allow a splice: render in full."""


class Plan:
    """An incremental change, ready to check and install."""

    __slots__ = ("check_text", "text", "snapshot", "index", "base_sha", "changed")

    def __init__(self, check_text: str, text: str, snapshot: Snapshot, index: dict,
                 base_sha: str, changed: list[str]):
        self.check_text = check_text  # header + exactly the changed entries + footer
        self.text = text  # the whole new file
        self.snapshot = snapshot  # generation and change number it was planned at (no rows)
        self.index = index
        self.base_sha = base_sha  # sha256 of the installed file it was spliced into
        self.changed = changed


class _Sized(list):
    """A host list whose length is the whole file's while it holds only some hosts."""

    def __init__(self, items: Iterable, size: int):
        super().__init__(items)
        self._size = size

    def __len__(self) -> int:
        return self._size


class Parts:
    """The DHCP template cut at its ``hosts`` block (a jinja2 Template's blocks)."""

    def __init__(self, renderer: Renderer):
        checked = renderer.template(renderer.dhcp_template_name())
        self.source = checked.source
        self.template = checked.template
        if BLOCK not in self.template.blocks:
            raise NotIncremental(f"{self.source.describe()} has no block '{BLOCK}'")
        self.settings = renderer.dhcp_settings_context()

    def context(self, hosts: list[DhcpHost], rows: int, macs: int) -> dict:
        from pxe.render import dhcp_host_context

        ctx = dhcp_host_context(hosts)
        ctx["host_rows"] = _Sized(ctx["host_rows"], rows)
        ctx["host_macs"] = _Sized(ctx["host_macs"], macs)
        ctx["hosts"] = _Sized(hosts, rows)
        return {**self.settings, **ctx}

    def frame(self, values: dict) -> tuple[str, str]:
        """The text before and after the hosts block."""
        def sentinel(_context: object) -> Iterator[str]:
            yield SENTINEL

        text = self._run(values, sentinel)
        if text.count(SENTINEL) != 1:
            raise NotIncremental("the hosts block is not rendered exactly once")
        head, tail = text.split(SENTINEL)
        return head, tail

    def block(self, values: dict) -> str:
        return self._run(values, None, only_block=True)

    def _run(self, values: dict, replace, only_block: bool = False) -> str:
        import jinja2

        from pxe.render import _template_error

        try:
            context = self.template.new_context(values)
            if only_block:
                return "".join(self.template.blocks[BLOCK](context))
            context.blocks[BLOCK] = [replace]
            return "".join(self.template.root_render_func(context))
        except jinja2.TemplateError as exc:
            raise _template_error(self.source, exc) from None


def _lines(text: str) -> int:
    return text.count("\n")


def index_of(renderer: Renderer, text: str, host_rows: list[tuple]) -> dict | None:
    """Where each node's entries are in ``text`` (a full render of ``host_rows``: (name, macs,
    ip) in order), or None when the template does not allow a splice. Lines per node are
    learned from the block rendered for one sample node with one MAC and with two, and
    verified: they must add up to the block's lines, and each node's lines must name it."""
    try:
        parts = Parts(renderer)
        rows, macs = len(host_rows), sum(len(m) for _n, m, _i in host_rows)
        head, tail = parts.frame(parts.context([], rows, macs))
        if not (text.startswith(head) and text.endswith(tail)
                and len(head) + len(tail) <= len(text)):
            return None
        section = text[len(head):len(text) - len(tail)]
        if section and not section.endswith("\n"):
            return None
        sample = DhcpHost("dynprov-sample", ("52:54:00:00:00:01",), "198.18.0.1")
        one = _lines(parts.block(parts.context([sample], rows, macs)))
        sample.macs = ("52:54:00:00:00:01", "52:54:00:00:00:02")
        two = _lines(parts.block(parts.context([sample], rows, macs)))
    except (NotIncremental, DynprovError):
        return None
    per_mac, fixed = two - one, 2 * one - two
    hosts = [[name, len(m), fixed + per_mac * len(m)] for name, m, _ip in host_rows]
    if any(n <= 0 for _name, _m, n in hosts) or sum(n for *_r, n in hosts) != _lines(section):
        return None
    if _split(section, hosts) is None:
        return None
    return {"head": len(head), "tail": len(tail), "hosts": hosts}


def _split(section: str, hosts: list[list]) -> dict[str, str] | None:
    """Each node's lines of ``section`` by name, as the index says; None when any group does not
    name its node."""
    lines = section.split("\n")
    blocks, at = {}, 0
    for name, _macs, count in hosts:
        block = "\n".join(lines[at:at + count]) + "\n"
        if name not in block or name in blocks:
            return None
        blocks[name] = block
        at += count
    return blocks if at == len(lines) - 1 else None


def plan(cfg: Config, conn: sqlite3.Connection, segment: str | None,
         renderer: Renderer) -> Plan | None:
    """The incremental change of the installed DHCP config, or None when it must be rendered in
    full (no usable record or index, another template or setting, too many changes...)."""
    record = dhcpinputs.stored(cfg)
    if record is None or not isinstance(record.get("seq"), int):
        return None
    index = dhcpinputs.stored_index(cfg, record)
    if index is None:
        return None
    try:
        if record.get("base") != dhcpinputs.base_key(cfg, segment, record["templates"]):
            return None
        raw = cfg.dhcp.config_file.read_bytes()
    except (OSError, KeyError, TypeError, DynprovError):
        return None
    import hashlib

    base_sha = hashlib.sha256(raw).hexdigest()
    if base_sha != record.get("sha256"):
        return None
    try:
        installed = raw.decode("utf-8")
        old_hosts = index["hosts"]
        head_len, tail_len = int(index["head"]), int(index["tail"])
    except (UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None
    snapshot = _changes(conn, segment, record, len(old_hosts))
    if snapshot is None:
        return None
    try:
        return _splice(renderer, installed, head_len, tail_len, old_hosts, snapshot, base_sha)
    except NotIncremental:
        return None


class _Changes(Snapshot):
    __slots__ = ("changed",)


def _changes(conn: sqlite3.Connection, segment: str | None, record: dict,
             hosts: int) -> _Changes | None:
    """The changed nodes' facts, read with the generation and change number in one transaction."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        seq = dhcpinputs.change_number(conn)
        names = dhcpinputs.changed_since(conn, record["seq"], cutoff(hosts))
        if names is None or seq < record["seq"]:  # too many, everything, or another database
            return None
        if not names and dhcpinputs.generation(conn) != record.get("generation"):
            return None  # facts changed, no name recorded (a restored backup...): in full
        read = dhcpinputs.read(conn, segment, names)
    finally:
        if own:
            conn.execute("COMMIT")
    snapshot = _Changes(read.rows, read.macs, read.generation, read.seq)
    snapshot.changed = set(names)
    return snapshot


def _splice(renderer: Renderer, installed: str, head_len: int, tail_len: int,
            old_hosts: list, changes: _Changes, base_sha: str) -> Plan:
    if head_len + tail_len > len(installed):
        raise NotIncremental("index does not fit the file")
    section = installed[head_len:len(installed) - tail_len]
    old_blocks = _split(section, old_hosts)
    if old_blocks is None:
        raise NotIncremental("the installed entries are not where the index says")
    new_hosts = [h for h in changes.hosts() if h.macs]  # the changed nodes still in the file
    kept = [h for h in old_hosts if h[0] not in changes.changed]
    merged = sorted(kept + [[h.name, len(h.macs), 0] for h in new_hosts], key=_name)
    rows, macs = len(merged), sum(h[1] for h in merged)
    try:
        parts = Parts(renderer)
    except DynprovError as exc:
        raise NotIncremental(str(exc)) from None
    changed_ctx = parts.context(new_hosts, rows, macs)
    head, tail = parts.frame(changed_ctx)
    together = parts.block(changed_ctx)
    new_blocks = {}
    for host in new_hosts:
        block = parts.block(parts.context([host], rows, macs))
        if host.name not in block or (block and not block.endswith("\n")) or not block:
            raise NotIncremental(f"the entries of {host.name} do not name it")
        new_blocks[host.name] = block
    if together != "".join(new_blocks[h.name] for h in new_hosts):
        raise NotIncremental("the hosts block does not render each node on its own")
    pieces, index_hosts = [head], []
    for name, count, _lines_old in merged:
        block = new_blocks.get(name) or old_blocks[name]
        pieces.append(block)
        index_hosts.append([name, count, _lines(block)])
    pieces.append(tail)
    index = {"head": len(head), "tail": len(tail), "hosts": index_hosts}
    return Plan(head + together + tail, "".join(pieces),
                Snapshot([], [], changes.generation, changes.seq), index, base_sha,
                sorted(changes.changed))


def _name(host: list) -> str:
    return host[0]
