"""Segments: which boot server (service node) serves which nodes, and the `[segment]` settings.

A site with several network segments runs one `pxe-stage serve --segment NAME` per segment, all
on one shared state database: each serves only its segment's nodes (DHCP config, boot configs,
blobs). A node's segment is a row of ``node_segments``; no row means the primary's own segment,
spelled ''. A service node missing a blob fetches it from the primary by hash (pxe.blobcache).

    [segment]
    name = "east"                         # this server's segment (`--segment` wins)
    primary_url = "http://10.0.0.1:8080"  # where missing blobs come from (the primary's serve)
    fetch_max_mb = 8192                   # the largest blob fetched
    fetch_seconds = 600                   # one blob's whole fetch, at most
    heartbeat_seconds = 5                 # how often serve and drivers record they are alive
    stale_seconds = 30                    # silent this long: another server reports it dead
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from pxe import db, validate
from pxe.config import Config
from pxe.errors import InputError, NotFound
from pxe.records import Record, replace

PRIMARY = ""  # the segment of nodes without a row: served by the primary
_CHUNK = 500
_KEYS = {"name", "primary_url", "fetch_max_mb", "fetch_seconds", "heartbeat_seconds",
         "stale_seconds"}


class SegmentSettings(Record):
    name: str  # '' on the primary
    primary_url: str | None  # http(s)://host[:port] without a trailing slash
    fetch_max_bytes: int
    fetch_seconds: float
    heartbeat_seconds: float
    stale_seconds: float


def check_name(value: str) -> str:
    """A segment name: a label ('' is the primary's and is never typed)."""
    return validate.label(value, "segment")


def check_url(value: object, where: str = "primary URL") -> str:
    """An http(s) URL of a host (and port), nothing else: it becomes ``<url>/blobs/<sha>``."""
    if not isinstance(value, str):
        raise InputError(f"{where}: must be a string, got {value!r}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"{where}: invalid URL {value[:80]!r}: {exc}") from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or parts.username or parts.password
            or parts.path not in ("", "/") or any(c.isspace() for c in value)):
        raise InputError(f"{where}: expected http://HOST[:PORT] or https://HOST[:PORT], "
                         f"got {value[:80]!r}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def load(cfg: Config, name: str | None = None) -> SegmentSettings:
    """Check `[segment]`; ``name`` (from `--segment`, None = not given) wins over its name."""
    raw = cfg.raw.get("segment") or {}
    where = f"{cfg.path}: segment"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: must be a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")

    def number(key: str, default: float, low: float, high: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not low <= value <= high:
            raise InputError(f"{where}.{key}: must be a number from {low:g} to {high:g}, "
                             f"got {value!r}")
        return float(value)

    chosen = name if name is not None else raw.get("name", PRIMARY)
    if not isinstance(chosen, str):
        raise InputError(f"{where}.name: must be a string, got {chosen!r}")
    if chosen != PRIMARY:
        chosen = check_name(chosen)
    url = raw.get("primary_url")
    heartbeat = number("heartbeat_seconds", 5, 0.1, 3600)
    stale = number("stale_seconds", 30, 0.3, 86400)
    if stale < 2 * heartbeat:
        raise InputError(f"{where}.stale_seconds: must be at least twice heartbeat_seconds "
                         f"({heartbeat:g}), got {stale:g}")
    return SegmentSettings(
        name=chosen,
        primary_url=None if url is None else check_url(url, f"{where}.primary_url"),
        fetch_max_bytes=int(number("fetch_max_mb", 8192, 1, 1 << 20)) << 20,
        fetch_seconds=number("fetch_seconds", 600, 1, 86400),
        heartbeat_seconds=heartbeat,
        stale_seconds=stale,
    )


# -- membership -------------------------------------------------------------------------------------
def of_nodes(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, str]:
    """Each named node's segment ('' for the primary's); unknown nodes are left out."""
    names = list(names)
    out: dict[str, str] = {}
    for start in range(0, len(names), _CHUNK):
        chunk = names[start:start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for name, segment in conn.execute(
                "SELECT n.name, COALESCE(s.segment, '') FROM nodes n "
                f"LEFT JOIN node_segments s ON s.node = n.name WHERE n.name IN ({marks})",
                tuple(chunk)):
            out[name] = segment
    return out


def members(conn: sqlite3.Connection, segment: str) -> set[str]:
    """The names of the segment's nodes."""
    if segment == PRIMARY:
        rows = conn.execute("SELECT n.name FROM nodes n WHERE NOT EXISTS "
                            "(SELECT 1 FROM node_segments s WHERE s.node = n.name)")
    else:
        rows = conn.execute("SELECT node FROM node_segments WHERE segment = ?", (segment,))
    return {r[0] for r in rows}


def all_segments(conn: sqlite3.Connection) -> dict[str, int]:
    """Segment -> number of nodes, the primary's ('') included when it has any."""
    out = {r[0]: r[1] for r in conn.execute(
        "SELECT segment, COUNT(*) FROM node_segments GROUP BY segment ORDER BY segment")}
    primary = conn.execute("SELECT COUNT(*) FROM nodes n WHERE NOT EXISTS "
                           "(SELECT 1 FROM node_segments s WHERE s.node = n.name)").fetchone()[0]
    if primary:
        out[PRIMARY] = primary
    return dict(sorted(out.items()))


def assign(conn: sqlite3.Connection, names: Sequence[str], segment: str) -> None:
    """Move nodes into ``segment`` ('' = back to the primary's) in one transaction; all or
    nothing (an unknown node changes nothing). The next `render --segment` of both segments
    moves its DHCP entry."""
    if segment != PRIMARY:
        check_name(segment)
    if not names:
        raise InputError("empty node list")
    with db.transaction(conn):
        known = of_nodes(conn, names)
        missing = [n for n in names if n not in known]
        if missing:
            raise NotFound(f"unknown node(s): {', '.join(missing[:10])}")
        now = time.time()
        moved = [n for n in names if known[n] != segment]
        if segment == PRIMARY:
            conn.executemany("DELETE FROM node_segments WHERE node = ?", [(n,) for n in moved])
        else:
            conn.executemany(
                "INSERT INTO node_segments(node, segment) VALUES (?, ?) "
                "ON CONFLICT (node) DO UPDATE SET segment = excluded.segment",
                [(n, segment) for n in moved])
        conn.executemany("UPDATE nodes SET updated = ? WHERE name = ?", [(now, n) for n in moved])
        db.log_events(conn, "segment", moved, segment or "(primary)")


def pinned(cfg: Config, name: str | None) -> Config:
    """The config with ``[segment] name`` set to ``name`` (checked; None: unchanged), so every
    part of one server (boot configs, call-home's driver start, render) agrees on its segment."""
    if name is None:
        return cfg
    chosen = load(cfg, name).name  # checks the name and the rest of [segment]
    section = dict(cfg.raw.get("segment") or {})
    section["name"] = chosen
    return replace(cfg, raw={**cfg.raw, "segment": section})
