"""`fg-pool`: move nodes between resource pools (HPC scheduler, OpenStack, other services).

The original FutureGrid syntax (single dash) is kept; every option also has a --long form:
    fg-pool -create NAME
    fg-pool -list [NAME] [--json]
    fg-pool [-from FROM] -to TO -resource NODES [-force]
    fg-pool -delete NAME
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from pxe import config, db, pools
from pxe.cli.common import print_json, print_table
from pxe.nodeset import expand, fold, max_nodes

PROG = "fg-pool"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, allow_abbrev=False,
        usage=f"{PROG} -create NAME\n"
              f"       {PROG} -list [NAME] [--json]\n"
              f"       {PROG} [-from FROM] -to TO -resource NODES [-force] [--json]\n"
              f"       {PROG} -delete NAME\n"
              f"       (every option also has a --long form; --config FILE; --help)",
        description="Move cluster nodes between resource pools. Only nodes in the scheduler's "
                    "pool (config groups.scheduler_pool, default hpc) are offered to Moab.",
        epilog="Changes need root or membership of the group in config groups.pool (default "
               "fgpool; through sudo, SUDO_USER's groups count) and are appended to "
               "<state_dir>/audit.log (who, when, nodes, from, to). A move is all or nothing. "
               "A busy node stops the move unless -force is given: one in a provisioning run "
               "(state requested, power-cycled or booting), one running a job (state busy or "
               "running), or one that ran a job since its last re-image. Nodes already in TO "
               "are left alone and reported. Exit status: 0 ok (also when there was nothing to "
               "do), 1 failed, 2 bad usage or input.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("-create", "--create", metavar="NAME", help="create a pool")
    action.add_argument("-list", "--list", nargs="?", const="", metavar="NAME",
                        help="list the pools with node counts, or the nodes in pool NAME")
    action.add_argument("-to", "--to", metavar="TO", help="move -resource NODES to pool TO")
    action.add_argument("-delete", "--delete", metavar="NAME", help="delete an empty pool")
    parser.add_argument("-from", "--from", dest="from_pool", metavar="FROM",
                        help="with -to: move only if every node is in FROM now (all or nothing)")
    parser.add_argument("-resource", "--resource", metavar="NODES",
                        help="with -to: the nodes, in node-set notation (n[001-016],gpu1)")
    parser.add_argument("-force", "--force", action="store_true",
                        help="with -to: move nodes even if provisioning or running a job")
    parser.add_argument("-json", "--json", action="store_true", help="machine-readable output")
    parser.add_argument("-server", "--server", metavar="URL",
                        help="use the dynprov service at https://HOST:PORT instead of the "
                             "local state (default: $DYNPROV_SERVER)")
    parser.add_argument("--config", metavar="FILE",
                        help="site configuration (default $DYNPROV_CONFIG, else "
                             "/etc/dynprov/dynprov.toml)")
    from pxe.cli.guard import add_debug_flag

    add_debug_flag(parser)
    return parser


def _check_combination(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.to is None:
        for given, flag in ((args.from_pool, "-from"), (args.resource, "-resource"),
                            (args.force or None, "-force")):
            if given is not None:
                parser.error(f"{flag} goes with -to")
    elif args.resource is None:
        parser.error("-to needs -resource NODES")


def _reject_unknown_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Only exact option names: Python 3.11's argparse still expands abbreviations of
    single-dash options (-cr -> -create) despite allow_abbrev=False."""
    known = {s for action in parser._actions for s in action.option_strings}
    for arg in argv:
        if arg == "--":
            return
        if arg.startswith("-") and arg.split("=", 1)[0] not in known:
            parser.error(f"unknown option {arg!r}")


def main(argv: Sequence[str] | None = None) -> int:
    from pxe.cli import guard

    def body(args: list[str]) -> int:
        parser = build_parser()
        _reject_unknown_options(parser, args)
        parsed = parser.parse_args(args)
        _check_combination(parser, parsed)
        return _run(parsed)

    return guard.run(PROG, body, argv)


def _run(args: argparse.Namespace) -> int:
    from pxe import remote

    client = remote.resolve(args.server)
    if client is not None:
        return _run_remote(client, args)
    cfg = config.load(args.config)
    user = pools.authorize(cfg) if args.list is None else None  # before touching any state
    conn = db.connect(cfg.database)
    try:
        if args.list == "":
            listed = pools.list_pools(cfg, conn)
            if args.json:
                print_json([p.public() for p in listed])
            else:
                print_table(("POOL", "NODES", "SCHEDULER"),
                            [(p.name, p.nodes, "yes" if p.scheduler else "") for p in listed])
        elif args.list is not None:
            ordered = (expand(names, max_nodes(cfg))
                       if (names := pools.members(cfg, conn, args.list)) else [])
            if args.json:
                print_json({"pool": args.list, "nodeset": fold(ordered) if ordered else "",
                            "count": len(ordered), "nodes": ordered,
                            "scheduler": pools.is_usable_for_scheduler(cfg, args.list)})
            elif ordered:
                print(fold(ordered))
        elif user is None:  # unreachable: every change was authorised above
            raise AssertionError("change without an authorised user")
        elif args.create is not None:
            pools.create(cfg, conn, args.create, user=user)
            _say(args, {"created": args.create}, f"created pool {args.create}")
        elif args.delete is not None:
            pools.delete(cfg, conn, args.delete, user=user)
            _say(args, {"deleted": args.delete}, f"deleted pool {args.delete}")
        else:
            result = pools.move(cfg, conn, args.resource, args.to, user=user,
                                from_pool=args.from_pool, force=args.force)
            _say(args, result.public(), _describe(result))
    finally:
        conn.close()
    return 0


def _run_remote(client, args: argparse.Namespace) -> int:
    """The same actions and output, through the service (pxe/api)."""
    from urllib.parse import quote

    if args.list == "":
        listed = client.get("/api/v1/pools")
        if args.json:
            print_json(listed)
        else:
            print_table(("POOL", "NODES", "SCHEDULER"),
                        [(p["name"], p["nodes"], "yes" if p["scheduler"] else "") for p in listed])
    elif args.list is not None:
        data = client.get(f"/api/v1/pools/{quote(args.list, safe='')}")
        if args.json:
            print_json(data)
        elif data["nodes"]:
            print(data["nodeset"])
    elif args.create is not None:
        client.post("/api/v1/pools", {"name": args.create})
        _say(args, {"created": args.create}, f"created pool {args.create}")
    elif args.delete is not None:
        client.delete(f"/api/v1/pools/{quote(args.delete, safe='')}")
        _say(args, {"deleted": args.delete}, f"deleted pool {args.delete}")
    else:
        body = {"nodes": args.resource, "force": args.force}
        if args.from_pool is not None:
            body["from"] = args.from_pool
        d = client.post(f"/api/v1/pools/{quote(args.to, safe='')}/move", body)
        result = pools.MoveResult(to=d["to"], moved=tuple(d["moved"]),
                                  already=tuple(d["already"]),
                                  sources={p: tuple(n) for p, n in d["from"].items()},
                                  forced=dict(d["forced"]))
        _say(args, result.public(), _describe(result))
    return 0


def _describe(result: pools.MoveResult) -> str:
    parts = []
    if result.moved:
        sources = ", ".join(f"{fold(ns)} from {p}" for p, ns in result.sources.items())
        parts.append(f"moved {len(result.moved)} node(s) to {result.to}: {sources}")
        if result.forced:
            parts.append(f"forced: {pools.describe_reasons(result.forced)}")
    if result.already:
        parts.append(f"{fold(result.already)} already in pool {result.to}: nothing to do")
    return "\n".join(parts)


def _say(args: argparse.Namespace, data: object, text: str) -> None:
    if args.json:
        print_json(data)
    else:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
