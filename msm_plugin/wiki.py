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
      ``timed out`` even before a writer has recorded it; one the toolkit shows down mid-run
      (its segment's boot server is silent, pxe.servers) carries that reason instead;
    - failed or timed out: ``STATE=Down`` with the reason as MESSAGE;
    - powered off by us: ``STATE=Idle;POWER=Off`` (``OS=_none`` unless its image is stateful: a
      stateless OS lived in memory); otherwise ``STATE=Idle``.
``CPROC`` and ``CMEMORY`` come from the hardware facts the node sent at its last call-home
(pxe.hwfacts.scheduler_resources, as measured); a node that never reported leaves them out, so
Moab keeps what the workload RM says.
``OS`` is the OS the node last reported ready in; ``_none`` when there is none; in per-job mode a
node that ran a job since its re-image reports ``_used-<os>``. Both markers start with ``_``, which
no image label may (``validate.label``), so they match no OSLIST entry and no job request: the
scheduler re-images such a node before it gives it to a job that asks for an OS.

The report file (``<state_dir>/wiki/nodes.wiki``) is what a ``file://`` CLUSTERQUERYURL points at:
rewritten atomically (temp + rename) whenever the toolkit announces a change (pxe.hooks; this
face subscribes with on_event, see pyproject.toml), and by ``cluster-query`` whenever it finds it
stale. Its first line is a comment holding the database's change stamp at the time of the read
(see change_key, pxe.stamp) and the time it stops being true (the earliest deadline of a node in
a run). This module imports only the standard library (and pxe.stamp); sqlite3 only when a
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
CPROC = "CPROC"  # configured processors: the node's logical CPUs (its hardware facts)
CMEMORY = "CMEMORY"  # configured memory in MB (Moab's MB are MiB, as TORQUE's physmem / 1024)
ATTRIBUTES = (STATE, OS, OSLIST, ARCH, POWER, MESSAGE, UPDATETIME, CPROC, CMEMORY)  # print order

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


# The common line (an Idle node in the scheduler's pool, no run, no message) is formatted by
# SQLite itself, as the sqlite3 CLI floor does: a Python loop over 10,000 rows costs more than
# the query. Everything else (runs, failures, other pools, per-job markers, values that need
# escaping) comes back as NUL + the node's name and is built in Python below.
# ?1 = scheduler pool, ?2 = per-job.
# An OS value containing anything else takes the Python path (escaping); names and arches are
# validated before they are stored (pxe.validate), as the Python fast path below assumes too.
_SAFE_GLOB = "'*[^A-Za-z0-9._+-]*'"
_COMMON_SQL = f"""
SELECT CASE WHEN n.pool = ?1 AND n.state NOT IN ({{slow}})
    AND n.name NOT IN (SELECT rn.node FROM runs r JOIN run_nodes rn ON rn.run_id = r.id
                       WHERE r.finished IS NULL AND rn.state IN ({{active}}))
    AND NOT (?2 AND n.used)
    AND (n.current_os IS NULL OR n.current_os NOT GLOB {_SAFE_GLOB})
    {{condition}}
  THEN n.name || ' {STATE}={IDLE};{OS}=' || COALESCE(NULLIF(n.current_os, ''), '{NO_OS}')
    || COALESCE(';{OSLIST}=' || osl.labels, '') || ';{ARCH}=' || n.arch
    || CASE n.state WHEN 'off' THEN ';{POWER}={POWER_OFF}' WHEN 'unknown' THEN ''
                    ELSE ';{POWER}={POWER_ON}' END
    || CASE WHEN n.updated THEN ';{UPDATETIME}=' || CAST(n.updated AS INTEGER) ELSE '' END
    {{facts}}
  ELSE char(0) || n.name END
FROM nodes n LEFT JOIN osl ON osl.arch = n.arch {{facts_join}} ORDER BY n.name"""
# CPROC/CMEMORY from the node's hardware facts (pxe.hwfacts: json.dumps of whole numbers), read
# by SQLite's JSON functions as pxe.hwfacts.resource_text reads them; a facts text that is not
# that (not JSON, a value that is not a whole number >= 0) takes the Python path.
_FACT_KEYS = ((CPROC, "cpus"), (CMEMORY, "memory_mib"))
_FACTS_OK = " AND ".join(
    f"COALESCE(json_type(f.facts, '$.{key}') = 'integer' AND json_extract(f.facts, '$.{key}') >= 0,"
    f" json_type(f.facts, '$.{key}') IS NULL)" for _, key in _FACT_KEYS)
_FACTS_SQL = {
    # CASE: SQLite evaluates in this order (a JSON function on text that is not JSON raises)
    "condition": f"AND CASE WHEN f.facts IS NULL THEN 1 WHEN json_valid(f.facts) THEN {_FACTS_OK} "
                 "ELSE 0 END",
    "facts": " ".join(f"|| COALESCE(';{attr}=' || NULLIF(json_extract(f.facts, '$.{key}'), 0), '')"
                      for attr, key in _FACT_KEYS),
    "facts_join": "LEFT JOIN node_facts f ON f.node = n.name",
}
_NO_FACTS_SQL = {"condition": "", "facts": "", "facts_join": ""}


def build(conn: sqlite3.Connection, scheduler_pool: str, now: float | None = None, *,
          common_in_sql: bool = True) -> Report:
    """The WIKI lines for every node, read in one transaction (a consistent snapshot).

    ``common_in_sql=False`` builds every line in Python (the reference the tests compare with).
    """
    now = time.time() if now is None else now
    if not isinstance(conn, __import__("sqlite3").Connection):
        common_in_sql = False  # the one-query fast path is SQLite's dialect (GLOB, char(0))
    conn.execute("BEGIN")
    try:
        mode_row = conn.execute("SELECT value FROM settings WHERE key = ?",
                                (MODE_SETTING,)).fetchone()
        perjob = bool(mode_row) and mode_row[0] == "perjob"
        oslists: dict[str, list[str]] = {}
        stateful: set[str] = set()
        for label, arch, mode in conn.execute("SELECT label, arch, mode FROM images "
                                              "ORDER BY label"):
            oslists.setdefault(arch, []).append(label)
            if mode == "stateful":
                stateful.add(label)
        joined = {arch: ",".join(labels) for arch, labels in oslists.items()}
        active: dict[str, tuple[int, str, str, float | None]] = {}
        active_marks = states.ACTIVE_SQL
        for node, run_id, state, deadline, label in conn.execute(
                "SELECT rn.node, rn.run_id, rn.state, rn.deadline, r.label FROM runs r "
                "JOIN run_nodes rn ON rn.run_id = r.id "
                f"WHERE r.finished IS NULL AND rn.state IN ({active_marks})"):
            active[node] = (run_id, state, label, deadline)
        columns = "name, arch, pool, state, state_reason, current_os, used, updated"
        if common_in_sql:
            osl = " UNION ALL ".join("SELECT ?, ?" for _ in joined) or "SELECT NULL, NULL"
            # 'off' too: whether its OS survived depends on the image (stateless: none while off)
            slow = ",".join(f"'{s}'" for s in (*NODE_DOWN, *RUN_ACTIVE, "off"))
            facts_in_sql = _facts_in_sql(conn)
            sql = (f"WITH osl(arch, labels) AS ({osl})"
                   + _COMMON_SQL.format(slow=slow, active=active_marks,
                                        **(_FACTS_SQL if facts_in_sql else _NO_FACTS_SQL)))
            # ?1 and ?2 are numbered; the osl pairs follow as ?3, ?4, ...
            args = [scheduler_pool, int(perjob), *(v for pair in joined.items() for v in pair)]
            lines = [row[0] for row in conn.execute(_number_params(sql), args)]
            rest = [text[1:] for text in lines if text[0] == "\0"]
            # SQLite's lines carry their resources when it read the facts; else all from here
            resources = _resources(conn, rest) if facts_in_sql else _resources(conn)
            if not rest:  # every line formatted by SQLite: no Python loop over 10,000 rows
                conn.execute("COMMIT")
                if resources:
                    lines = _with_resources(lines, resources)
                return Report("\n".join(lines) + "\n" if lines else "", None)
            details = {r[0]: r for r in _select_names(conn, columns, rest)}
            nodes = [details[t[1:]] if t[0] == "\0" else t for t in lines]
        else:
            nodes = conn.execute(f"SELECT {columns} FROM nodes ORDER BY name").fetchall()
            resources = _resources(conn)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    until: float | None = None
    out: list[str] = []
    plain_os: dict[str, bool] = {}
    for row in nodes:
        if isinstance(row, str):  # formatted by SQLite
            out.append(row)
            continue
        name, arch, pool, state, reason, current, used, updated = row
        os_value = current or NO_OS
        power: str | None = POWER_ON
        message = None
        if name in active:
            run_id, rstate, label, deadline = active[name]
            os_value = NO_OS
            wiki_state = DOWN
            if states.is_overdue(rstate, deadline, now):
                message = f"provisioning {label} timed out in step {rstate} (run {run_id})"
            elif state in NODE_DOWN and reason:  # the toolkit shows it down mid-run (pxe.servers)
                message = reason
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
            if current not in stateful:  # a stateless OS lived in memory: none while off
                os_value = NO_OS
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
    if resources:
        out = _with_resources(out, resources)
    return Report("".join(f"{o}\n" for o in out), until)


def _facts_in_sql(conn: sqlite3.Connection) -> bool:
    """Whether SQLite can read the resources: the facts table is there and JSON is built in."""
    import sqlite3

    try:
        return conn.execute("SELECT json_valid('{}') FROM sqlite_master WHERE type = 'table' "
                            "AND name = 'node_facts'").fetchone() is not None
    except sqlite3.OperationalError:  # an SQLite built without JSON: every line from Python
        return False


def _resources(conn: sqlite3.Connection, names: list[str] | None = None) -> dict[str, str]:
    """node -> ";CPROC=n;CMEMORY=m" from the toolkit's resources view (digits: no escaping),
    of every node or of ``names``. One pass over raw digits."""
    import sqlite3

    if names == []:
        return {}
    from pxe import hwfacts

    try:
        rows = hwfacts.resource_text(conn, names)
    except sqlite3.OperationalError:  # a database no writer has upgraded yet: no facts table
        return {}
    out: dict[str, str] = {}
    for name, raw in rows:
        procs, memory = raw.get("cpus", "0"), raw.get("memory_mib", "0")
        text = (f";{CPROC}={procs}" if procs.lstrip("0") else "") + \
            (f";{CMEMORY}={memory}" if memory.lstrip("0") else "")
        if text:
            out[name] = text
    return out


def _with_resources(lines: list[str], resources: Mapping[str, str]) -> list[str]:
    """Each node's line with its resources last (every line has STATE: a ';' always fits)."""
    get = resources.get
    return [text + get(text[:text.find(" ")], "") for text in lines]


def _number_params(sql: str) -> str:
    """Number the anonymous '?' after ?1/?2 as ?3, ?4, ... (SQLite numbers mixed ones oddly)."""
    parts = sql.split("?")
    out, n = [parts[0]], 3
    for part in parts[1:]:
        if part[:1].isdigit():
            out.append("?" + part)
        else:
            out.append(f"?{n}" + part)
            n += 1
    return "".join(out)


def _select_names(conn: sqlite3.Connection, columns: str, names: list[str]) -> list[tuple]:
    rows: list[tuple] = []
    for start in range(0, len(names), 500):
        chunk = names[start:start + 500]
        marks = ",".join("?" * len(chunk))
        rows += conn.execute(f"SELECT {columns} FROM nodes WHERE name IN ({marks})",
                             chunk).fetchall()
    return rows


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
    """The database's change stamp (pxe.stamp: every writer rewrites it after COMMIT), which
    database file (device, inode) and which version of the config file: one small read and two
    stats, no SQLite file opened.

    Safe in any process, one holding SQLite connections included (the stamp is not a file
    SQLite locks), so writers store keyed reports too and Moab's next poll finds them fresh.
    "" (never matches) while the database has no stamp yet.
    """
    from pxe import stamp

    mark = stamp.read(db_path)
    try:  # which database file: one moved away or replaced is another database
        st = os.stat(db_path)
    except OSError:
        return ""
    if not mark:
        return ""
    mark = f"{mark}/{st.st_dev}.{st.st_ino}"
    if config_path is None:
        return mark
    try:
        st = os.stat(config_path)
    except OSError:
        return mark + "/-"
    return f"{mark}/{st.st_dev}.{st.st_ino}.{st.st_mtime_ns}"


def _header(key: str, until: float | None, now: float) -> str:
    return f"{HEADER} key={key} until={until if until is not None else '-'} made={now:.3f}\n"


def cached(path: Path | str, key: str, now: float | None = None) -> bytes | None:
    """The report file's bytes if it is still true for ``key`` (and not past its deadline)."""
    if not key or key == "-":
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.readline(512)  # the key first: a stale report is not read whole
            first = head.decode("utf-8", "replace")
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
            return head + fh.read()
    except OSError:
        return None


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
    """Rebuild the report file (if stale, when ``keyed``; always otherwise) and return its text.

    The file always carries the change key read before the database (a later commit changes
    it), so a writer's rebuild (``keyed=False``) is what the next poll prints as it is.
    """
    path = report_file(state_dir)
    key = change_key(db_path, config_path)  # taken before the read: a later commit changes it
    if keyed:
        data = cached(path, key)
        if data is not None:
            return data.decode("utf-8")
    if str(db_path).startswith(("postgresql://", "postgres://")):
        return _refresh_pg(str(db_path), path, scheduler_pool, config_path, keyed)
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
        return write(path, key or "-", report)
    except OSError:
        return _header("-", report.until, time.time()) + report.text  # cannot write: still answer


def _pg_key(conn: sqlite3.Connection, config_path: Path | str | None) -> str:
    """change_key() for a PostgreSQL store: the stamp row (every commit that wrote moves it)."""
    mark = conn.stamp()  # type: ignore[attr-defined]
    if config_path is None:
        return f"pg.{mark}"
    try:
        st = os.stat(config_path)
    except OSError:
        return f"pg.{mark}/-"
    return f"pg.{mark}/{st.st_dev}.{st.st_ino}.{st.st_mtime_ns}"


def _refresh_pg(url: str, path: str, scheduler_pool: str, config_path: Path | str | None,
                keyed: bool) -> str:
    """refresh() on PostgreSQL: one connection reads the stamp, then (if stale) the report."""
    from pxe import db

    conn = db.connect(url, create=False)
    try:
        key = _pg_key(conn, config_path)  # before the read: a later commit changes it
        if keyed:
            data = cached(path, key)
            if data is not None:
                return data.decode("utf-8")
        report = build(conn, scheduler_pool)
    finally:
        conn.close()
    try:
        return write(path, key, report)
    except OSError:
        return _header("-", report.until, time.time()) + report.text


def refresh_cfg(cfg: Config, *, force: bool = True) -> str:
    """Rewrite the report for a loaded site configuration, from a process that writes the
    database (the run driver, os-switch, fg-moab, node-power, pools): always rebuilt, keyed by
    the stamp (see change_key); ``force`` is accepted for callers and changes nothing."""
    return refresh(cfg.database, cfg.paths.state_dir, cfg.groups.scheduler_pool, cfg.path,
                   keyed=False)


def on_event(cfg: Config, event: Event) -> None:
    """The Moab face's pxe.hooks subscriber: rewrite the report a ``file://`` CLUSTERQUERYURL
    reads. Run and image changes (re)create it; a pool change rewrites it only if the site keeps
    one (a site without Moab gets no file from moving nodes between pools)."""
    if event.kind == "pools" and not os.path.exists(report_file(cfg.paths.state_dir)):
        return
    refresh_cfg(cfg)
