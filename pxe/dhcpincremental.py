"""A DHCP config change that costs the changed hosts, not the whole file.

Between two renders a site changes a few nodes (a NIC replaced, a node added or removed). The
database records which (table ``dhcp_changes``, pxe.db migration 9); when the installed file is
ours and intact (the record's key apart from the nodes' facts, and its identity or digest, as
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

import os
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

    __slots__ = ("check_text", "text", "snapshot", "index", "base_sha", "changed", "unchanged",
                 "base_id", "base", "templates")

    def __init__(self, check_text: str, text: str, snapshot: Snapshot, index: dict,
                 base_sha: str, changed: list[str], unchanged: bool = False):
        self.check_text = check_text  # header + exactly the changed entries + footer
        self.text = text  # the whole new file
        self.snapshot = snapshot  # generation and change number it was planned at (no rows)
        self.index = index
        self.base_sha = base_sha  # digest of the installed file it was spliced into
        self.changed = changed
        self.unchanged = unchanged  # the new text is the installed one
        self.base_id: list[int] | None = None  # that file's identity when it was read
        self.base = ""  # the record's base_key (what the settings and templates were)
        self.templates: list[str] = []  # the templates the record names


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

    # -- what pxe.dhcpformat derives its formats from, and what _splice uses ------------------
    def render_block(self, hosts: list[DhcpHost], rows: int, macs: int,
                     indexed: bool = False) -> str:
        values = self.context(hosts, rows, macs)
        if indexed:
            from pxe.dhcpformat import Index

            values["host_macs"] = _Sized([(n, Index(i), m, ip) for n, i, m, ip
                                          in values["host_macs"]], macs)
        return self.block(values)

    def render_frame(self, rows: int, macs: int) -> tuple[str, str]:
        return self.frame(self.context([], rows, macs))

    def entries(self, hosts: list[DhcpHost], rows: int, macs: int) -> tuple[str, str, list[str]]:
        """(head, tail, each host's entries) for a file of ``rows`` nodes and ``macs`` MACs."""
        values = self.context(hosts, rows, macs)
        head, tail = self.frame(values)
        together = self.block(values)
        blocks = [self.render_block([h], rows, macs) for h in hosts]
        if together != "".join(blocks):
            raise NotIncremental("the hosts block does not render each node on its own")
        return head, tail, blocks

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


class Formats:
    """The same from pxe.dhcpformat's formats (derived and verified with jinja2 by the full
    render that made the index): no jinja2 at all."""

    def __init__(self, fmt: dict):
        self.fmt = fmt

    def entries(self, hosts: list[DhcpHost], rows: int, macs: int) -> tuple[str, str, list[str]]:
        from pxe import dhcpformat

        head, tail = dhcpformat.frame(self.fmt, rows, macs)
        return head, tail, [dhcpformat.block(self.fmt, h.name, h.macs, h.ip) for h in hosts]


def _lines(text: str) -> int:
    return text.count("\n")


def index_of(renderer: Renderer, text: str, host_rows: list[tuple]) -> dict | None:
    """Where each node's entries are in ``text`` (a full render of ``host_rows``: (name, macs,
    ip) in order), or None when the template does not allow a splice: the header's and footer's
    lengths, and per node its name, MAC count and the length of its lines. Lines per node are
    learned from the block rendered for one sample node with one MAC and with two, and
    verified here, once: they must add up to the block's lines, and each node's lines must
    name it. (The record keeps the index's digest with the file's: it is trusted only with the
    very file it was made from.)"""
    try:
        parts = Parts(renderer)
        rows, macs = len(host_rows), sum(len(m) for _n, m, _i in host_rows)
        head, tail = parts.frame(parts.context([], rows, macs))
        if not (text.startswith(head) and text.endswith(tail)
                and len(head) + len(tail) <= len(text)):
            return None
        sample = DhcpHost("dynprov-sample", ("52:54:00:00:00:01",), "198.18.0.1")
        one = _lines(parts.block(parts.context([sample], rows, macs)))
        sample.macs = ("52:54:00:00:00:01", "52:54:00:00:00:02")
        two = _lines(parts.block(parts.context([sample], rows, macs)))
    except (NotIncremental, DynprovError):
        return None
    per_mac, fixed = two - one, 2 * one - two
    end = len(text) - len(tail)
    at, names, counts, chars = len(head), [], [], []
    find = text.find
    for name, m, _ip in host_rows:
        lines = fixed + per_mac * len(m)
        if lines <= 0:
            return None
        stop = at
        for _ in range(lines):
            stop = find("\n", stop, end) + 1
            if stop == 0:
                return None
        if find(name, at, stop) < 0:
            return None
        names.append(name)
        counts.append(len(m))
        chars.append(stop - at)
        at = stop
    if at != end:
        return None
    index = {"head": len(head), "tail": len(tail), "names": "\n".join(names), "macs": counts,
             "chars": chars}  # names as one string: a tenth of the JSON work of a list
    fmt = _formats(renderer, parts, host_rows, (rows, macs))
    if fmt is not None:
        index["format"] = fmt
    return index


def _formats(renderer: Renderer, parts: Parts, host_rows: list[tuple],
             counts: tuple[int, int]) -> dict | None:
    """pxe.dhcpformat's formats of this template, verified on the file's first and last nodes
    and on two nodes that differ from them in every DHCP fact. Packaged templates only: a site
    override may test a node's name or address, which no sample can rule out (its changes
    render with jinja2)."""
    from pxe import dhcpformat
    from pxe.templatefiles import find_template

    if any(find_template(renderer.cfg, name).override for name in renderer.read_templates):
        return None

    samples = [DhcpHost(name, m, ip) for name, m, ip in host_rows[:1] + host_rows[-1:]]
    samples += [DhcpHost("dynprov-sample-a", ("52:54:00:00:00:0a", "52:54:00:00:00:0b"), None,
                         "aarch64", "uefi", "ipmi", "127.0.0.2", ("gpu", "ib"), "gpu"),
                DhcpHost("dynprov-sample-b", ("52:54:00:00:00:0c", "52:54:00:00:00:0d",
                                              "52:54:00:00:00:0e"), "198.18.0.3", "x86_64",
                         "bios", "redfish", "127.0.0.3", (), "hpc")]
    samples.sort(key=lambda h: h.name)
    return dhcpformat.derive(parts.render_block, parts.render_frame, samples, counts)


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
        raw, identity = _read(cfg.dhcp.config_file)
    except (OSError, KeyError, TypeError, DynprovError):
        return None
    # The very file the record was saved for (its identity, taken after the read), else its
    # digest decides (a copy, a restore...)
    base_sha = record.get("digest")
    if identity != record.get("stat") and dhcpinputs.digest_hex(raw) != base_sha:
        return None
    try:
        installed = raw.decode("utf-8")
        old = _Index(index, len(installed))
    except (UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None
    snapshot = _changes(conn, segment, record, len(old.names))
    if snapshot is None:
        return None
    try:
        made = _splice(renderer, installed, old, snapshot, base_sha)
    except NotIncremental:
        return None
    made.base_id, made.base, made.templates = identity, record["base"], record["templates"]
    if old.format is not None:  # rendered without jinja2: the templates the record names
        from pxe.templatefiles import find_template

        for name in record["templates"]:
            renderer.read_templates.add(name)
            renderer.sources.setdefault(name, find_template(cfg, name))
    return made


def _read(path) -> tuple[bytes, list[int]]:
    """The file's bytes and its identity (pxe.dhcpinputs.file_identity) after they were read:
    a write during the read changes it."""
    with open(path, "rb") as fh:
        raw = fh.read()
        st = os.fstat(fh.fileno())
    return raw, [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class _Index:
    """A saved index (pxe.dhcpinputs.decode_index), checked for shape: sequences of one
    length, lengths that add up to the file."""

    def __init__(self, data: dict, size: int):
        self.head, self.tail = int(data["head"]), int(data["tail"])
        names, self.macs, self.chars = data["names"], data["macs"], data["chars"]
        if not isinstance(names, str):
            raise ValueError("index names are not one string")
        self.names = names.split("\n") if names else []
        self.format = data.get("format")
        if not (len(self.names) == len(self.macs) == len(self.chars)
                and self.head + sum(self.chars) + self.tail == size):
            raise ValueError("index does not fit the file")


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


def _splice(renderer: Renderer, installed: str, old: _Index, changes: _Changes,
            base_sha: str) -> Plan:
    """The installed text with the changed nodes' entries replaced, removed or inserted at
    their sorted places; unchanged stretches are copied as they are."""
    import bisect
    from itertools import accumulate

    new_hosts = [h for h in changes.hosts() if h.macs]  # the changed nodes still in the file
    names, macs, chars = list(old.names), old.macs[:], old.chars[:]  # copies
    starts = list(accumulate(chars, initial=old.head))  # each entry's offset, then the end
    # Every changed name's old entry goes (checked: it must name the node), then the new ones
    # are inserted at their sorted places; positions refer to the old text.
    cuts: list[tuple[int, int, str]] = []  # (from, to, new text) in the old text
    keep = []
    for name in sorted(changes.changed):
        i = bisect.bisect_left(names, name)
        if i < len(names) and names[i] == name:
            begin = starts[i]
            if installed.find(name, begin, begin + chars[i]) < 0:
                raise NotIncremental(f"the installed entries of {name} do not name it")
            cuts.append((begin, begin + chars[i], ""))
            keep.append(i)
    for i in reversed(keep):
        del names[i], macs[i], chars[i]
    rows = len(names) + len(new_hosts)
    total_macs = sum(macs) + sum(len(h.macs) for h in new_hosts)
    if old.format is not None:
        parts: Parts | Formats = Formats(old.format)
    else:
        try:
            parts = Parts(renderer)
        except DynprovError as exc:
            raise NotIncremental(str(exc)) from None
    head, tail, blocks = parts.entries(new_hosts, rows, total_macs)
    for host, block in zip(new_hosts, blocks, strict=True):
        if not block.endswith("\n") or host.name not in block:
            raise NotIncremental(f"the entries of {host.name} do not name it")
    together = "".join(blocks)
    for host, block in zip(new_hosts, blocks, strict=True):
        i = bisect.bisect_left(names, host.name)
        # before the first old entry that sorts after it (a changed one too: cut from there
        # on), else before the footer
        at = starts[bisect.bisect_right(old.names, host.name)]
        cuts.append((at, at, block))
        names.insert(i, host.name)
        macs.insert(i, len(host.macs))
        chars.insert(i, len(block))
    cuts.sort(key=lambda c: (c[0], c[1]))
    pieces, at = [head], old.head
    for begin, stop, text in cuts:
        pieces.append(installed[at:begin])
        pieces.append(text)
        at = max(at, stop)
    pieces.append(installed[at:len(installed) - old.tail])
    pieces.append(tail)
    index = {"head": len(head), "tail": len(tail), "names": "\n".join(names), "macs": macs,
             "chars": chars}
    if old.format is not None:
        index["format"] = old.format
    text = "".join(pieces)
    return Plan(head + together + tail, text,
                Snapshot([], [], changes.generation, changes.seq), index, base_sha,
                sorted(changes.changed), text == installed)
