"""Image versions: every upload of a label is kept as version 1, 2, 3... (issue 20).

``images`` holds the current version of each label (all readers, the per-request boot configs and
the scheduler's OSLIST use it); ``image_versions`` holds every kept version, the current one
included. Blobs stay content-addressed in pxe.images' store, so versions that share a kernel
share its file. Rolling back copies one kept version into ``images`` in one UPDATE: nodes already
running keep what they booted, the next boot of the label gets the restored one.

The caller (pxe.images.Catalog) holds the images lock and a transaction around every change here.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import asdict, dataclass, field

from pxe import states
from pxe.config import Config
from pxe.errors import InputError, NotFound

TYPE_CHECKING = False  # not typing's: on every command's path (typing costs ~2 ms)
if TYPE_CHECKING:
    from typing import Any

KEEP_DEFAULT = 5
# The columns a version shares with ``images`` (``owner`` there is the label's owner; here, who
# uploaded the version).
COLUMNS = ("label", "version", "os_name", "arch", "mode", "cmdline", "kernel_sha", "initrd_sha",
           "rootfs_sha", "rootfs_name", "prov_seconds", "owner", "created")
_CONTENT = tuple(c for c in COLUMNS if c not in ("label", "owner"))
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def parse_version(text: object, what: str = "-version") -> int:
    """A version number a person typed: 1..999999999, digits only."""
    value = str(text).strip()
    if not _VERSION.fullmatch(value):
        raise InputError(f"{what} {text!r} is not a version number (1, 2, 3...)")
    return int(value)


def keep_versions(cfg: Config) -> int:
    """``[images] keep_versions``: how many versions of a label are kept (the current one
    included); older ones no node runs are pruned at the next upload."""
    raw = cfg.raw.get("images", {})
    value = raw.get("keep_versions", KEEP_DEFAULT) if isinstance(raw, dict) else KEEP_DEFAULT
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
        raise InputError(f"{cfg.path}: images.keep_versions: must be an integer 1..1000, "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class Version:
    """One row of ``history``."""

    label: str
    version: int
    created: float
    owner: str
    kernel_sha: str
    initrd_sha: str | None
    rootfs_sha: str | None
    sizes: dict[str, int | None] = field(default_factory=dict)
    current: bool = False
    running: list[str] = field(default_factory=list)  # nodes running this version now
    booted: int = 0  # distinct nodes that reached "ready" on it in a provisioning run

    def public(self) -> dict[str, Any]:
        return asdict(self)


def record(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
    """Insert one version (``values`` has every name in COLUMNS)."""
    conn.execute(f"INSERT INTO image_versions({', '.join(COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(COLUMNS))})", tuple(values[c] for c in COLUMNS))


def next_version(conn: sqlite3.Connection, label: str) -> int:
    row = conn.execute("SELECT MAX(version) FROM image_versions WHERE label = ?",
                       (label,)).fetchone()
    return int(row[0] or 0) + 1


def current(conn: sqlite3.Connection, label: str) -> int:
    row = conn.execute("SELECT version FROM images WHERE label = ?", (label,)).fetchone()
    if row is None:
        raise NotFound(f"unknown image label {label!r}")
    return int(row[0])


def numbers(conn: sqlite3.Connection, label: str) -> list[int]:
    return [int(r[0]) for r in conn.execute(
        "SELECT version FROM image_versions WHERE label = ? ORDER BY version", (label,))]


def row(conn: sqlite3.Connection, label: str, version: int) -> sqlite3.Row:
    """A kept version; InputError (exit 2) naming the kept ones when there is no such version."""
    found = conn.execute("SELECT * FROM image_versions WHERE label = ? AND version = ?",
                         (label, version)).fetchone()
    if found is None:
        kept = ", ".join(map(str, numbers(conn, label))) or "none"
        raise InputError(f"image {label!r} has no version {version} (kept versions: {kept})")
    return found


def previous(conn: sqlite3.Connection, label: str) -> int:
    """The newest kept version older than the current one (rollback's default)."""
    now = current(conn, label)
    older = [v for v in numbers(conn, label) if v < now]
    if not older:
        raise InputError(f"image {label!r} has no version older than its current version {now} "
                         f"(kept versions: {', '.join(map(str, numbers(conn, label)))})")
    return older[-1]


def make_current(conn: sqlite3.Connection, label: str, version: int) -> None:
    """Point ``images`` at a kept version (one UPDATE; the label's owner stays)."""
    source = row(conn, label, version)
    sets = ", ".join(f"{c} = ?" for c in _CONTENT)
    conn.execute(f"UPDATE images SET {sets} WHERE label = ?",
                 (*(source[c] for c in _CONTENT), label))


def running(conn: sqlite3.Connection, label: str) -> dict[int, list[str]]:
    """Nodes that run ``label`` now, by the version they booted (None: not recorded)."""
    out: dict[int, list[str]] = {}
    for r in conn.execute("SELECT name, current_version FROM nodes WHERE current_os = ? "
                          "ORDER BY name", (label,)):
        out.setdefault(r[1], []).append(r[0])
    return out


def pending(conn: sqlite3.Connection, label: str) -> set[int]:
    """Versions that provisioning runs still in progress started with."""
    return {int(r[0]) for r in conn.execute(
        "SELECT DISTINCT rn.image_version FROM run_nodes rn JOIN runs r ON r.id = rn.run_id "
        f"WHERE r.label = ? AND rn.state IN ({states.ACTIVE_SQL}) "
        "AND rn.image_version IS NOT NULL", (label,))}


def booted(conn: sqlite3.Connection, label: str) -> dict[int, int]:
    """How many distinct nodes reached ``ready`` on each version in a provisioning run."""
    return {int(r[0]): int(r[1]) for r in conn.execute(
        "SELECT rn.image_version, COUNT(DISTINCT rn.node) FROM run_nodes rn "
        "JOIN runs r ON r.id = rn.run_id WHERE r.label = ? AND rn.state = 'ready' "
        "AND rn.image_version IS NOT NULL GROUP BY rn.image_version", (label,))}


def in_use(conn: sqlite3.Connection, label: str) -> set[int]:
    """Versions a node runs or a run in progress is booting: never pruned."""
    return {v for v in running(conn, label) if v is not None} | pending(conn, label)


def prune(conn: sqlite3.Connection, label: str, keep: int) -> list[int]:
    """Delete the oldest versions beyond ``keep`` that are not current and not in use."""
    kept = numbers(conn, label)
    spare = [v for v in kept if v != current(conn, label) and v not in in_use(conn, label)]
    doomed = spare[:max(0, len(kept) - keep)]
    conn.executemany("DELETE FROM image_versions WHERE label = ? AND version = ?",
                     [(label, v) for v in doomed])
    return doomed


def live_blobs(conn: sqlite3.Connection) -> set[str]:
    """Every blob a kept version or a current image references (garbage collection keeps them)."""
    live: set[str] = set()
    for table in ("images", "image_versions"):
        for r in conn.execute(f"SELECT kernel_sha, initrd_sha, rootfs_sha FROM {table}"):
            live.update(v for v in r if v)
    return live


def booted_version(conn: sqlite3.Connection, node: str, run_id: int | None,
                   label: str | None) -> int | None:
    """The version a node reporting ``ready`` booted: the one its run recorded (at its start,
    and again at the power cycle: pxe.states.transition), else (a report outside a run) the
    label's current version."""
    if run_id is not None:
        found = conn.execute("SELECT image_version FROM run_nodes WHERE run_id = ? AND node = ?",
                             (run_id, node)).fetchone()
        if found is not None and found[0] is not None:
            return int(found[0])
    if label is None:
        return None
    found = conn.execute("SELECT version FROM images WHERE label = ?", (label,)).fetchone()
    return int(found[0]) if found else None
