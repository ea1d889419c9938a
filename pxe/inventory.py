"""The node inventory: who the nodes are, how to reach their BMC, what they should boot.

Every write validates first and changes nothing if any entry is bad.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

from pxe import db, validate
from pxe.config import Config
from pxe.errors import InputError, NotFound

TYPE_CHECKING = False  # not typing's: on every command's path (typing costs ~2 ms)
if TYPE_CHECKING:
    from typing import Any

FIELDS = ("name", "macs", "ip", "arch", "firmware", "bmc_type", "bmc_address", "bmc_port",
          "bmc_user", "bmc_secret", "groups", "pool", "current_os", "desired_os", "segment")


@dataclass(frozen=True)
class Node:
    name: str
    macs: tuple[str, ...]
    ip: str | None = None
    arch: str = "x86_64"
    firmware: str = "bios"
    bmc_type: str = "none"
    bmc_address: str | None = None
    bmc_port: int | None = None
    bmc_user: str | None = None
    bmc_secret: str | None = None
    groups: tuple[str, ...] = ()
    pool: str = "hpc"
    current_os: str | None = None
    current_version: int | None = None  # the image version it booted (pxe.imageversions)
    desired_os: str | None = None
    boot_target: str = "local"
    boot_token: str | None = field(default=None, repr=False)
    state: str = "unknown"
    state_reason: str = ""
    used: bool = False
    updated: float = 0.0
    segment: str = ""  # the boot server's segment ('' = the primary's; pxe.segments)
    boot_set: float | None = None  # when set-boot last chose its next boot (run recovery reads it)

    def public(self) -> dict[str, Any]:
        """The node as shown by list/show/--json: no token (it is a credential)."""
        data = asdict(self)
        data.pop("boot_token")
        data["macs"] = list(self.macs)
        data["groups"] = list(self.groups)
        return data


def _node_from_row(row: sqlite3.Row, macs: Sequence[str]) -> Node:
    return Node(
        name=row["name"], macs=tuple(macs), ip=row["ip"], arch=row["arch"],
        firmware=row["firmware"], bmc_type=row["bmc_type"], bmc_address=row["bmc_address"],
        bmc_port=row["bmc_port"], bmc_user=row["bmc_user"], bmc_secret=row["bmc_secret"],
        groups=tuple(g for g in row["groups"].split(",") if g), pool=row["pool"],
        current_os=row["current_os"], desired_os=row["desired_os"],
        current_version=row["current_version"] if row["current_os"] else None,
        boot_target=row["boot_target"], boot_token=row["boot_token"], state=row["state"],
        state_reason=row["state_reason"], used=bool(row["used"]), updated=row["updated"],
        boot_set=row["boot_set"],
    )


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def build(cfg: Config, raw: dict[str, Any]) -> Node:
    """Make a checked Node from loose input (CLI flags, a CSV row, a YAML mapping)."""
    import netaddr

    unknown = set(raw) - set(FIELDS) - {"mac"}
    if unknown:
        raise InputError(f"unknown node field(s): {', '.join(sorted(str(k)[:40] for k in unknown))}")
    name = validate.hostname(str(raw.get("name", "")))
    macs_in = raw.get("macs", raw.get("mac"))
    if isinstance(macs_in, str):
        macs_in = [m for m in macs_in.replace(";", ",").replace(" ", ",").split(",") if m]
    if not macs_in:
        raise InputError(f"node {name}: at least one MAC address is required")
    try:
        macs = tuple(dict.fromkeys(validate.mac(str(m)) for m in macs_in))
    except InputError as exc:
        raise InputError(f"node {name}: {exc}") from None
    ip = None
    if not _blank(raw.get("ip")):
        ip = validate.ipv4(str(raw["ip"]))
        net = netaddr.IPNetwork(cfg.network.subnet)
        addr = netaddr.IPAddress(ip)
        if addr not in net:
            raise InputError(f"node {name}: IP {ip} is outside the subnet {cfg.network.subnet}")
        if addr in (net.network, net.broadcast) or ip == cfg.network.server:
            raise InputError(f"node {name}: IP {ip} is the network, broadcast or server address")
        first, last = cfg.network.dynamic_range
        if netaddr.IPAddress(first) <= addr <= netaddr.IPAddress(last):
            raise InputError(f"node {name}: IP {ip} is inside the dynamic range {first}-{last}")

    def opt(key: str, check) -> Any:
        value = raw.get(key)
        return None if _blank(value) else check(str(value).strip())

    groups_in = raw.get("groups") or ()
    if isinstance(groups_in, str):
        groups_in = [g for g in groups_in.replace(";", ",").split(",") if g.strip()]
    groups = tuple(validate.label(str(g).strip(), "group") for g in groups_in)
    bmc_type = validate.choice(str(raw.get("bmc_type") or "none"), validate.BMC_TYPES, "BMC type")
    node = Node(
        name=name, macs=macs, ip=ip,
        arch=validate.choice(str(raw.get("arch") or "x86_64"), validate.ARCHES, "arch"),
        firmware=validate.choice(str(raw.get("firmware") or "bios"), validate.FIRMWARES,
                                 "firmware"),
        bmc_type=bmc_type,
        bmc_address=opt("bmc_address", lambda v: validate.ipv4(v, "BMC address")),
        bmc_port=opt("bmc_port", lambda v: validate.port(v, "BMC port")),
        bmc_user=opt("bmc_user", lambda v: validate.unix_name(v.lower(), "BMC user") and v),
        bmc_secret=opt("bmc_secret", validate.secret_ref),
        groups=groups,
        pool=validate.label(str(raw.get("pool") or cfg.groups.scheduler_pool), "pool"),
        current_os=opt("current_os", validate.label),
        desired_os=opt("desired_os", validate.label),
        segment=opt("segment", lambda v: validate.label(v, "segment")) or "",
    )
    if bmc_type in ("ipmi", "redfish") and not node.bmc_address:
        raise InputError(f"node {name}: BMC type {bmc_type} needs a bmc_address")
    return node


class Inventory:
    """Node records in the state database."""

    def __init__(self, cfg: Config, conn: sqlite3.Connection | None = None):
        self.cfg = cfg
        self.conn = conn or db.connect(cfg.database)

    # -- reads -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM nodes ORDER BY name")]

    def all(self) -> list[Node]:
        return self._load("SELECT * FROM nodes ORDER BY name", (), every_node=True)

    def get(self, name: str) -> Node:
        nodes = self._load("SELECT * FROM nodes WHERE name = ?", (name,))
        if not nodes:
            raise NotFound(f"unknown node {name!r}")
        return nodes[0]

    def select(self, spec: str | Iterable[str]) -> list[Node]:
        """Nodes named by a node set; every unknown name is reported at once."""
        from pxe.nodeset import expand, max_nodes

        wanted = expand(spec, max_nodes(self.cfg))
        found = {n.name: n for n in self._load_names(wanted)}
        missing = [w for w in wanted if w not in found]
        if missing:
            from pxe.nodeset import fold

            raise NotFound(f"unknown node(s): {fold(missing)}")
        return [found[w] for w in wanted]

    def _load_names(self, names: Sequence[str]) -> list[Node]:
        out: list[Node] = []
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            marks = ",".join("?" * len(chunk))
            out.extend(self._load(f"SELECT * FROM nodes WHERE name IN ({marks})", tuple(chunk)))
        return out

    def _load(self, sql: str, args: tuple, every_node: bool = False) -> list[Node]:
        rows = self.conn.execute(sql, args).fetchall()
        if not rows:
            return []
        macs: dict[str, list[str]] = {}
        if every_node:  # one scan of the whole table (a chunk of a select asks by name)
            query = self.conn.execute("SELECT node, mac FROM macs ORDER BY node, idx")
        else:
            names = [r["name"] for r in rows]
            marks = ",".join("?" * len(names))
            query = self.conn.execute(
                f"SELECT node, mac FROM macs WHERE node IN ({marks}) ORDER BY node, idx", names)
        for node, mac in query:
            macs.setdefault(node, []).append(mac)
        from pxe import segments

        where = segments.of_nodes(self.conn, [r["name"] for r in rows])
        return [replace(_node_from_row(r, macs.get(r["name"], ())),
                        segment=where.get(r["name"], ""))
                for r in rows]

    # -- writes ------------------------------------------------------------------------------
    def add(self, nodes: Sequence[Node], replace_existing: bool = False) -> None:
        """Insert nodes all-or-nothing; duplicates of name, MAC or IP are refused by name."""
        seen_names: set[str] = set()
        seen_macs: dict[str, str] = {}
        seen_ips: dict[str, str] = {}
        for node in nodes:
            if node.name in seen_names:
                raise InputError(f"node {node.name} appears twice in the input")
            seen_names.add(node.name)
            for mac in node.macs:
                if mac in seen_macs:
                    raise InputError(f"MAC {mac} is given to both {seen_macs[mac]} and {node.name}")
                seen_macs[mac] = node.name
            if node.ip:
                if node.ip in seen_ips:
                    raise InputError(f"IP {node.ip} is given to both {seen_ips[node.ip]} and "
                                     f"{node.name}")
                seen_ips[node.ip] = node.name
        with db.transaction(self.conn):
            # The scheduler's pool always exists, whatever the site named it.
            self.conn.execute("INSERT INTO pools(name, created) VALUES (?, ?) "
                              "ON CONFLICT (name) DO NOTHING",
                              (self.cfg.groups.scheduler_pool, time.time()))
            pools = {r[0] for r in self.conn.execute("SELECT name FROM pools")}
            for node in nodes:
                if node.pool not in pools:
                    raise NotFound(f"node {node.name}: unknown pool {node.pool!r}")
                exists = self.conn.execute("SELECT 1 FROM nodes WHERE name = ?",
                                           (node.name,)).fetchone()
                if exists and not replace_existing:
                    raise InputError(f"node {node.name} already exists")
                for mac in node.macs:
                    row = self.conn.execute("SELECT node FROM macs WHERE mac = ?", (mac,)).fetchone()
                    if row and row[0] != node.name and row[0] not in seen_names:
                        raise InputError(f"MAC {mac} already belongs to node {row[0]}")
                if node.ip:
                    row = self.conn.execute("SELECT name FROM nodes WHERE ip = ?",
                                            (node.ip,)).fetchone()
                    if row and row[0] != node.name and row[0] not in seen_names:
                        raise InputError(f"IP {node.ip} already belongs to node {row[0]}")
            now = time.time()
            for node in nodes:
                self.conn.execute("DELETE FROM macs WHERE node = ?", (node.name,))
                self.conn.execute("UPDATE nodes SET ip = NULL WHERE name = ?", (node.name,))
            for node in nodes:
                self.conn.execute(
                    """INSERT INTO nodes(name, ip, arch, firmware, bmc_type, bmc_address, bmc_port,
                       bmc_user, bmc_secret, groups, pool, current_os, desired_os, updated)
                       VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                       ON CONFLICT(name) DO UPDATE SET ip=excluded.ip, arch=excluded.arch,
                       firmware=excluded.firmware, bmc_type=excluded.bmc_type,
                       bmc_address=excluded.bmc_address, bmc_port=excluded.bmc_port,
                       bmc_user=excluded.bmc_user, bmc_secret=excluded.bmc_secret,
                       groups=excluded.groups, pool=excluded.pool,
                       current_os=COALESCE(excluded.current_os, nodes.current_os),
                       desired_os=COALESCE(excluded.desired_os, nodes.desired_os),
                       updated=excluded.updated""",
                    (node.name, node.ip, node.arch, node.firmware, node.bmc_type, node.bmc_address,
                     node.bmc_port, node.bmc_user, node.bmc_secret, ",".join(node.groups),
                     node.pool, node.current_os, node.desired_os, now))
                self.conn.executemany(
                    "INSERT INTO macs(mac, node, idx) VALUES (?, ?, ?)",
                    [(mac, node.name, i) for i, mac in enumerate(node.macs)])
                db.log_event(self.conn, "node-added", node.name)
            for segment in sorted({n.segment for n in nodes}):
                from pxe import segments

                segments.assign(self.conn, [n.name for n in nodes if n.segment == segment],
                                segment)

    def remove(self, names: Sequence[str]) -> None:
        with db.transaction(self.conn):
            for name in names:
                self.get(name)
            for name in names:
                self.conn.execute("DELETE FROM macs WHERE node = ?", (name,))
                self.conn.execute("DELETE FROM nodes WHERE name = ?", (name,))
                db.log_event(self.conn, "node-removed", name)

    def set_boot(self, names: Sequence[str], target: str, label: str | None,
                 tokens: dict[str, str] | None = None) -> None:
        """Record what each node should boot next (its OS image, or its local disk); its
        boot_set time too, which the run driver's recovery reads (pxe.setboot.set_boot is the
        command's way: checks, one event)."""
        now = time.time()
        with db.transaction(self.conn):
            self.conn.executemany(
                "UPDATE nodes SET boot_target = ?, desired_os = COALESCE(?, desired_os), "
                "boot_token = ?, updated = ?, boot_set = ? WHERE name = ?",
                [(target, label, (tokens or {}).get(n), now, now, n) for n in names])

    def update_state(self, name: str, **fields: Any) -> None:
        allowed = {"state", "state_reason", "current_os", "used", "pool", "boot_token",
                   "boot_target", "desired_os"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update {bad}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with db.transaction(self.conn):  # COMMIT bumps the change stamp (pxe.stamp)
            self.conn.execute(f"UPDATE nodes SET {sets}, updated = ? WHERE name = ?",
                              (*fields.values(), time.time(), name))


# -- node lists the way sites keep them ----------------------------------------------------
def parse_csv(text: str) -> list[dict[str, Any]]:
    import csv  # only `nodes import`/`export` read or write CSV
    import io

    reader = csv.DictReader(io.StringIO(text))
    try:
        if not reader.fieldnames or "name" not in reader.fieldnames:
            raise InputError("CSV node list needs a header row with at least 'name' and 'mac'")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if None in row:
                raise InputError(f"CSV line {lineno}: more fields than the header")
            rows.append({k.strip(): v for k, v in row.items() if k and not _blank(v)})
    except csv.Error as exc:
        raise InputError(f"CSV node list, line {reader.line_num}: {exc}") from None
    return rows


class _NoAliasLoader:
    """A safe YAML loader that refuses anchors and aliases: a 12-line file of nested aliases
    (a "billion laughs") otherwise expands to gigabytes. Node lists never need them."""

    _cls = None

    @classmethod
    def make(cls):  # type: ignore[no-untyped-def]
        if cls._cls is None:
            import yaml

            class Loader(yaml.SafeLoader):
                def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
                    if self.check_event(yaml.AliasEvent):
                        mark = self.peek_event().start_mark
                        raise yaml.YAMLError(f"aliases (*name) are not allowed (line {mark.line + 1})")
                    event = self.peek_event()
                    if getattr(event, "anchor", None):
                        raise yaml.YAMLError(
                            f"anchors (&name) are not allowed (line {event.start_mark.line + 1})")
                    return super().compose_node(parent, index)

            cls._cls = Loader
        return cls._cls


def parse_yaml(text: str) -> list[dict[str, Any]]:
    import yaml

    try:
        data = yaml.load(text, Loader=_NoAliasLoader.make())
    except yaml.YAMLError as exc:
        raise InputError(f"YAML node list: {exc}") from None
    if isinstance(data, dict) and "nodes" in data:
        data = data["nodes"]
    if isinstance(data, dict):  # {name: {mac: ..., ip: ...}}
        bad = [k for k, v in data.items() if v is not None and not isinstance(v, dict)]
        if bad:
            raise InputError(f"YAML node list: the entry for {str(bad[0])[:60]!r} must be a "
                             "mapping of fields (mac: ..., ip: ...), not a single value")
        data = [{"name": k, **(v or {})} for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise InputError("YAML node list must be a list of mappings or a mapping of node names")
    return data


def load_file(cfg: Config, path: str, fmt: str | None = None) -> list[Node]:
    """Nodes from a CSV or YAML file: a regular file (no FIFO, device or symlink), UTF-8, at
    most ``[limits] import_max_bytes``; every entry checked before any is returned."""
    from pxe.config import read_text_file

    text = read_text_file(path, cfg.limits.import_max_bytes, "node list", follow_symlinks=False)
    fmt = fmt or ("yaml" if path.endswith((".yaml", ".yml")) else "csv")
    rows = parse_yaml(text) if fmt == "yaml" else parse_csv(text)
    nodes = []
    for i, row in enumerate(rows, start=1):
        try:
            nodes.append(build(cfg, row))
        except InputError as exc:
            raise InputError(f"{path}: entry {i}: {exc}") from None
    return nodes


def export(nodes: Iterable[Node], fmt: str) -> str:
    """The inventory in the same formats import reads (a round trip loses nothing)."""
    rows = []
    for n in nodes:
        row = {k: getattr(n, k) for k in FIELDS}
        row["macs"] = ",".join(n.macs)
        row["groups"] = ",".join(n.groups)
        rows.append(row)
    if fmt == "yaml":
        import yaml

        clean = [{k: v for k, v in r.items() if v not in (None, "")} for r in rows]
        return yaml.safe_dump({"nodes": clean}, sort_keys=False)
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return out.getvalue()


__all__ = ["Node", "Inventory", "build", "load_file", "export", "replace"]
