"""`pxe-stage set-boot NODES --os LABEL | --local`."""

from __future__ import annotations

import argparse

from pxe import validate
from pxe.cli.common import load_config
from pxe.config import Config
from pxe.errors import InputError
from pxe.inventory import Inventory
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
    p.add_argument("--render", action="store_true",
                   help="then run `render` in the same process (one start instead of two; the "
                        "DHCP config is checked and installed only if it changed)")
    p.add_argument("--no-reload", action="store_true",
                   help="with --render: do not run the DHCP reload command")
    p.set_defaults(func=cmd_set_boot)


def cmd_set_boot(args: argparse.Namespace) -> int:
    if args.os is not None:
        validate.label(args.os, "image label")  # bad input (exit 2) before any lookup
    if args.no_reload and not args.render:
        raise InputError("--no-reload is for --render")
    cfg = load_config(args)
    inventory = Inventory(cfg)
    if not args.render:
        _set_boot(cfg, args, inventory)
        return 0
    from pxe import dhcpstep
    from pxe.cli.render import print_report
    from pxe.setboot import render_all

    # A changed DHCP config is rendered and checked while set-boot's transaction runs.
    with dhcpstep.early_start(cfg, inventory.conn) as early:
        _set_boot(cfg, args, inventory)
        print_report(cfg, render_all(cfg, reload=not args.no_reload, inventory=inventory,
                                     early=early))
    return 0


def _set_boot(cfg: Config, args: argparse.Namespace, inventory: Inventory) -> None:
    nodes = set_boot(cfg, args.nodes, None if args.local else args.os, inventory)
    # The node set as given (folding 10,000 names again costs more than the whole change).
    shown = args.nodes if isinstance(args.nodes, str) else fold(n.name for n in nodes)
    print(f"{shown}: next boot {args.os or 'local disk'} ({len(nodes)} node(s))")
