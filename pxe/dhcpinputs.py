"""What the DHCP config is made of, and whether the installed one is still exactly that.

The DHCP config is a function of: each node's DHCP facts (DhcpHost: name, MACs, IP, arch,
firmware, BMC type and address, groups, pool; never what set-boot or a boot changes: boot target,
image, token, state), the segment rendered, the site's [network], [boot] and [dhcp] sections, the
template files it was rendered from, the code that renders it and the daemon binary that checked
it. The database keeps a DHCP-facts generation (table ``dhcp_generation``, pxe.db migration 8):
a random value its triggers replace on every write to those facts (nodes added, removed or their
facts changed, MACs, segments; by any writer, raw SQL included), never on a set-boot, a report
or a state change. After installing (or confirming) the file, `render` stores a key of all of
these, the generation it rendered from included, with the file's digest and identity in
``<state_dir>/dhcp-installed.json`` (under the render lock). When the key and the file on disk
still match, the file is byte for byte what a render would write and the daemon accepted it:
`render` then neither reads the nodes nor renders nor checks it again. When only some nodes'
facts changed (table ``dhcp_changes``, migration 9: each written node name with a growing change
number), pxe.dhcpincremental re-renders just those nodes' entries into the installed file; the
record keeps the change number it was rendered at and, in ``dhcp-installed.index``, where
each node's entry lines are. Anything else (an override template edited, the file edited by
hand, another dhcpd binary, a database restored from a backup) renders, checks and installs in
full.
Standard library only: `set-boot --render` pays for jinja2 only when the file changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

TYPE_CHECKING = False  # not typing's (~2 ms on every `render`)
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable

    from pxe.config import Config

STAMP_NAME = "dhcp-installed.json"
INDEX_NAME = "dhcp-installed.index"  # binary: pxe.dhcpinputs.encode_index
FORMAT = 4  # bump when what the key covers changes (3: generation apart from the rest;
# 4: BLAKE2b keys, the file's identity, a binary index)
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


def _digest(data: bytes = b""):
    """A hash for the keys: BLAKE2b from CPython's own _blake2 (~0.2 ms to import), not
    hashlib's OpenSSL (~3 ms to import)."""
    try:
        from _blake2 import blake2b
    except ImportError:  # an interpreter without it
        from hashlib import blake2b
    return blake2b(data, digest_size=32)


def digest_hex(data: bytes) -> str:
    """A file's digest for the record (BLAKE2b: ~0.6 ms slower than OpenSSL's sha256 on 1 MB,
    ~3 ms quicker to import)."""
    return _digest(data).hexdigest()


def key(cfg: Config, generation: str, segment: str | None, templates: Iterable[str],
        base: str | None = None) -> str:
    """The key of everything the DHCP config is rendered and checked from (``base``: its
    base_key, when the caller has it)."""
    base = base or base_key(cfg, segment, templates)
    return _digest(f"{base}\0generation={generation}".encode()).hexdigest()


def base_key(cfg: Config, segment: str | None, templates: Iterable[str]) -> str:
    """The key of everything but the nodes' facts: settings, segment, templates, code, checker.
    The same base is what lets pxe.dhcpincremental re-render only the changed nodes."""
    from pxe.templatefiles import find_template  # not pxe.render: no renderer is needed here

    h = _digest()
    for part in (f"format={FORMAT}", repr(cfg.network), repr(cfg.boot), repr(cfg.dhcp),
                 f"segment={segment!r}", _checker(cfg)):
        h.update(part.encode() + b"\0")
    for name in sorted(templates):
        source = find_template(cfg, name)
        h.update(f"template {name} {source.path}\0".encode())
        h.update(_digest(source.path.read_bytes()).digest())
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
        return digest_hex(path.read_bytes())
    except OSError:
        return None


def file_identity(path: Path) -> list[int] | None:
    """(device, inode, size, mtime, ctime) of a file: the record's quick test that the file
    is still the very one it installed (a rename, a write, even a restored mtime changes the
    ctime); when it differs, the digest decides."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def intact(cfg: Config, record: dict) -> bool:
    """Whether the installed file is still the one ``record`` was saved for."""
    path = cfg.dhcp.config_file
    identity = record.get("stat")
    if identity is not None and identity == file_identity(path):
        return True
    return record.get("digest") == _file_sha(path)


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
    return stored.get("key") == wanted and intact(cfg, stored)


def save(cfg: Config, snapshot: Snapshot, templates: Iterable[str],
         segment: str | None = None, index: dict | None = None, sha: str | None = None,
         base: str | None = None) -> None:
    """Record that the installed file was rendered from ``snapshot`` (of ``segment``) and
    ``templates`` and accepted (the caller holds the render lock and has just installed or
    confirmed it); ``index`` (pxe.dhcpincremental): where each node's entries are in it, or
    None (the next change renders in full); ``sha``: the installed bytes' digest_hex() when the
    caller has it (else the file is read); ``base``: base_key(), when the caller has it."""
    names = sorted(set(templates))
    base = base or base_key(cfg, segment, names)
    data = {"format": FORMAT, "file": str(cfg.dhcp.config_file), "templates": names,
            "generation": snapshot.generation, "seq": snapshot.seq, "base": base,
            "key": key(cfg, snapshot.generation, segment, names, base),
            "digest": sha or _file_sha(cfg.dhcp.config_file),
            "stat": file_identity(cfg.dhcp.config_file), "index": None}
    if index is not None:
        blob = encode_index(index)
        _replace(index_path(cfg), blob)
        data["index"] = _digest(blob).hexdigest()
        (cfg.paths.state_dir / "dhcp-installed.index.json").unlink(missing_ok=True)  # format 3
    _replace(stamp_path(cfg), (json.dumps(data, indent=1) + "\n").encode())


def _replace(path: Path, data: bytes) -> None:
    """Temp file + rename, without fsync (~3 ms each on a quiet disk, more on a busy one): the
    record and the index only ever shorten the path to a file they are checked against (its
    identity or digest, the index's digest); lost or torn by a crash, they are unreadable or do
    not match, and the next `render` renders in full."""
    from pxe.atomic import temp_beside

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def encode_index(index: dict) -> bytes:
    """The index as one JSON line (header and footer lengths, the template's formats), the
    node names joined by newlines, then the entries' MAC counts and lengths as machine
    integers: ~0.2 ms to write and read for 10,000 nodes where JSON lists took ~3 ms."""
    from array import array

    names = index["names"].encode()
    macs, chars = array("I", index["macs"]).tobytes(), array("I", index["chars"]).tobytes()
    head = {"head": index["head"], "tail": index["tail"], "names": len(names),
            "count": len(index["chars"]), "int": array("I").itemsize,
            "order": sys.byteorder, "format": index.get("format")}
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + names + macs + chars


def decode_index(blob: bytes) -> dict:
    """encode_index() undone; ValueError when the bytes do not add up."""
    from array import array

    line, _, rest = blob.partition(b"\n")
    head = json.loads(line)
    count, width, names_len = int(head["count"]), int(head["int"]), int(head["names"])
    if (width != array("I").itemsize or head["order"] != sys.byteorder
            or len(rest) != names_len + 2 * width * count):
        raise ValueError("index of another shape")
    macs, chars = array("I"), array("I")
    macs.frombytes(rest[names_len:names_len + width * count])
    chars.frombytes(rest[names_len + width * count:])
    index = {"head": head["head"], "tail": head["tail"], "names": rest[:names_len].decode(),
             "macs": macs, "chars": chars}
    if head.get("format") is not None:
        index["format"] = head["format"]
    return index


def stored(cfg: Config) -> dict | None:
    """The record as saved, or None when it is unreadable or of another format."""
    try:
        data = json.loads(stamp_path(cfg).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("format") == FORMAT
    return data if ok and data.get("file") == str(cfg.dhcp.config_file) else None


def stored_index(cfg: Config, record: dict) -> dict | None:
    """The index the record names, only if it is the very one saved with it (digest)."""
    want = record.get("index")
    if not want:
        return None
    try:
        blob = index_path(cfg).read_bytes()
    except OSError:
        return None
    if _digest(blob).hexdigest() != want:
        return None
    try:
        return decode_index(blob)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def forget(cfg: Config) -> None:
    """Drop the record (the next render checks and installs in full)."""
    stamp_path(cfg).unlink(missing_ok=True)
