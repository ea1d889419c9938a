"""`cluster-query`: Moab's CLUSTERQUERYURL - one WIKI line per node (see msm_plugin/wiki.py).

Moab runs it on every poll, with no argument. It exits 0 whenever it runs (only an unknown option
exits 2) and prints what it has: a failing query would make Moab mark the whole provisioning
resource manager corrupt and stop calling os-switch. It imports nothing but the standard library
and msm_plugin.wiki (pxe.config too when it rebuilds) - no jinja2, netaddr, ClusterShell or pyghmi:

1. find ``paths.state_dir`` (and ``groups.scheduler_pool``) with a line scan of the site
   config (no tomllib, no pxe.config on the poll; tomllib when the scan cannot be sure);
2. if the report file ``<state_dir>/wiki/nodes.wiki`` is still true for the database's change
   stamp (msm_plugin.wiki.change_key: the stamp writers bump after COMMIT, pxe.stamp, and a stat of
   the config; no SQLite), print it as it is;
3. otherwise read one snapshot of the state database (the common line formatted by SQLite,
   msm_plugin.wiki.build), rebuild the file atomically (keyed), print it.

The same file serves ``CLUSTERQUERYURL=file://...`` (no process at all); ``cluster-query
--refresh`` (from a timer) keeps it fresh when nothing else writes it. If the database cannot be
read, the nodes of the last report are printed with STATE=Unknown and the reason.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

PROG = "cluster-query"
DEFAULT_CONFIG = "/etc/dynprov/dynprov.toml"  # the same default as pxe.config.DEFAULT_PATH


def _regular(config_path: str) -> str:
    """The path, if it is a regular file: a FIFO or device given as the config must not block
    Moab's poll."""
    import stat

    if not stat.S_ISREG(os.stat(config_path).st_mode):
        raise ValueError(f"{config_path}: not a regular file")
    return config_path


def _site(config_path: str) -> tuple[str, str, str]:
    """(state_dir, scheduler_pool, [state] url or "") from the site config, read without the
    full config checks."""
    import tomllib

    from pxe.config import Groups  # the defaults; importing pxe.config costs no netaddr

    with open(_regular(config_path), "rb") as fh:
        data = tomllib.load(fh)
    state_dir = (data.get("paths") or {}).get("state_dir")
    if not isinstance(state_dir, str) or not os.path.isabs(state_dir):
        raise ValueError(f"{config_path}: paths.state_dir must be an absolute path")
    pool = (data.get("groups") or {}).get("scheduler_pool", Groups.scheduler_pool)
    if not isinstance(pool, str):
        raise ValueError(f"{config_path}: groups.scheduler_pool must be a string")
    url = (data.get("state") or {}).get("url", "")
    if not isinstance(url, str):
        raise ValueError(f"{config_path}: state.url must be a string")
    return state_dir, pool, url


DEFAULT_POOL = "hpc"  # pxe.config.Groups.scheduler_pool (a unit test keeps them equal)


def _scan(config_path: str) -> dict[str, str] | None:
    """``paths.state_dir`` and ``groups.scheduler_pool`` from plain ``key = "value"`` lines of
    their sections, without tomllib (~10 ms) or pxe.config (~10 ms) on the poll.

    None (the caller parses with tomllib) when the file could set either any other way: the key
    name anywhere else (dotted keys, inline tables, quoted keys), escapes, or twice. A result is
    used only with a report keyed by this very config file (device, inode, mtime).
    """
    wanted = {"state_dir": "[paths]", "scheduler_pool": "[groups]", "url": "[state]"}
    found: dict[str, str] = {}
    section = ""
    with open(_regular(config_path), encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if line.startswith("["):
                section = line.split("#", 1)[0].strip()
                continue
            if "\\" in line:
                return None
            if line.startswith("#"):
                continue
            for key, where in wanted.items():
                if key not in line:
                    continue
                name, _, value = line.partition("=")
                value = value.strip()
                if (section != where or name.strip() != key or key in found or len(value) < 2
                        or value[0] != '"' or value.count('"') != 2 or value[-1] != '"'):
                    return None
                found[key] = value[1:-1]
    state_dir = found.get("state_dir")
    if not state_dir or not os.path.isabs(state_dir):
        return None
    return {"state_dir": state_dir, "scheduler_pool": found.get("scheduler_pool", DEFAULT_POOL),
            "url": found.get("url", "")}


def _state_dir_fast(config_path: str) -> str | None:
    """paths.state_dir from the plain scan (see _scan), else None."""
    site = _scan(config_path)
    return site["state_dir"] if site and not site["url"] else None  # PostgreSQL: no stamp file


def query(config_path: str, *, refresh_only: bool = False) -> bytes | str:
    """The report (never raises: problems become comment lines or STATE=Unknown lines)."""
    from msm_plugin import wiki

    if not refresh_only:
        try:
            state_dir = _state_dir_fast(config_path)
        except (OSError, UnicodeDecodeError, ValueError):
            state_dir = None
        if state_dir:
            db_path = os.path.join(state_dir, "dynprov.db")
            data = wiki.cached(wiki.report_file(state_dir), wiki.change_key(db_path, config_path))
            if data is not None:
                return data
    try:
        site = _scan(config_path)
        state_dir, pool, url = (site["state_dir"], site["scheduler_pool"], site["url"]) \
            if site else _site(config_path)
    except Exception as exc:  # noqa: BLE001 - always answer
        return f"# {PROG}: cannot read the configuration: {_one_line(exc)}\n"
    db_path = url or os.path.join(state_dir, "dynprov.db")
    report = wiki.report_file(state_dir)
    try:
        return wiki.refresh(db_path, state_dir, pool, config_path)
    except Exception as exc:  # noqa: BLE001 - a locked or broken database must not fail the poll
        why = f"state database unreadable: {_one_line(exc)}"
        names = []
        try:
            with open(report, encoding="utf-8") as fh:
                names = [ln.split(None, 1)[0] for ln in fh if ln.strip() and ln[0] != "#"]
        except OSError:
            pass
        return f"# {PROG}: {why}\n" + wiki.unknown(names, why)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def build_parser():  # type: ignore[no-untyped-def]  # argparse only when asked (man pages, --help)
    import argparse

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Print one WIKI line per node for Moab's CLUSTERQUERYURL: STATE, OS, OSLIST, "
                    "ARCH, POWER, MESSAGE, UPDATETIME. Moab runs it with no argument on every "
                    "poll. Exit status: 0, also when it cannot make the report (it prints the "
                    "reason as a '#' line: a failing query would make Moab stop provisioning); 2 "
                    "only for bad usage (an unknown option).",
        epilog="A node in a provisioning run is Down (OS=_none) until it reports ready from inside "
               "the new OS; a failed or timed-out node is Down with the reason as MESSAGE; a node "
               "outside the scheduler's pool is Drained; in per-job mode a node that ran a job "
               "reports OS=_used-<os> until re-imaged. The report is cached in "
               "<state_dir>/wiki/nodes.wiki, which a file:// CLUSTERQUERYURL may point at. "
               "Config: --config, else $DYNPROV_CONFIG, else /etc/dynprov/dynprov.toml.")
    p.add_argument("--config", metavar="FILE", help="site configuration (TOML)")
    p.add_argument("--refresh", action="store_true",
                   help="rebuild the report file if it is stale and print nothing (for a timer "
                        "keeping a file:// URL fresh)")
    from pxe.cli.guard import add_debug_flag

    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pxe.cli import guard

    # Always 0 for Moab's poll (2 only for a bad option, which Moab never passes).
    return guard.run(PROG, _main, argv, remap=lambda code: code if code in (0, 2) else 0)


def _main(args: list[str]) -> int:
    config_path = os.environ.get("DYNPROV_CONFIG") or DEFAULT_CONFIG
    refresh_only = False
    if args:  # Moab passes none: the poll never pays for argparse
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit as exc:
            return 0 if exc.code in (0, None) else 2
        config_path = parsed.config or config_path
        refresh_only = parsed.refresh
    out = query(config_path, refresh_only=refresh_only)
    if not refresh_only:
        try:
            sys.stdout.buffer.write(out if isinstance(out, bytes) else out.encode("utf-8"))
            sys.stdout.flush()
        except BrokenPipeError:
            pass
    return 0


def launch() -> int:
    """The installed command's entry: Moab's poll ended the quick way (pxe.cli.guard.launch)."""
    from pxe.cli import guard

    return guard.launch(main, short=True)


if __name__ == "__main__":
    sys.exit(launch())
