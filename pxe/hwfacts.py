"""Hardware facts a node reports at call-home: CPUs, memory, disks, NICs, DMI serial.

The provisioning initramfs and the node agent print them with `dp_facts` (initramfs/lib.sh,
busybox sh, from /proc and /sys) as one `key value...` line per fact and send them in the
report's optional `facts` form field. They are untrusted text from the network: parsing keeps
only well-formed lines of known keys, bounded in size and count, so a node can neither fill
the database nor put anything odd into `nodes show` or a scheduler's node line. One row per
node (the last report wins); the discovery table holds the same shape for unknown MACs.
"""

from __future__ import annotations

import time

from pxe.lazyre import lazy

TYPE_CHECKING = False  # cluster-query's rebuild imports this module: no typing, json, pxe.db
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable
    from typing import Any

MAX_TEXT = 8192  # bytes of facts text accepted from one report
MAX_ITEMS = 64  # disks and NICs kept per node
_WORD = lazy(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
_MAC = lazy(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IPV4 = lazy(r"^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}$")
_TEXT_KEYS = {"cpu_model": "cpu_model", "serial": "serial", "vendor": "vendor",
              "product": "product"}
_PRINTABLE = lazy(r"[^A-Za-z0-9 ._,:/()@+#-]")


def _text(value: str) -> str:
    """Free text (CPU model, DMI strings): printable ASCII only, one line, at most 96 chars."""
    return " ".join(_PRINTABLE.sub("", value).split())[:96]


def _count(value: str, high: int) -> int | None:
    return int(value) if value.isdigit() and len(value) <= 19 and 0 <= int(value) <= high else None


def parse(text: str) -> dict[str, Any]:
    """Facts text -> a bounded dict; malformed or unknown lines are dropped, never an error."""
    facts: dict[str, Any] = {"disks": [], "nics": []}
    for line in text[:MAX_TEXT].splitlines():
        key, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if key == "cpus" and (n := _count(rest, 1 << 20)) is not None:
            facts["cpus"] = n
        elif key == "memory_kib" and (n := _count(rest, 1 << 50)) is not None:
            facts["memory_mib"] = n // 1024
        elif key in _TEXT_KEYS and _text(rest):
            facts[_TEXT_KEYS[key]] = _text(rest)
        elif key == "firmware" and rest in ("bios", "uefi"):
            facts["firmware"] = rest
        elif key == "bmc_address" and _IPV4.match(rest):
            facts["bmc_address"] = rest
        elif key == "disk" and len(facts["disks"]) < MAX_ITEMS:
            name, _, size = rest.partition(" ")
            n = _count(size.strip(), 1 << 62)
            if _WORD.match(name) and n is not None:
                facts["disks"].append({"name": name, "bytes": n})
        elif key == "nic" and len(facts["nics"]) < MAX_ITEMS:
            name, _, mac = rest.partition(" ")
            mac = mac.strip().lower()
            if _WORD.match(name) and _MAC.match(mac) and mac != "00:00:00:00:00:00":
                facts["nics"].append({"name": name, "mac": mac})
    return facts


def is_empty(facts: dict[str, Any]) -> bool:
    return not any(v for v in facts.values())


def store(conn: sqlite3.Connection, node: str, facts: dict[str, Any]) -> None:
    """Keep ``node``'s latest facts (one row per node: bounded by the inventory)."""
    import json

    from pxe import db

    with db.transaction(conn):
        conn.execute("INSERT INTO node_facts(node, facts, reported) VALUES (?, ?, ?) "
                     "ON CONFLICT(node) DO UPDATE SET facts = excluded.facts, "
                     "reported = excluded.reported", (node, json.dumps(facts), time.time()))


def load(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """name -> facts (with `reported`, a Unix time) for the nodes that reported any."""
    import json

    out: dict[str, dict[str, Any]] = {}
    names = list(names)
    for start in range(0, len(names), 500):
        chunk = names[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT node, facts, reported FROM node_facts "
                                f"WHERE node IN ({marks})", chunk):
            out[row[0]] = {**json.loads(row[1]), "reported": row[2]}
    return out


# The two numbers the scheduler faces read for every node on every report rebuild, taken from
# the stored JSON without decoding it (10,000 json.loads cost a cluster-query rebuild 5x its
# time). Safe: the text is always json.dumps of parse()'s dict, whose keys are fixed and whose
# values never contain a double quote (_text, _WORD and _MAC allow none).
_RESOURCE = lazy(r'"(cpus|memory_mib)": (\d+)')


def resource_text(conn: sqlite3.Connection, names: Iterable[str] | None = None
                  ) -> list[tuple[str, dict[str, str]]]:
    """(node, {"cpus": digits, "memory_mib": digits}) per node with facts (either may be
    missing or "0"): the raw form for a face that formats every node on every rebuild."""
    if names is None:
        rows = conn.execute("SELECT node, facts FROM node_facts").fetchall()
    else:
        names = list(names)
        rows = []
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            rows += conn.execute(f"SELECT node, facts FROM node_facts WHERE node IN "
                                 f"({','.join('?' * len(chunk))})", chunk).fetchall()
    find = _RESOURCE.findall
    return [(name, dict(find(text))) for name, text in rows]


def scheduler_resources(conn: sqlite3.Connection, names: Iterable[str] | None = None
                        ) -> dict[str, dict[str, int]]:
    """The scheduler-neutral resources view, as measured (no headroom: each face decides):
    `procs` = logical CPUs (Moab CPROC, Slurm CPUs) and `memory_mb` = MemTotal in MiB (Moab
    CMEMORY, Slurm RealMemory). ``names`` None: every node. Nodes without facts are left out."""
    out: dict[str, dict[str, int]] = {}
    for name, raw in resource_text(conn, names):
        res = {"procs": int(raw.get("cpus", 0)), "memory_mb": int(raw.get("memory_mib", 0))}
        res = {k: v for k, v in res.items() if v}
        if res:
            out[name] = res
    return out


def summary(facts: dict[str, Any]) -> dict[str, str]:
    """Facts as short lines for `nodes show` (one key each)."""
    lines: dict[str, str] = {}
    if "cpus" in facts:
        lines["cpus"] = f"{facts['cpus']}" + (f" ({facts['cpu_model']})" if facts.get("cpu_model")
                                              else "")
    if "memory_mib" in facts:
        lines["memory"] = f"{facts['memory_mib']} MiB"
    if facts.get("disks"):
        lines["disks"] = ", ".join(f"{d['name']} {d['bytes'] / 1e9:.1f} GB" for d in facts["disks"])
    if facts.get("nics"):
        lines["nics"] = ", ".join(f"{n['name']} {n['mac']}" for n in facts["nics"])
    for key in ("firmware", "serial", "vendor", "product", "bmc_address"):
        if facts.get(key):
            lines[key] = facts[key]
    if facts.get("reported"):
        lines["facts from"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(facts["reported"]))
    return lines
