"""`pxe-stage explain NODE`: the boot chain a node will see, checked live (pxe.explain)."""

from __future__ import annotations

import argparse

from pxe.cli.common import add_json_flag, load_config, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="show the boot chain a node will see, each link checked live",
        description="Show the exact boot chain NODE will see: the DHCP answer (backend, mode, "
                    "option values, the config lines), the loader for its firmware, the loader "
                    "config it fetches and its content, the image version it will boot (the "
                    "current version of its label) and the label and version it last booted, "
                    "the kernel/initrd/rootfs with sizes, hashes and paths, the call-home URL "
                    "and its current run. Every file is "
                    "fetched from the running `pxe-stage serve` over TFTP and HTTP the way the "
                    "firmware would, on loopback or a local address only. Each problem is "
                    "printed as a sentence with its fix.",
        epilog="Exit status: 0 no problem found, 1 problems found or unknown node, "
               "2 bad input (e.g. an invalid node name).")
    p.add_argument("node", help="node name")
    p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                   help="seconds to wait for each TFTP packet or HTTP answer (default 2)")
    add_json_flag(p)
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from pxe import explain
    from pxe.errors import InputError

    if not 0.1 <= args.timeout <= 60:
        raise InputError(f"--timeout must be between 0.1 and 60 seconds, got {args.timeout}")
    result = explain.explain(load_config(args), args.node, timeout=args.timeout)
    if args.json:
        print_json(result.as_dict())
    else:
        print(explain.format_text(result))
    return 1 if result.problems else 0
