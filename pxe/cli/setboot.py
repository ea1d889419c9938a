"""`pxe-stage set-boot NODES --os LABEL | --local`."""

from __future__ import annotations

import argparse

from pxe import validate
from pxe.cli.common import load_config
from pxe.nodeset import fold
from pxe.setboot import set_boot


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("set-boot", help="choose what nodes boot from the network next",
                       description="Point the nodes' per-MAC boot configs (pxelinux, GRUB, iPXE) "
                                   "at an OS image or at the local disk.")
    p.add_argument("nodes", help="node set, e.g. n[001-016]")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--os", metavar="LABEL", help="boot this image")
    target.add_argument("--local", action="store_true", help="boot the local disk")
    p.set_defaults(func=cmd_set_boot)


def cmd_set_boot(args: argparse.Namespace) -> int:
    if args.os is not None:
        validate.label(args.os, "image label")  # bad input (exit 2) before any lookup
    nodes = set_boot(load_config(args), args.nodes, None if args.local else args.os)
    # The node set as given (folding 10,000 names again costs more than the whole change).
    shown = args.nodes if isinstance(args.nodes, str) else fold(n.name for n in nodes)
    print(f"{shown}: next boot {args.os or 'local disk'} ({len(nodes)} node(s))")
    return 0
