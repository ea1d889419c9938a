"""What the DHCP config is made of, and whether the installed one is still exactly that.

The DHCP config is a function of: each node's DHCP facts (DhcpHost: name, MACs, IP, arch,
firmware, BMC type and address, groups, pool; never what set-boot or a boot changes: boot target,
image, token, state), the segment rendered, the site's [network], [boot] and [dhcp] sections, the
template files it was rendered from, the code that renders it and the daemon binary that checked
it. The database keeps a DHCP-facts generation (table ``dhcp_generation``, pxe.db migration 8):
a random value its triggers replace on every write to those facts (nodes added, removed or their
facts changed, MACs, segments; by any writer, raw SQL included), never on a set-boot, a report
or a state change. After installing (or confirming) the file, `render` stores a key of all of
these, the generation it rendered from included, with the file's sha256 in
``<state_dir>/dhcp-installed.json`` (under the render lock). When the key and the file on disk
still match, the file is byte for byte what a render would write and the daemon accepted it:
`render` then neither reads the nodes nor renders nor checks it again. When only some nodes'
facts changed (table ``dhcp_changes``, migration 9: each written node name with a growing change
number), pxe.dhcpincremental re-renders just those nodes' entries into the installed file; the
record keeps the change number it was rendered at and, in ``dhcp-installed.index.json``, where
each node's entry lines are. Anything else (an override template edited, the file edited by
hand, another dhcpd binary, a database restored from a backup) renders, checks and installs in
full.
Standard library only: `set-boot --render` pays for jinja2 only when the file changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

TYPE_CHECKING = False  # not typing's (~2 ms on every `render`)
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable

    from pxe.config import Config

STAMP_NAME = "dhcp-installed.json"
INDEX_NAME = "dhcp-installed.index.json"
FORMAT = 3  # bump when what the key covers changes (3: generation apart from the rest)
HOST_COLUMNS = ("name", "ip", "arch", "firmware", "bmc_type", "bmc_address", "groups", "pool")
# The code a DHCP config depends on besides the templates (a dynprov upgrade renders again).
_CODE = ("render.py", "templatefiles.py", "dhcpinputs.py", "config.py", "dhcpincremental.py",
         "dhcpformat.py")


class DhcpHost:
    """One node as the DHCP templates see it: the facts a DHCP config may depend on.
    (A plain class: a dataclass costs every `set-boot` a few ms to create.)"""

    __slots__ = ("name", "macs", "ip", "arch", "firmware", "bmc_type", "bmc_address", "groups",
                 "pool")

    def __init__(self, name: str, macs: tuple[str, ...], ip: str | None = None,
                 arch: str = "x86_64", firmware: str = "bios", bmc_type: str = "none",
                 bmc_address: str | None = None, groups: tuple[str, ...] = (),
                 pool: str = "hpc"):
        self.name, self.macs, self.ip, self.arch, self.firmware = name, macs, ip, arch, firmware
        self.bmc_type, self.bmc_address, self.groups, self.pool = bmc_type, bmc_address, groups, pool

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DhcpHost) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return f"DhcpHost{self._values()!r}"

    @classmethod
    def of(cls, node: object) -> DhcpHost:
        """The DHCP view of an inventory Node (or of a DhcpHost: itself)."""
        if isinstance(node, DhcpHost):
            return node
        return cls(*(getattr(node, f) for f in cls.__slots__))


class Snapshot:
    """Every node's DHCP facts as read, and the generation they are (read in one transaction)."""

    __slots__ = ("rows", "macs", "generation", "seq")

    def __init__(self, rows: list[tuple], macs: list[tuple], generation: str, seq: int = 0):
        self.rows = rows  # HOST_COLUMNS of every node, by name
        self.macs = macs  # (node, idx, mac) in order
        self.generation = generation  # dhcp_generation when they were read
        self.seq = seq  # the last dhcp_changes number when they were read

    def hosts(self) -> list[DhcpHost]:
        """The rows as DhcpHosts (only a render needs them)."""
        by_node: dict[str, list[str]] = {}
        for node, _idx, mac in self.macs:
            by_node.setdefault(node, []).append(mac)
        return [DhcpHost(name, tuple(by_node.get(name, ())), ip, arch, firmware, bmc_type,
                         bmc_address, tuple(g for g in (groups or "").split(",") if g), pool)
                for name, ip, arch, firmware, bmc_type, bmc_address, groups, pool in self.rows]


def generation(conn: sqlite3.Connection) -> str:
    """The database's DHCP-facts generation: one row, replaced by triggers on every facts write."""
    row = conn.execute("SELECT value FROM dhcp_generation WHERE id = 1").fetchone()
    return str(row[0]) if row else ""


def change_number(conn: sqlite3.Connection) -> int:
    """The last DHCP-facts change number (dhcp_changes, migration 9): only ever grows."""
    row = conn.execute("SELECT MAX(seq) FROM dhcp_changes").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def changed_since(conn: sqlite3.Connection, seq: int, limit: int) -> list[str] | None:
    """The node names whose DHCP facts were written after change number ``seq``, by name; None
    when more than ``limit`` did, or '' (a TRUNCATE: every node) is among them."""
    names = [r[0] for r in conn.execute("SELECT node FROM dhcp_changes WHERE seq > ? "
                                        "ORDER BY seq LIMIT ?", (seq, limit + 1)).fetchall()]
    if len(names) > limit or "" in names:
        return None
    return sorted(names)


def read(conn: sqlite3.Connection, segment: str | None = None,
         names: list[str] | None = None) -> Snapshot:
    """Every node's DHCP facts (with ``names``: only those nodes'), in name order, and their
    generation and change number, from one consistent read; with ``segment``, only the nodes of
    that segment (pxe.segments: '' is the primary's, the nodes without a row)."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        snapshot = _read(conn, segment, names)
    finally:
        if own:
            conn.execute("COMMIT")
    return snapshot


def _read(conn: sqlite3.Connection, segment: str | None, names: list[str] | None) -> Snapshot:
    current, seq = generation(conn), change_number(conn)
    where, args = [], []
    if segment is not None:
        where.append("COALESCE((SELECT s.segment FROM node_segments s WHERE s.node = {}), '') = ?")
        args.append(segment)
    if names is not None:
        if not names:
            return Snapshot([], [], current, seq)
        where.append(f"{{}} IN ({', '.join('?' * len(names))})")
        args.extend(names)
    rows_where = " AND ".join(w.format("n.name") for w in where)
    macs_where = " AND ".join(w.format("m.node") for w in where)
    rows = _tuples(conn, f"SELECT {', '.join(HOST_COLUMNS)} FROM nodes n"
                         f"{' WHERE ' + rows_where if where else ''} ORDER BY name", tuple(args))
    rows.sort(key=_first)  # the database's collation may differ from code-point order: ours
    macs = sorted(_tuples(conn, "SELECT m.node, m.idx, m.mac FROM macs m"  # cheaper than ORDER BY
                                f"{' WHERE ' + macs_where if where else ''}", tuple(args)))
    return Snapshot(rows, macs, current, seq)


def _first(row: tuple) -> str:
    return row[0]


def _tuples(conn: sqlite3.Connection, sql: str, args: tuple = ()) -> list[tuple]:
    """The rows as plain tuples (sqlite3: no Row object for each of 10,000s of rows)."""
    if not hasattr(conn, "cursor"):  # pxe.dbbackend_pg's connection: no cursors of its own
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    cursor = conn.cursor()
    try:
        cursor.row_factory = None
    except (AttributeError, TypeError):  # a connection whose rows are its own kind
        pass
    rows = cursor.execute(sql, args).fetchall()
    return rows if not rows or type(rows[0]) is tuple else [tuple(r) for r in rows]


def stamp_path(cfg: Config) -> Path:
    return cfg.paths.state_dir / STAMP_NAME


def index_path(cfg: Config) -> Path:
    return cfg.paths.state_dir / INDEX_NAME


def key(cfg: Config, generation: str, segment: str | None, templates: Iterable[str],
        base: str | None = None) -> str:
    """The key of everything the DHCP config is rendered and checked from (``base``: its
    base_key, when the caller has it)."""
    base = base or base_key(cfg, segment, templates)
    return hashlib.sha256(f"{base}\0generation={generation}".encode()).hexdigest()


def base_key(cfg: Config, segment: str | None, templates: Iterable[str]) -> str:
    """The key of everything but the nodes' facts: settings, segment, templates, code, checker.
    The same base is what lets pxe.dhcpincremental re-render only the changed nodes."""
    from pxe.templatefiles import find_template  # not pxe.render: no renderer is needed here

    h = hashlib.sha256()
    for part in (f"format={FORMAT}", repr(cfg.network), repr(cfg.boot), repr(cfg.dhcp),
                 f"segment={segment!r}", _checker(cfg)):
        h.update(part.encode() + b"\0")
    for name in sorted(templates):
        source = find_template(cfg, name)
        h.update(f"template {name} {source.path}\0".encode())
        h.update(hashlib.sha256(source.path.read_bytes()).digest())
    here = Path(__file__).parent
    for name in _CODE:
        h.update(_identity(here / name).encode() + b"\0")
    return h.hexdigest()


def _checker(cfg: Config) -> str:
    """Which program checked the file: another binary (an upgrade) checks again."""
    from pxe.programs import find_binary  # not pxe.dhcp: nothing is checked here

    if cfg.dhcp.check_command:
        program = cfg.dhcp.check_command[0]
    else:
        program = find_binary("dhcpd" if cfg.dhcp.backend == "isc" else "dnsmasq") or "-"
    return f"checker={program} {_identity(Path(program))}"


def _identity(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_dev}.{st.st_ino}.{st.st_size}.{st.st_mtime_ns}"


def _file_sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def installed(cfg: Config, generation: str, segment: str | None = None) -> bool:
    """True when the installed config is what a render of ``segment``'s nodes at DHCP-facts
    ``generation`` (see generation()) would install and check. Reads no node."""
    if not generation:
        return False
    try:
        stored = json.loads(stamp_path(cfg).read_text(encoding="utf-8"))
        if stored.get("file") != str(cfg.dhcp.config_file):
            return False
        wanted = key(cfg, generation, segment, stored["templates"])
    except Exception:  # noqa: BLE001 - unreadable record, or a template gone: render (and say why)
        return False
    return (stored.get("key") == wanted
            and stored.get("sha256") == _file_sha(cfg.dhcp.config_file))


def save(cfg: Config, snapshot: Snapshot, templates: Iterable[str],
         segment: str | None = None, index: dict | None = None) -> None:
    """Record that the installed file was rendered from ``snapshot`` (of ``segment``) and
    ``templates`` and accepted (the caller holds the render lock and has just installed or
    confirmed it); ``index`` (pxe.dhcpincremental): where each node's entries are in it, or
    None (the next change renders in full)."""
    names = sorted(set(templates))
    base = base_key(cfg, segment, names)
    data = {"format": FORMAT, "file": str(cfg.dhcp.config_file), "templates": names,
            "generation": snapshot.generation, "seq": snapshot.seq, "base": base,
            "key": key(cfg, snapshot.generation, segment, names, base),
            "sha256": _file_sha(cfg.dhcp.config_file), "index": None}
    if index is not None:
        text = json.dumps(index, separators=(",", ":"))
        _replace(index_path(cfg), text)
        data["index"] = hashlib.sha256(text.encode()).hexdigest()
    _replace(stamp_path(cfg), json.dumps(data, indent=1) + "\n")


def _replace(path: Path, text: str) -> None:
    """Temp file + rename, without fsync (~3 ms each on a quiet disk, more on a busy one): the
    record and the index only ever shorten the path to a file they are checked against (its
    sha256); lost or torn by a crash, they are unreadable or do not match, and the next
    `render` renders in full."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def stored(cfg: Config) -> dict | None:
    """The record as saved, or None when it is unreadable or of another format."""
    try:
        data = json.loads(stamp_path(cfg).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("format") == FORMAT
    return data if ok and data.get("file") == str(cfg.dhcp.config_file) else None


def stored_index(cfg: Config, record: dict) -> dict | None:
    """The index the record names, only if it is the very one saved with it (sha256)."""
    want = record.get("index")
    if not want:
        return None
    try:
        text = index_path(cfg).read_text(encoding="utf-8")
    except OSError:
        return None
    if hashlib.sha256(text.encode()).hexdigest() != want:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def forget(cfg: Config) -> None:
    """Drop the record (the next render checks and installs in full)."""
    stamp_path(cfg).unlink(missing_ok=True)
