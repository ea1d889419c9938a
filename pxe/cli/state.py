"""`pxe-stage state copy`: move a site's state from its SQLite file to PostgreSQL ([state] url)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pxe.cli.common import add_json_flag, load_config, print_json, print_table
from pxe.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "state", help="the state database: copy it from SQLite to PostgreSQL",
        description="The state database: copy a site's SQLite state file into a PostgreSQL "
                    "store ([state] url).",
        epilog="Exit status: 0 ok; 1 refused or failed (the target is left as it was); 2 bad "
               "input.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    cp = verbs.add_parser(
        "copy", help="copy the SQLite state file into a PostgreSQL store",
        description="Copy every table of the SQLite state file (nodes, MACs, images and their "
                    "versions, runs and events, pools, segments, settings, hardware facts, "
                    "discovered machines, agents...) into a PostgreSQL store, all or nothing: "
                    "the schema is created at the file's migration level, the tables are copied "
                    "in one transaction, and each table's row count and checksum are compared "
                    "on both sides before it commits. The file is locked for writing while "
                    "copying; a live pxe-stage serve or run driver (a fresh heartbeat, a "
                    "claimed run node) refuses the copy. The file is read, never changed (an "
                    "older file is first brought to this dynprov's schema, as any command "
                    "does). Then set [state] url on every server.",
        epilog="Exit status: 0 copied and verified; 1 refused (writers active, the target "
               "holds a dynprov state and no --replace, a newer schema) or failed (rolled "
               "back: the target is as it was); 2 bad input (not a PostgreSQL URL, no such "
               "file). The URL's password is never printed.")
    cp.add_argument("--to", metavar="URL",
                    help="the PostgreSQL store, a libpq URL as [state] url takes it (default: "
                         "[state] url of the configuration). Prefer a passfile or peer "
                         "authentication to a password in the URL: the command line is "
                         "visible to every user")
    cp.add_argument("--from", dest="source", metavar="FILE",
                    help="the SQLite state file (default: STATE_DIR/dynprov.db)")
    cp.add_argument("--replace", action="store_true",
                    help="the target already holds a dynprov state: drop its dynprov tables "
                         "(the output lists them with their row counts) and copy over them; "
                         "other tables of the schema are left alone")
    add_json_flag(cp)
    cp.set_defaults(func=cmd_copy)


def cmd_copy(args: argparse.Namespace) -> int:
    from pxe import audit, authz, db, segments, statecopy
    from pxe.config import state_url

    cfg = load_config(args)
    url = args.to if args.to is not None else cfg.state.url
    if not url:
        raise InputError("--to URL: no PostgreSQL store given (and no [state] url in "
                         f"{cfg.path})")
    try:
        url = state_url(url)
    except InputError as exc:
        raise InputError(f"--to: {exc}") from None
    source = Path(args.source) if args.source else cfg.db_path
    if args.to is not None and db.where(url) != url:
        print("pxe-stage: warning: the password in --to is visible to other users in the "
              "process list; prefer a passfile or [state] url", file=sys.stderr)
    result = statecopy.copy(source, url, replace=args.replace,
                            stale_seconds=segments.load(cfg).stale_seconds)
    try:
        audit.append(cfg.paths.state_dir, authz.real_user(), "state-copy", source=result.source,
                     target=result.target, tables=len(result.tables), rows=result.rows)
    except OSError as exc:  # the copy is committed: say so, do not fail it
        print(f"pxe-stage: warning: audit log not written: {exc.strerror}", file=sys.stderr)
    if args.json:
        print_json({"source": result.source, "target": result.target,
                    "schema_version": result.version,
                    "dropped": [{"table": t, "rows": n} for t, n in result.dropped],
                    "tables": [{"table": t.name, "rows": t.rows, "copied": t.copied,
                                "checksum": t.checksum} for t in result.tables]})
        return 0
    if result.dropped:
        print("dropped from the target (--replace): " + ", ".join(
            f"{t} ({n} rows)" for t, n in result.dropped))
    print(f"copied {result.source} (schema version {result.version}) to {result.target}")
    print_table(("TABLE", "SOURCE", "TARGET", "CHECKSUM"),
                [(t.name, t.rows, t.copied, t.checksum[:16]) for t in result.tables])
    print(f"{len(result.tables)} tables, {result.rows} rows: counts and checksums equal on both "
          "sides; committed")
    return 0
