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
from collections.abc import Iterable, Iterator, Sequence

from pxe import atomic, db
from pxe.config import Config
from pxe.errors import InputError, NotFound
from pxe.images import Catalog
from pxe.inventory import Inventory
from pxe.records import Factory, Record

TYPE_CHECKING = False  # not typing's (~2 ms on every start)
if TYPE_CHECKING:  # rendering (jinja2, netaddr) is imported only when something is rendered
    from pxe import dhcpstep, render
    from pxe.images import Image


class RenderReport(Record, frozen=False):
    dhcp_changed: bool
    boot_files: int
    boot_changed: int
    pruned: list[str]
    loaders: dict[str, str]
    sources: dict[str, render.TemplateSource] = Factory(dict)  # template -> file


class BootSet:
    """What set-boot recorded for one node. (A plain class: 10,000 frozen dataclasses cost a
    set-boot ~20 ms to create; the token is kept out of repr, as out of logs.)"""

    __slots__ = ("name", "boot_target", "desired_os", "boot_token")

    def __init__(self, name: str, boot_target: str, desired_os: str | None,
                 boot_token: str | None = None):
        self.name, self.boot_target = name, boot_target
        self.desired_os, self.boot_token = desired_os, boot_token

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BootSet) and all(
            getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return (f"BootSet(name={self.name!r}, boot_target={self.boot_target!r}, "
                f"desired_os={self.desired_os!r})")


def set_boot(cfg: Config, spec: str | Iterable[str], label: str | None,
             inventory: Inventory | None = None, *, keep_tokens: bool = False) -> BootSets:
    """Point the nodes' next network boot at image ``label`` (or at their local disk if None).

    A new one-time call-home token is issued for every node sent to an image. ``keep_tokens``
    (local disk only) keeps each node's current token: a stateful node that reported "installed"
    still reports "ready" from its disk with it. 10,000 nodes cost one UPDATE (which also
    records each node's ``boot_set`` time, what the run driver's recovery reads) and one event
    for the command. The UPDATE is its own check: it changes only nodes that exist (and have the
    image's arch); when it changed fewer than named, it is rolled back and the error names them.
    """
    from pxe.nodeset import expand

    inv = inventory or Inventory(cfg)
    names = expand(spec)
    image: Image | None = None
    if label is not None:
        try:
            image = Catalog(cfg, inv.conn).get(label)
        except NotFound:
            _check_known(inv.conn, names)  # unknown nodes are named first, the label then
            raise
    token_text = _token_text(len(names)) if image else ""
    with atomic.locked(cfg.lock_path):
        try:
            with db.transaction(inv.conn):  # one transaction; readers see all nodes move at once
                changed = _record(inv.conn, names, label, image.arch if image else None,
                                  token_text, keep_tokens)
                if changed != len(names):
                    raise _Refused  # rolled back: nothing changed
                db.log_event(inv.conn, "set-boot", None,
                             _detail(spec, names, label, keep_tokens))
        except _Refused:
            _check_known(inv.conn, names)  # every node exists after this: an arch differs
            rows = _boot_rows(inv.conn, names)
            arch = image.arch if image else "?"
            wrong = [n for n in names if rows[n][0] != arch]
            raise InputError(f"image {label} is for {arch}; not for node(s) "
                             f"{', '.join(wrong)}") from None
        if cfg.boot.write_files:  # sites serving with tftpd-hpa/nginx read files
            from pxe import stage
            from pxe.render import Renderer

            renderer = Renderer(cfg)
            files: dict[str, str] = {}
            for node in inv.select(names):
                files.update(renderer.node_boot_files(node, image))
            stage.write_files(cfg, files)
    return BootSets(names, label, token_text, keep_tokens, None if image else inv.conn)


class BootSets(Sequence[BootSet]):
    """What set-boot recorded, node by node, made when first used: a command that only counts
    them (the CLI) skips 10,000 BootSet objects and, for the local disk, the read of each node's
    image and token (read then, from ``conn``: keep it open until used)."""

    def __init__(self, names: list[str], label: str | None, token_text: str,
                 keep_tokens: bool, conn: sqlite3.Connection | None):
        self.names, self._label, self._token_text = names, label, token_text
        self._keep_tokens, self._conn = keep_tokens, conn
        self._items: list[BootSet] | None = None

    def _made(self) -> list[BootSet]:
        if self._items is None:
            names, label, text = self.names, self._label, self._token_text
            if label is not None:
                self._items = [BootSet(n, "os", label, text[i:i + TOKEN_CHARS]) for i, n in
                               zip(range(0, TOKEN_CHARS * len(names), TOKEN_CHARS), names,
                                   strict=True)]
            else:
                rows = _desired_and_tokens(self._conn, names)
                self._items = [BootSet(n, "local", desired, token if self._keep_tokens else None)
                               for n, (desired, token) in zip(names, rows, strict=True)]
            self._conn = None  # not needed any more
        return self._items

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):  # type: ignore[no-untyped-def,override]
        return self._made()[index]

    def __iter__(self) -> Iterator[BootSet]:
        return iter(self._made())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BootSets({len(self)} node(s), {self._label or 'local'})"


class _Refused(Exception):
    """The UPDATE changed fewer nodes than named: roll back, then say which and why."""


def _check_known(conn: sqlite3.Connection, names: list[str]) -> None:
    """NotFound naming the nodes of ``names`` that are not in the inventory, if any."""
    from pxe.nodeset import fold

    rows = _boot_rows(conn, names)
    if len(rows) != len(names):
        raise NotFound(f"unknown node(s): {fold(n for n in names if n not in rows)}")


DETAIL_NODES_CHARS = 200  # the node set in a set-boot event: as given, or folded, cut to this


def _detail(spec: str | Iterable[str], names: list[str], label: str | None,
            keep_tokens: bool) -> str:
    """The command's one event: target, node set (as given; a list folded), count. Never the
    names one by one: 10,000 of them would cost more than the change."""
    given = spec.strip() if isinstance(spec, str) else ""
    if not given or len(given) > DETAIL_NODES_CHARS:
        from pxe.nodeset import fold

        given = names[0] if len(names) == 1 else fold(names)
    if len(given) > DETAIL_NODES_CHARS:
        given = given[:DETAIL_NODES_CHARS] + "..."
    kept = ", tokens kept" if keep_tokens and label is None else ""
    return f"{label or 'local'}: {given} ({len(names)} node(s){kept})"


TOKEN_CHARS = 32  # secrets.token_urlsafe(24): 24 random bytes = 32 URL-safe characters, no "="


def _token_text(count: int) -> str:
    """``count`` one-time tokens end to end (node i's is characters 32*i..32*i+31), each as
    secrets.token_urlsafe(24) makes one: 24 bytes of os.urandom, the system's CSPRNG. One read
    instead of ``count`` (and without importing secrets: hmac and OpenSSL's hashes)."""
    import binascii  # base64.urlsafe_b64encode without importing base64 (and struct): ~1 ms

    return binascii.b2a_base64(os.urandom(24 * count), newline=False).translate(
        _URLSAFE).decode("ascii")


_URLSAFE = bytes.maketrans(b"+/", b"-_")  # what base64.urlsafe_b64encode translates


def _tokens(count: int) -> list[str]:
    """``count`` one-time tokens as a list."""
    text = _token_text(count)
    return [text[i:i + TOKEN_CHARS] for i in range(0, TOKEN_CHARS * count, TOKEN_CHARS)]


def _record(conn: sqlite3.Connection, names: list[str], label: str | None, arch: str | None,
            token_text: str, keep_tokens: bool) -> int:
    """Set the nodes' next boot: image ``label`` (only on nodes of ``arch``) with node i's token
    at ``token_text[32*i:]``, or (label None) the local disk, the token dropped or
    (``keep_tokens``) kept; ``boot_set`` is now. Returns how many nodes changed: fewer than
    ``names`` when some do not exist or have another arch (the caller rolls back).

    SQLite: one statement over the names as a JSON array (json_each), the tokens as one blob
    cut by byte offset (substr of a text would count characters from its start for every row),
    ~2x cheaper than 10,000 bound rows. PostgreSQL: one statement over the names and tokens as
    arrays. An SQLite older than 3.38: the same rows, one executemany."""
    import time

    now = time.time()
    if _json_sql(conn):
        if label is not None:
            return conn.execute(
                "UPDATE nodes SET boot_target = 'os', desired_os = ?, "
                f"boot_token = CAST(substr(?, j.key * {TOKEN_CHARS} + 1, {TOKEN_CHARS}) AS TEXT), "
                "updated = ?, boot_set = ? FROM json_each(?) AS j "
                "WHERE nodes.name = j.value AND nodes.arch = ?",
                (label, token_text.encode("ascii"), now, now, _json_names(names), arch)).rowcount
        token = "boot_token" if keep_tokens else "NULL"
        return conn.execute(f"UPDATE nodes SET boot_target = 'local', boot_token = {token}, "
                            "updated = ?, boot_set = ? WHERE name IN (SELECT value FROM json_each(?))",
                            (now, now, _json_names(names))).rowcount
    if db.is_postgresql(conn):  # the names (and tokens) as arrays: one statement too
        token = "boot_token" if keep_tokens else "NULL"
        if label is not None:
            return conn.execute(
                "UPDATE nodes SET boot_target = 'os', desired_os = ?, boot_token = t.token, "
                "updated = ?, boot_set = ? FROM unnest(?::text[], ?::text[]) AS t(name, token) "
                "WHERE nodes.name = t.name AND nodes.arch = ?",
                (label, now, now, names, [token_text[i:i + TOKEN_CHARS] for i in
                                          range(0, TOKEN_CHARS * len(names), TOKEN_CHARS)],
                 arch)).rowcount
        return conn.execute(f"UPDATE nodes SET boot_target = 'local', boot_token = {token}, "
                            "updated = ?, boot_set = ? WHERE name = ANY(?::text[])",
                            (now, now, names)).rowcount
    if label is not None:
        return conn.executemany(
            "UPDATE nodes SET boot_target = 'os', desired_os = ?, boot_token = ?, updated = ?, "
            "boot_set = ? WHERE name = ? AND arch = ?",
            [(label, token_text[i * TOKEN_CHARS:(i + 1) * TOKEN_CHARS], now, now, n, arch)
             for i, n in enumerate(names)]).rowcount
    token = "boot_token" if keep_tokens else "NULL"
    return conn.executemany(f"UPDATE nodes SET boot_target = 'local', boot_token = {token}, "
                            "updated = ?, boot_set = ? WHERE name = ?",
                            [(now, now, n) for n in names]).rowcount


def _json_names(names: list[str]) -> str:
    """``json.dumps(names)``, ~8x faster for 10,000 node names: names of ASCII letters, digits
    and '-' (what pxe.nodeset lets through) need no escaping; anything else goes through json."""
    plain = "".join(names)
    if plain.isascii() and (not plain or plain.replace("-", "").isalnum()):
        return '["' + '", "'.join(names) + '"]' if names else "[]"
    import json

    return json.dumps(names)


def _json_sql(conn: sqlite3.Connection) -> bool:
    """Whether the set-based statements apply: SQLite with JSON built in and UPDATE ... FROM
    (3.38; older, and other backends, take the same rows one by one)."""
    return not db.is_postgresql(conn) and sqlite3.sqlite_version_info >= (3, 38)


def _desired_and_tokens(conn: sqlite3.Connection, names: list[str]) -> list[tuple]:
    """(desired_os, boot_token) of each named node, in the order of ``names`` (all exist)."""
    if _json_sql(conn):
        cursor = conn.cursor()
        cursor.row_factory = None  # plain tuples: no Row object for each of 10,000 rows
        return cursor.execute(
            "SELECT n.desired_os, n.boot_token FROM json_each(?) AS j JOIN nodes AS n "
            "ON n.name = j.value ORDER BY j.key", (_json_names(names),)).fetchall()
    rows = _boot_rows(conn, names)
    return [(rows[n][2], rows[n][1]) for n in names]


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
               segment: str | None = None, early: dhcpstep.Early | None = None) -> RenderReport:
    """Render and install everything: DHCP config (checked by the daemon), boot loaders, and the
    boot-config file tree when files are served by others (``[boot] write_files``); with
    ``servers``, also that tree and the dnsmasq/tftpd-hpa/nginx configs of
    pxe.serve.standard_configs. ``segment`` (default: ``[segment] name``, else the primary's):
    only that segment's nodes (pxe.segments) - each boot server renders its own.

    The DHCP config is rendered and checked only when what it is made of changed since it was
    installed (pxe.dhcpinputs: the database's DHCP-facts generation, no node read): a set-boot
    changes nothing in it. ``early``: that config rendered and its check started before
    set-boot's transaction (pxe.dhcpstep.early_start).
    """
    # pxe.dhcp (and jinja2) only when something is checked or installed
    from pxe import dhcpinputs, dhcpstep, render, segments, stage

    inv = inventory or Inventory(cfg)
    mine = segments.load(cfg, segment).name  # a server renders its own segment's nodes only

    def nodes() -> list:
        return [n for n in inv.all() if n.segment == mine]

    renderer = early.renderer if early is not None else render.Renderer(cfg)

    def images() -> dict[str, Image]:
        return {i.label: i for i in Catalog(cfg, inv.conn).all()}

    if check_only:  # every output rendered in memory (a broken template fails here), none written
        from pxe import dhcp

        text = renderer.dhcp_config(dhcpinputs.read(inv.conn, mine))
        with render.naming_template(renderer):
            dhcp.check(cfg, text)
        files = renderer.all_boot_files(nodes(), images())
        if servers:
            from pxe.serve import standard_configs

            standard_configs.render(cfg, renderer)
        return RenderReport(False, len(files), 0, [], {}, renderer.sources)
    with atomic.locked(cfg.lock_path):
        # The renderer that rendered the DHCP config (a fresh one when the early one was
        # stale) renders the rest and names its sources in the report.
        dhcp_changed, renderer = dhcpstep.install(cfg, inv.conn, mine, renderer, reload, early)
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
