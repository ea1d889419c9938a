"""The Moab face's WIKI node report (Moab's "RM language"): one line per node, built from the state database.

Format (Moab's WIKI data format, see ../shared/moab-contract.md):
    ``<NODE> <ATTR>=<VALUE>[;<ATTR>=<VALUE>]...``; blank lines and ``#`` lines are ignored.
Values backslash-escape ``#``, ``;`` and ``:`` (documented); we also escape ``\\`` and ``"``,
turn control characters into spaces and put a value that contains a space in double quotes
(whitespace outside quotes would be read as ``;``). Names and labels never need either: they are
validated (``pxe.validate``) before they reach the database.

Every attribute name we print is a constant here (the WIKI key for power was not confirmed:
change POWER in one place).

What a node reports (the provisioning view; the workload RM reports Busy/Running):
    - outside the scheduler's pool: ``STATE=Drained`` with a MESSAGE (not offered to the scheduler);
    - in an active provisioning run: ``STATE=Down``, ``OS=_none`` (never the target OS before the
      node reported ready from inside it) and a MESSAGE with the run's step; past its deadline,
      ``timed out`` even before a writer has recorded it;
    - failed or timed out: ``STATE=Down`` with the reason as MESSAGE;
    - powered off by us: ``STATE=Idle;POWER=Off``; otherwise ``STATE=Idle``.
``OS`` is the OS the node last reported ready in; ``_none`` when there is none; in per-job mode a
node that ran a job since its re-image reports ``_used-<os>``. Both markers start with ``_``, which
no image label may (``validate.label``), so they match no OSLIST entry and no job request: the
scheduler re-images such a node before it gives it to a job that asks for an OS.

The report file (``<state_dir>/wiki/nodes.wiki``) is what a ``file://`` CLUSTERQUERYURL points at:
rewritten atomically (temp + rename) whenever the toolkit announces a change (pxe.hooks; this
face subscribes with on_event, see pyproject.toml), and by ``cluster-query`` whenever it finds it
stale. Its first line is a comment holding the database's
change key at the time of the read (see change_key) and the time it stops being true (the earliest
deadline of a node in a run). This module imports only the standard library; sqlite3 only when a
report is built.
"""

from __future__ import annotations

import os
import time

from pxe import states

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: cluster-query's fast path skips typing
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    from pxe.config import Config
    from pxe.hooks import Event

# -- attribute names (the only place they are spelled) ------------------------------------------
STATE = "STATE"
OS = "OS"
OSLIST = "OSLIST"
ARCH = "ARCH"
POWER = "POWER"
MESSAGE = "MESSAGE"
UPDATETIME = "UPDATETIME"
ATTRIBUTES = (STATE, OS, OSLIST, ARCH, POWER, MESSAGE, UPDATETIME)  # the order they are printed

IDLE, DOWN, DRAINED, UNKNOWN = "Idle", "Down", "Drained", "Unknown"
POWER_ON, POWER_OFF = "On", "Off"
NO_OS = "_none"
USED_PREFIX = "_used-"

REPORT_NAME = "wiki/nodes.wiki"
HEADER = "# dynprov node report"
MAX_AGE = 60.0  # a report older than this is rebuilt whatever the change key says (safety net)
MAX_MESSAGE = 200

# Node and run states: the toolkit's vocabulary (pxe.states, standard library only).
RUN_ACTIVE = states.ACTIVE
RUN_FINAL = states.FINAL
NODE_DOWN = states.DOWN
MODE_SETTING = states.MODE_SETTING

_SPECIAL = r'[\\#;:"]'  # re patterns, compiled (and cached by re) on first use
_CONTROL = r"[\x00-\x1f\x7f]"


def escape(value: object) -> str:
    """A WIKI value: specials backslash-escaped, control characters as spaces, quoted if spaced."""
    import re

    text = re.sub(_CONTROL, " ", str(value)).strip()
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 3] + "..."
    text = re.sub(_SPECIAL, lambda m: "\\" + m.group(0), text)
    return f'"{text}"' if " " in text else text


def line(node: str, attrs: Mapping[str, object]) -> str:
    """One node's line; attributes whose value is None or empty are left out."""
    items = [f"{key}={escape(value)}" for key, value in attrs.items()
             if value is not None and value != ""]
    return f"{node} {';'.join(items)}"


def os_marker_used(label: str | None) -> str:
    return USED_PREFIX + (label or NO_OS.lstrip("_"))


# -- the report, built from one snapshot of the state database -----------------------------------
class Report:
    """The report's lines, and when they stop being true (a run deadline passes), if ever."""

    __slots__ = ("text", "until")

    def __init__(self, text: str, until: float | None):
        self.text = text
        self.until = until


def build(conn: sqlite3.Connection, scheduler_pool: str, now: float | None = None) -> Report:
    """The WIKI lines for every node, read in one transaction (a consistent snapshot)."""
    now = time.time() if now is None else now
    conn.execute("BEGIN")
    try:
        mode_row = conn.execute("SELECT value FROM settings WHERE key = ?",
                                (MODE_SETTING,)).fetchone()
        oslists: dict[str, list[str]] = {}
        for label, arch in conn.execute("SELECT label, arch FROM images ORDER BY label"):
            oslists.setdefault(arch, []).append(label)
        active: dict[str, tuple[int, str, str, float | None]] = {}
        active_marks = states.ACTIVE_SQL
        for node, run_id, state, deadline, label in conn.execute(
                "SELECT rn.node, rn.run_id, rn.state, rn.deadline, r.label FROM runs r "
                "JOIN run_nodes rn ON rn.run_id = r.id "
                f"WHERE r.finished IS NULL AND rn.state IN ({active_marks})"):
            active[node] = (run_id, state, label, deadline)
        nodes = conn.execute(
            "SELECT name, arch, pool, state, state_reason, current_os, used, updated "
            "FROM nodes ORDER BY name").fetchall()
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    perjob = bool(mode_row) and mode_row[0] == "perjob"
    joined = {arch: ",".join(labels) for arch, labels in oslists.items()}
    until: float | None = None
    out: list[str] = []
    plain_os: dict[str, bool] = {}
    for name, arch, pool, state, reason, current, used, updated in nodes:
        os_value = current or NO_OS
        power: str | None = POWER_ON
        message = None
        if name in active:
            run_id, rstate, label, deadline = active[name]
            os_value = NO_OS
            wiki_state = DOWN
            if states.is_overdue(rstate, deadline, now):
                message = f"provisioning {label} timed out in step {rstate} (run {run_id})"
            else:
                message = f"provisioning {label}: {rstate} (run {run_id})"
                if deadline is not None:
                    until = deadline if until is None else min(until, deadline)
        elif state in NODE_DOWN:
            wiki_state, message = DOWN, reason or state
        elif state in RUN_ACTIVE:  # left over from a run that ended without this node
            wiki_state, message = DOWN, f"{state} outside a provisioning run"
        elif state == "off":
            wiki_state, power = IDLE, POWER_OFF
        else:
            wiki_state = IDLE
            if state == "unknown":
                power = None  # never seen: leave power to whoever knows
        if perjob and used and name not in active:
            os_value = os_marker_used(current)
        if pool != scheduler_pool:
            wiki_state = DRAINED
            message = f"in pool {pool}, not the scheduler's pool {scheduler_pool}"
        attrs = {STATE: wiki_state, OS: os_value, OSLIST: joined.get(arch), ARCH: arch,
                 POWER: power, MESSAGE: message,
                 UPDATETIME: int(updated) if updated else None}
        plain = plain_os.get(os_value)
        if plain is None:
            plain = plain_os[os_value] = _plain(os_value)
        if message is None and plain:  # the common line, without escape() per value
            items = [f"{STATE}={wiki_state}", f"{OS}={os_value}"]
            if attrs[OSLIST]:
                items.append(f"{OSLIST}={attrs[OSLIST]}")
            items.append(f"{ARCH}={arch}")
            if power:
                items.append(f"{POWER}={power}")
            if updated:
                items.append(f"{UPDATETIME}={int(updated)}")
            out.append(f"{name} {';'.join(items)}")
        else:
            out.append(line(name, attrs))
    return Report("".join(f"{o}\n" for o in out), until)


def _plain(value: str) -> bool:
    import re

    return (re.search(_SPECIAL, value) is None and " " not in value
            and re.search(_CONTROL, value) is None)


def unknown(names: Iterable[str], why: str) -> str:
    """Lines for nodes whose data cannot be read: STATE=Unknown with the reason."""
    return "".join(line(n, {STATE: UNKNOWN, MESSAGE: why}) + "\n" for n in names)


# -- the report file and its freshness -----------------------------------------------------------
def report_path(state_dir: Path | str) -> Path:
    from pathlib import Path

    return Path(report_file(state_dir))


def report_file(state_dir: Path | str) -> str:
    """report_path() as a string, without pathlib (cluster-query's fast path)."""
    return os.path.join(state_dir, REPORT_NAME)


def change_key(db_path: Path | str, config_path: Path | str | None = None) -> str:
    """A cheap fingerprint of the database's committed state (no SQLite connection needed).

    The WAL index (``-shm``) header carries a counter SQLite increments on every commit
    (https://www.sqlite.org/walformat.html, "iChange"), with the WAL's frame count and salts;
    the database file's header carries its own change counter (bytes 24-27), updated when a
    checkpoint writes into it. Together with the files' sizes and mtimes this changes with every
    commit. The header exists twice in the -shm; two different copies mean a writer is mid-update,
    and the key is "" (never matches: the caller rebuilds).

    Call it ONLY in a process that has no SQLite connection to this database open: closing any
    descriptor of a file drops every POSIX lock the process holds on it, SQLite's included, and
    another process may then delete the WAL under the open connection ("disk I/O error", lost
    writes; https://www.sqlite.org/howtocorrupt.html, section 2.2). cluster-query is such a
    process; writers refresh with ``keyed=False``.
    """
    db = str(db_path)
    parts: list[str] = []
    for suffix in ("", "-wal"):
        try:
            st = os.stat(db + suffix)
            parts.append(f"{st.st_ino}.{st.st_size}.{st.st_mtime_ns}")
        except FileNotFoundError:
            parts.append("-")
    try:
        with open(db + "-shm", "rb") as fh:
            head = fh.read(96)
        if head[:48] != head[48:96]:
            return ""
        parts.append(head[:48].hex())
    except FileNotFoundError:
        parts.append("-")
    try:
        with open(db, "rb") as fh:
            head = fh.read(100)
        parts.append(head[24:28].hex() + head[92:96].hex())
    except FileNotFoundError:
        parts.append("-")
    if config_path is not None:  # which config file, and which version of it
        try:
            st = os.stat(config_path)
            parts.append(f"{st.st_dev}.{st.st_ino}.{st.st_mtime_ns}")
        except OSError:
            parts.append("-")
    return "/".join(parts)


def _header(key: str, until: float | None, now: float) -> str:
    return f"{HEADER} key={key} until={until if until is not None else '-'} made={now:.3f}\n"


def cached(path: Path | str, key: str, now: float | None = None) -> bytes | None:
    """The report file's bytes if it is still true for ``key`` (and not past its deadline)."""
    if not key or key == "-":
        return None
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    first = data[:data.find(b"\n")].decode("utf-8", "replace")
    fields = dict(f.split("=", 1) for f in first.split()[4:] if "=" in f)
    if fields.get("key") != key:
        return None
    now = time.time() if now is None else now
    try:
        made = float(fields["made"])
        until = None if fields.get("until", "-") == "-" else float(fields["until"])
    except (KeyError, ValueError):
        return None
    if now - made > MAX_AGE or (until is not None and now >= until):
        return None
    return data


def write(path: Path | str, key: str, report: Report, now: float | None = None) -> str:
    """Write the report file atomically (temp + fsync-free rename: it is rebuilt if lost)."""
    now = time.time() if now is None else now
    text = _header(key, report.until, now) + report.text
    target = str(path)
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return text


def refresh(db_path: Path | str, state_dir: Path | str, scheduler_pool: str,
            config_path: Path | str | None = None, *, keyed: bool = True) -> str:
    """Rebuild the report file (if stale, when ``keyed``) and return its text.

    ``keyed=False`` is for processes that hold SQLite connections (see change_key): the report
    is rebuilt unconditionally and carries no key, so the next exec-mode poll rebuilds it once
    more with one; file:// readers get the fresh lines either way.
    """
    path = report_file(state_dir)
    key = "-"
    if keyed:
        key = change_key(db_path, config_path)  # taken before the read: a later commit changes it
        data = cached(path, key)
        if data is not None:
            return data.decode("utf-8")
    import sqlite3

    if not os.path.exists(db_path):
        raise FileNotFoundError(f"{db_path}: no state database")
    # Read-write (a read-only connection cannot build a missing WAL index), but query_only.
    conn = sqlite3.connect(str(db_path), timeout=10.0, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA query_only = 1")
        report = build(conn, scheduler_pool)
    finally:
        conn.close()
    try:
        return write(path, key, report)
    except OSError:
        return _header("-", report.until, time.time()) + report.text  # cannot write: still answer


def refresh_cfg(cfg: Config, *, force: bool = True) -> str:
    """Rewrite the report for a loaded site configuration, from a process that writes the
    database (the run driver, os-switch, fg-moab, node-power, pools): always rebuilt, unkeyed
    (see change_key); ``force`` is accepted for callers and changes nothing."""
    return refresh(cfg.db_path, cfg.paths.state_dir, cfg.groups.scheduler_pool, cfg.path,
                   keyed=False)


def on_event(cfg: Config, event: Event) -> None:
    """The Moab face's pxe.hooks subscriber: rewrite the report a ``file://`` CLUSTERQUERYURL
    reads. Run and image changes (re)create it; a pool change rewrites it only if the site keeps
    one (a site without Moab gets no file from moving nodes between pools)."""
    if event.kind == "pools" and not os.path.exists(report_file(cfg.paths.state_dir)):
        return
    refresh_cfg(cfg)
