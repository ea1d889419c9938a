"""Discovery: machines that PXE-boot with a MAC the inventory does not know.

With `[discovery] enabled`, an unknown MAC's loader falls through to the discovery image (the
provisioning initramfs with `dynprov.mode=discover`), which reports its hardware to
`POST /discover` and waits. Nothing becomes a node until the admin runs `pxe-stage nodes adopt`.

A flood (1,000 unknown MACs booting at once, or one machine reporting in a loop) is bounded:
at most `max_machines` rows, one stored report per MAC per `min_interval` seconds (a refused
one costs one indexed read), facts bounded by pxe.hwfacts.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass

from pxe import db, hwfacts, validate
from pxe.config import Config
from pxe.errors import InputError, NotFound

TYPE_CHECKING = False  # not typing's: `render` imports this module (typing costs ~2 ms)
if TYPE_CHECKING:
    from typing import Any

_KEYS = {"enabled", "image", "max_machines", "min_interval"}


@dataclass(frozen=True)
class Settings:
    enabled: bool = False
    image: str | None = None  # catalog label of the discovery kernel + provisioning initramfs
    max_machines: int = 1000  # rows kept in the discovered table
    min_interval: float = 60.0  # seconds between stored reports of one MAC


def load(cfg: Config) -> Settings:
    """Check `[discovery]` key by key (InputError naming the key)."""
    raw = cfg.raw.get("discovery", {})
    where = f"{cfg.path}: discovery"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: must be a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise InputError(f"{where}.enabled: must be true or false, got {enabled!r}")
    image = raw.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise InputError(f"{where}.image: must be an image label, got {image!r}")
        image = validate.label(image, "discovery image")
    cap = raw.get("max_machines", Settings.max_machines)
    if not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= 100_000:
        raise InputError(f"{where}.max_machines: must be an integer from 1 to 100000, got {cap!r}")
    every = raw.get("min_interval", Settings.min_interval)
    if not isinstance(every, (int, float)) or isinstance(every, bool) or not 0 <= every <= 86400:
        raise InputError(f"{where}.min_interval: must be 0 to 86400 seconds, got {every!r}")
    if enabled and image is None:
        raise InputError(f"{where}.image: discovery is enabled but names no image (the catalog "
                         "label of a kernel with the provisioning initramfs)")
    return Settings(enabled, image, cap, float(every))


# -- what the server records ------------------------------------------------------------------
OFF, KNOWN, LIMITED, FULL, STORED = "off", "known", "rate-limited", "full", "stored"


def record(conn: sqlite3.Connection, settings: Settings, mac: str, ip: str | None,
           facts_text: str, now: float | None = None) -> str:
    """Record one discovery report; returns what happened (STORED or why not). ``mac`` must be
    validated by the caller. Bounded: one row per MAC, at most max_machines rows."""
    if not settings.enabled:
        return OFF
    now = time.time() if now is None else now
    row = conn.execute("SELECT last_seen FROM discovered WHERE mac = ?", (mac,)).fetchone()
    if row is not None and now - row[0] < settings.min_interval:
        return LIMITED
    if conn.execute("SELECT 1 FROM macs WHERE mac = ?", (mac,)).fetchone():
        return KNOWN
    if row is None and _count(conn) >= settings.max_machines:
        return FULL  # the flood's common case: two indexed reads, no write lock
    facts = hwfacts.parse(facts_text)
    with db.transaction(conn):
        if row is None:
            if _count(conn) >= settings.max_machines:  # again, under the write lock
                return FULL
            conn.execute("INSERT INTO discovered(mac, ip, facts, first_seen, last_seen) "
                          "VALUES (?, ?, ?, ?, ?)", (mac, ip, json.dumps(facts), now, now))
            db.log_event(conn, "discovered", None, mac)
        else:
            conn.execute("UPDATE discovered SET ip = ?, facts = ?, last_seen = ?, "
                         "reports = reports + 1 WHERE mac = ?", (ip, json.dumps(facts), now, mac))
    return STORED


def _count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM discovered").fetchone()[0]


def listing(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every discovered machine, most recently seen first."""
    return [{"mac": r["mac"], "ip": r["ip"], "facts": json.loads(r["facts"]),
             "first_seen": r["first_seen"], "last_seen": r["last_seen"], "reports": r["reports"]}
            for r in conn.execute("SELECT * FROM discovered ORDER BY last_seen DESC, mac")]


# -- the admin's steps ---------------------------------------------------------------------------
def forget(cfg: Config, macs: list[str] | None) -> int:
    """Drop discovered machines (``macs``, or all when None) so that others fit under
    max_machines; all or nothing: a MAC not in the list is refused by name. Returns how many."""
    conn = db.connect(cfg.database)
    try:
        if macs is not None:
            macs = sorted({validate.mac(m) for m in macs})
            known = {r[0] for r in conn.execute(
                f"SELECT mac FROM discovered WHERE mac IN ({','.join('?' * len(macs))})", macs)}
            missing = [m for m in macs if m not in known]
            if missing:
                raise NotFound(f"no discovered machine has MAC {missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                               + "; nothing forgotten (`pxe-stage nodes discovered` lists them)")
        with db.transaction(conn):
            if macs is None:
                gone = conn.execute("DELETE FROM discovered").rowcount
            else:
                gone = 0
                for start in range(0, len(macs), 500):
                    chunk = macs[start:start + 500]
                    gone += conn.execute(f"DELETE FROM discovered WHERE mac IN "
                                         f"({','.join('?' * len(chunk))})", chunk).rowcount
            if gone:
                db.log_event(conn, "discovered-forgotten", None, f"{gone} machine(s)")
        return gone
    finally:
        conn.close()


def adopt(cfg: Config, mac: str, name: str, ip: str | None = None,
          extra: dict[str, Any] | None = None) -> tuple[Any, dict[str, str]]:
    """Turn a discovered machine into node ``name`` (all or nothing); returns the Node and the
    MACs of its other NICs left out because another node has them (MAC -> that node).

    The MAC is the one it reported from; its other NICs' MACs come along. Name, MAC and IP are
    checked like `nodes add` (taken ones refused by name); its facts become the node's."""
    from pxe.inventory import Inventory, build

    mac = validate.mac(mac)
    conn = db.connect(cfg.database)
    row = conn.execute("SELECT facts FROM discovered WHERE mac = ?", (mac,)).fetchone()
    if row is None:
        raise NotFound(f"no discovered machine has MAC {mac} (`pxe-stage nodes discovered` "
                       "lists them)")
    facts = json.loads(row["facts"])
    macs = [mac] + [n["mac"] for n in facts.get("nics", []) if n["mac"] != mac]
    inv = Inventory(cfg, conn)
    taken = {r[0]: r[1] for r in conn.execute(
        f"SELECT mac, node FROM macs WHERE mac IN ({','.join('?' * len(macs))})", macs)}
    if mac in taken:
        raise InputError(f"MAC {mac} already belongs to node {taken[mac]}")
    left_out = {m: taken[m] for m in macs if m in taken}  # a second NIC another node has
    macs = [m for m in macs if m not in taken]
    raw: dict[str, Any] = {"name": name, "macs": macs, "ip": ip, **(extra or {})}
    if facts.get("firmware") and "firmware" not in raw:
        raw["firmware"] = facts["firmware"]
    node = build(cfg, {k: v for k, v in raw.items() if v is not None})
    with db.transaction(conn):
        inv.add([node])
        conn.execute("INSERT INTO node_facts(node, facts, reported) SELECT ?, facts, last_seen "
                     "FROM discovered WHERE mac = ?", (node.name, mac))
        conn.execute("DELETE FROM discovered WHERE mac = ?", (mac,))
        db.log_event(conn, "adopted", node.name, mac)
    return node, left_out
