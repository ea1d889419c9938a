"""`pxe-stage segments`: the segments, their nodes and their boot servers' heartbeats."""

from __future__ import annotations

import argparse
import time

from pxe.cli.common import add_json_flag, load_config, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segments", help="segments, their nodes and boot servers (service nodes)",
        description="List each segment with its number of nodes and the boot servers (pxe-stage "
                    "serve) and run drivers that recorded a heartbeat in the state database: "
                    "alive, silent (no heartbeat for [segment] stale_seconds: its nodes in a run "
                    "are shown Down) or stopped. Read only.")
    add_json_flag(p)
    p.set_defaults(func=cmd_segments)


def _status(row, stale: float, now: float) -> str:  # type: ignore[no-untyped-def]
    if row["stopped"] is not None:
        return "stopped"
    return "alive" if now - row["heartbeat"] <= stale else "silent"


def cmd_segments(args: argparse.Namespace) -> int:
    from pxe import db, segments, servers

    cfg = load_config(args)
    stale = segments.load(cfg).stale_seconds
    conn = db.connect(cfg.database)
    now = time.time()
    counts = segments.all_segments(conn)
    rows = servers.listing(conn)
    names = sorted(set(counts) | {r["segment"] for r in rows})
    out = [{"segment": name, "nodes": counts.get(name, 0),
            "servers": [{"name": r["name"], "role": r["role"], "host": r["host"],
                         "pid": r["pid"], "status": _status(r, stale, now),
                         "heartbeat_age": round(now - r["heartbeat"], 1)}
                        for r in rows if r["segment"] == name]} for name in names]
    if args.json:
        print_json(out)
        return 0
    table = []
    for seg in out:
        serve = [s for s in seg["servers"] if s["role"] == servers.SERVE]
        alive = [s for s in serve if s["status"] == "alive"]
        last = min((s["heartbeat_age"] for s in serve), default=None)
        table.append((seg["segment"] or "(primary)", seg["nodes"],
                      ",".join(sorted({s["host"] for s in alive})) or "-",
                      "alive" if alive else ("silent" if serve else "never seen"),
                      "-" if last is None else f"{last:.0f} s",
                      sum(1 for s in seg["servers"]
                          if s["role"] == servers.DRIVER and s["status"] == "alive")))
    print_table(("SEGMENT", "NODES", "SERVED BY", "SERVE", "LAST HEARD", "DRIVERS"), table)
    return 0
