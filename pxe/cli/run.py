"""`pxe-stage run start|cancel|wait|list|show`: provisioning runs without a scheduler.

For admins and sites with no workload manager: the same entry point the scheduler faces use
(pxe.provision), and the history of runs with each node's steps and times from the state
database.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

from pxe.cli.common import add_json_flag, load_config, print_json, print_table
from pxe.errors import InputError

EXIT_OK, EXIT_FAILED = 0, 1
MAX_LIMIT = 100_000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="start, cancel, wait for and list provisioning runs",
        description="Provisioning runs without a scheduler: switch nodes to an OS image (the "
                    "same request os-switch and the REST service make), cancel, wait, and read "
                    "the history of runs with each node's steps and times.",
        epilog="Exit status: 0 ok; 1 a node was refused, or (with --wait, wait) did not end "
               "ready; 2 bad input. A run ID is a number; NODES a node set, e.g. n[001-016].")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = verbs.add_parser("start", help="switch nodes to an OS image",
                         description="Record a run and start the run driver; returns at once "
                                     "unless --wait.")
    s.add_argument("nodes", help="node set, e.g. n[001-016]")
    s.add_argument("--os", required=True, metavar="LABEL", help="image label")
    s.add_argument("--wait", action="store_true",
                   help="block until every node is out of the run (bounded by its deadline)")
    s.add_argument("--force", action="store_true",
                   help="re-image nodes already running LABEL (on-demand mode skips them)")
    s.add_argument("--pool", metavar="POOL", help="refuse nodes outside this resource pool")
    s.add_argument("--max-seconds", type=float, metavar="S",
                   help="cap each node's deadline (default: the image's prov_seconds)")
    add_json_flag(s)
    s.set_defaults(func=cmd_start)

    c = verbs.add_parser("cancel", help="cancel a run, or the runs of some nodes",
                         description="Nodes still in the run end 'cancelled'; their next boot is "
                                     "the local disk again.")
    c.add_argument("target", metavar="RUN|NODES", help="a run ID or a node set")
    add_json_flag(c)
    c.set_defaults(func=cmd_cancel)

    w = verbs.add_parser("wait", help="block until a run (or some nodes' runs) ended",
                         description="Bounded by the nodes' deadlines; prints each node's end.")
    w.add_argument("target", metavar="RUN|NODES", help="a run ID or a node set")
    add_json_flag(w)
    w.set_defaults(func=cmd_wait)

    ls = verbs.add_parser("list", help="runs, newest first, with their nodes' states",
                          description="A node past its deadline shows as 'timed out' even "
                                      "before the driver records it.")
    ls.add_argument("--active", action="store_true", help="only runs not yet finished")
    ls.add_argument("--limit", type=int, default=50, metavar="N", help="at most N runs (50)")
    add_json_flag(ls)
    ls.set_defaults(func=cmd_list)

    sh = verbs.add_parser("show", help="one run: each node's steps with their times",
                          description="The run's nodes, their state and reason, and every step "
                                      "(request, power, the node's reports, timeouts) with its "
                                      "time.")
    sh.add_argument("run_id", metavar="RUN", help="run ID")
    sh.add_argument("--console-lines", type=int, default=40, metavar="N",
                    help="per node, the last N console log lines inside the run's time window "
                         "(from `serve --console-log` or `console NODE --log`; 0: only where "
                         "they are: file and line numbers); default 40")
    add_json_flag(sh)
    sh.set_defaults(func=cmd_show)


def _run_id(text: str) -> int | None:
    """A run ID (digits), or None when the text is not one (a node set)."""
    if text.isdigit():
        if len(text) > 12:
            raise InputError(f"invalid run id {text!r}")
        return int(text)
    return None


def _time(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _results(results: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print_json({n: vars(r) for n, r in results.items()})
    else:
        print_table(("NODE", "RUN", "STATE", "REASON"),
                    [(r.node, r.run_id, r.state, r.reason) for r in results.values()])
    return EXIT_OK if all(r.state == "ready" for r in results.values()) else EXIT_FAILED


def cmd_start(args: argparse.Namespace) -> int:
    from pxe import provision

    if args.max_seconds is not None and not 1 <= args.max_seconds <= 86400:
        raise InputError(f"--max-seconds {args.max_seconds:g}: expected 1..86400")
    cfg = load_config(args)
    started = provision.start(cfg, args.nodes, args.os, force=args.force, pool=args.pool,
                              max_seconds=args.max_seconds)
    if not args.json:
        for line in started.summary():
            print(line)
        for line in started.refusals():
            print(f"pxe-stage: {line}", file=sys.stderr)
        sys.stdout.flush()
    if args.wait and (started.started or started.joined):
        started.results = provision.wait(cfg, [*started.started, *started.joined])
        if not args.json:
            _results(started.results, False)
    if args.json:
        print_json(started.as_dict())
    return EXIT_OK if started.ok else EXIT_FAILED


def cmd_cancel(args: argparse.Namespace) -> int:
    from pxe import provision
    from pxe.nodeset import fold

    cfg = load_config(args)
    run_id = _run_id(args.target)
    cancelled = (provision.cancel_run(cfg, run_id) if run_id is not None
                 else provision.cancel(cfg, args.target))
    if args.json:
        print_json({"cancelled": cancelled})
    elif cancelled:
        print(f"{fold(cancelled)}: provisioning cancelled")
    else:
        print("no node was in a run to cancel")
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    from pxe import provision

    cfg = load_config(args)
    run_id = _run_id(args.target)
    return _results(provision.wait(cfg, run_id if run_id is not None else args.target),
                    args.json)


def cmd_list(args: argparse.Namespace) -> int:
    from pxe import provision

    if not 1 <= args.limit <= MAX_LIMIT:
        raise InputError(f"--limit {args.limit}: expected 1..{MAX_LIMIT}")
    runs = provision.runs(load_config(args), active=args.active, limit=args.limit)
    if args.json:
        print_json(runs)
        return EXIT_OK
    print_table(("RUN", "OS", "STATE", "CREATED", "FINISHED", "NODES", "STEPS"),
                [(r["id"], r["label"], r["state"], _time(r["created"]), _time(r["finished"]),
                  f"{r['done']}/{r['total']} done",
                  ", ".join(f"{k}: {v}" for k, v in sorted(r["steps"].items())))
                 for r in runs])
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from pxe import provision

    run_id = _run_id(args.run_id)
    if run_id is None:
        raise InputError(f"invalid run id {args.run_id!r}: expected a number")
    if not 0 <= args.console_lines <= MAX_LIMIT:
        raise InputError(f"--console-lines {args.console_lines}: expected 0..{MAX_LIMIT}")
    cfg = load_config(args)
    run = provision.show(cfg, run_id)
    consoles = _consoles(cfg, run, args.console_lines)
    if args.json:
        for member in run["nodes"]:
            member["console"] = consoles.get(member["node"])
        print_json(run)
        return EXIT_OK
    print(f"run {run['id']}: {run['label']} ({run['mode']}), {run['state']}; created "
          f"{_time(run['created'])}, finished {_time(run['finished'])}")
    print_table(("NODE", "STATE", "VERSION", "DEADLINE", "REASON"),
                [(n["node"], n["state"], n.get("image_version") or "-", _time(n["deadline"]),
                  n["reason"]) for n in run["nodes"]])
    for node in run["nodes"]:
        print(f"\n{node['node']}:")
        start = node["steps"][0]["ts"] if node["steps"] else None
        for step in node["steps"]:
            offset = f"+{step['ts'] - start:.1f}s" if start is not None else ""
            detail = f"  {step['detail']}" if step["detail"] else ""
            print(f"  {_time(step['ts'])} {offset:>8}  {step['kind']}{detail}")
        _print_console(consoles.get(node["node"]))
    return EXIT_OK


def _consoles(cfg: Any, run: dict[str, Any], limit: int) -> dict[str, Any]:
    import time

    from pxe import console_log

    return console_log.for_run(cfg.paths.state_dir, run, limit=limit, now=time.time())


def _print_console(console: dict[str, Any] | None) -> None:
    """The node's console lines of the run: where they are, then the last ones."""
    if not console or not console["count"]:
        return
    where = ", ".join(f"{f['file']} lines {f['first_line']}-{f['last_line']}"
                      for f in console["files"])
    shown = len(console["lines"])
    print(f"  console: {console['count']} lines in this run ({where})"
          + (f"; the last {shown}:" if shown else ""))
    for line in console["lines"]:
        print(f"    {_time(line['ts'])} | {line['text']}")
