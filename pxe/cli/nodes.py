"""`pxe-stage nodes add|set|list|show|remove|import|export|discovered|adopt`."""

from __future__ import annotations

import argparse
import sys

from pxe import remote
from pxe.cli.common import add_json_flag, load_config, print_json, print_table
from pxe.inventory import FIELDS, Inventory, build, export, load_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nodes", help="node inventory", description="Manage the node inventory.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    add = verbs.add_parser("add", help="add one node")
    add.add_argument("name")
    add.add_argument("--mac", action="append", required=True,
                     help="MAC address (repeat for several NICs); any common spelling")
    add.add_argument("--ip", help="fixed IPv4 address inside the provisioning subnet")
    add.add_argument("--arch", default="x86_64", choices=("x86_64", "aarch64"))
    add.add_argument("--firmware", default="bios", choices=("bios", "uefi"))
    add.add_argument("--bmc-type", default="none", choices=("ipmi", "redfish", "wol", "none"))
    add.add_argument("--bmc-address")
    add.add_argument("--bmc-port", type=int)
    add.add_argument("--bmc-user")
    add.add_argument("--bmc-secret", metavar="REF",
                     help="key in the BMC secrets file, or file:/path (never the password)")
    add.add_argument("--groups", help="comma-separated groups")
    add.add_argument("--pool", help="resource pool (default: the scheduler's pool)")
    add.add_argument("--segment", metavar="NAME",
                     help="the boot server's segment (`pxe-stage serve --segment NAME`); "
                          "default: the primary's")
    add.set_defaults(func=cmd_add)

    put = verbs.add_parser(
        "set", help="change nodes' segment",
        description="Move nodes to another segment: the service node started with `pxe-stage "
                    "serve --segment NAME` serves them from now on (boot configs at once; run "
                    "`pxe-stage render --segment NAME` on both servers for DHCP). All or nothing.")
    put.add_argument("nodes", help="node set, e.g. n[001-016]")
    put.add_argument("--segment", metavar="NAME", required=True,
                     help="segment name; '' moves the nodes back to the primary's")
    put.set_defaults(func=cmd_set)

    lst = verbs.add_parser("list", help="list nodes")
    lst.add_argument("nodes", nargs="?", help="node set, e.g. n[001-016]")
    add_json_flag(lst)
    remote.add_server_flag(lst)
    lst.set_defaults(func=cmd_list)

    show = verbs.add_parser("show", help="show nodes in full")
    show.add_argument("nodes", help="node set")
    add_json_flag(show)
    remote.add_server_flag(show)
    show.set_defaults(func=cmd_show)

    rm = verbs.add_parser("remove", help="remove nodes")
    rm.add_argument("nodes", help="node set")
    rm.set_defaults(func=cmd_remove)

    imp = verbs.add_parser("import", help="import a CSV or YAML node list (all or nothing)")
    imp.add_argument("file")
    imp.add_argument("--format", choices=("csv", "yaml"), help="default: by file extension")
    imp.add_argument("--replace", action="store_true", help="update nodes that already exist")
    imp.set_defaults(func=cmd_import)

    exp = verbs.add_parser("export", help="write the inventory as CSV or YAML to stdout")
    exp.add_argument("--format", choices=("csv", "yaml"), default="csv")
    exp.set_defaults(func=cmd_export)

    disc = verbs.add_parser(
        "discovered", help="machines that PXE-booted with an unknown MAC ([discovery] enabled)",
        description="List the machines that booted the discovery image because the inventory "
                    "does not know their MAC, with the hardware they reported. Nothing becomes "
                    "a node until `pxe-stage nodes adopt`. --forget drops machines from the "
                    "list (e.g. after a flood filled [discovery] max_machines); one that boots "
                    "again reports again.")
    add_json_flag(disc)
    forget = disc.add_mutually_exclusive_group()
    forget.add_argument("--forget", action="append", metavar="MAC",
                        help="drop this machine from the list (repeat for several)")
    forget.add_argument("--forget-all", action="store_true",
                        help="drop every machine from the list")
    disc.set_defaults(func=cmd_discovered)

    adopt = verbs.add_parser(
        "adopt", help="turn a discovered machine into a node",
        description="Add the discovered machine with MAC as node NAME (its other NICs' MACs "
                    "come along, its firmware and hardware facts too). Name, MAC and IP are "
                    "checked like `nodes add`; a taken one is refused and nothing changes. Then "
                    "`pxe-stage render` gives it its DHCP entry.")
    adopt.add_argument("mac", help="the MAC it reported (see `pxe-stage nodes discovered`)")
    adopt.add_argument("--name", required=True, help="the new node's name, e.g. n017")
    adopt.add_argument("--ip", help="fixed IPv4 address inside the provisioning subnet")
    adopt.add_argument("--firmware", choices=("bios", "uefi"),
                       help="default: what the machine reported")
    adopt.add_argument("--bmc-type", choices=("ipmi", "redfish", "wol", "none"))
    adopt.add_argument("--bmc-address")
    adopt.add_argument("--bmc-user")
    adopt.add_argument("--bmc-secret", metavar="REF",
                       help="key in the BMC secrets file, or file:/path (never the password)")
    adopt.add_argument("--pool", help="resource pool (default: the scheduler's pool)")
    adopt.set_defaults(func=cmd_adopt)


def cmd_add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    raw = {"name": args.name, "macs": args.mac, "ip": args.ip, "arch": args.arch,
           "firmware": args.firmware, "bmc_type": args.bmc_type, "bmc_address": args.bmc_address,
           "bmc_port": args.bmc_port, "bmc_user": args.bmc_user, "bmc_secret": args.bmc_secret,
           "groups": args.groups, "pool": args.pool, "segment": args.segment}
    node = build(cfg, {k: v for k, v in raw.items() if v is not None})
    Inventory(cfg).add([node])
    print(f"added {node.name} ({', '.join(node.macs)}{', ' + node.ip if node.ip else ''})")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from pxe import segments

    cfg = load_config(args)
    segment = args.segment if args.segment == segments.PRIMARY else \
        segments.check_name(args.segment)  # checked before the node set is even expanded
    inv = Inventory(cfg)
    names = [n.name for n in inv.select(args.nodes)]
    segments.assign(inv.conn, names, segment)
    print(f"{len(names)} node(s) now in segment {segment or '(primary)'}; run `pxe-stage render "
          f"--segment` on the servers involved to move their DHCP entries")
    return 0


def _read(args: argparse.Namespace, spec: str | None) -> list:
    client = remote.for_args(args)
    if client is not None:
        return remote.nodes(client, spec)
    inv = Inventory(load_config(args))
    return inv.select(spec) if spec else inv.all()


def cmd_list(args: argparse.Namespace) -> int:
    nodes = _read(args, args.nodes)
    if args.json:
        print_json([n.public() for n in nodes])
        return 0
    print_table(("NODE", "MAC", "IP", "FW", "BMC", "POOL", "OS", "NEXT BOOT", "STATE"),
                [(n.name, n.macs[0] if n.macs else "", n.ip, n.firmware, n.bmc_type, n.pool,
                  n.current_os, n.desired_os if n.boot_target == "os" else "local", n.state)
                 for n in nodes])
    return 0


def _read_with_facts(args: argparse.Namespace, spec: str) -> tuple[list, dict[str, dict]]:
    """Nodes and the hardware facts they reported (pxe.hwfacts), locally or from the service."""
    client = remote.for_args(args)
    if client is not None:
        return remote.nodes_with_facts(client, spec)
    from pxe import db, hwfacts

    nodes = _read(args, spec)
    return nodes, hwfacts.load(db.connect(load_config(args).database), [n.name for n in nodes])


def cmd_show(args: argparse.Namespace) -> int:
    nodes, facts = _read_with_facts(args, args.nodes)
    if args.json:
        print_json([n.public() | {"hardware": facts.get(n.name)} for n in nodes])
        return 0
    from pxe.hwfacts import summary

    for i, n in enumerate(nodes):
        if i:
            print()
        lines = {**n.public(), **summary(facts.get(n.name, {}))}
        if n.name not in facts:
            lines["hardware"] = "not reported yet (sent at the node's next dynprov boot)"
        for key, value in lines.items():
            if isinstance(value, list):
                value = ",".join(value)
            print(f"{key:<13} {'-' if value in (None, '') else value}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    inv = Inventory(load_config(args))
    names = [n.name for n in inv.select(args.nodes)]
    inv.remove(names)
    print(f"removed {len(names)} node(s); run `pxe-stage render` to update DHCP")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    nodes = load_file(cfg, args.file, args.format)
    Inventory(cfg).add(nodes, replace_existing=args.replace)
    print(f"imported {len(nodes)} node(s) from {args.file}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    inv = Inventory(load_config(args))
    sys.stdout.write(export(inv.all(), args.format))
    return 0


def cmd_discovered(args: argparse.Namespace) -> int:
    import time

    from pxe import db, discovery

    if args.forget or args.forget_all:
        gone = discovery.forget(load_config(args), None if args.forget_all else args.forget)
        print(f"forgot {gone} discovered machine(s)")
        return 0
    rows = discovery.listing(db.connect(load_config(args).database))
    if args.json:
        print_json(rows)
        return 0

    def when(ts: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))

    print_table(("MAC", "IP", "CPUS", "MEMORY", "DISKS", "NICS", "SERIAL", "LAST SEEN", "REPORTS"),
                [(r["mac"], r["ip"], r["facts"].get("cpus"),
                  f"{r['facts']['memory_mib']} MiB" if r["facts"].get("memory_mib") else None,
                  len(r["facts"].get("disks", [])), len(r["facts"].get("nics", [])),
                  r["facts"].get("serial"), when(r["last_seen"]), r["reports"]) for r in rows])
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    from pxe import discovery, validate

    validate.mac(args.mac)
    validate.hostname(args.name)  # bad input (2) before "no such discovered machine" (1)

    extra = {"firmware": args.firmware, "bmc_type": args.bmc_type,
             "bmc_address": args.bmc_address, "bmc_user": args.bmc_user,
             "bmc_secret": args.bmc_secret, "pool": args.pool}
    node, left_out = discovery.adopt(load_config(args), args.mac, args.name, args.ip,
                                     {k: v for k, v in extra.items() if v is not None})
    print(f"adopted {node.macs[0]} as {node.name} ({', '.join(node.macs)}"
          f"{', ' + node.ip if node.ip else ''}, {node.firmware}); run `pxe-stage render` to "
          "give it its DHCP entry")
    for mac, owner in left_out.items():
        print(f"note: its NIC {mac} was left out: that MAC belongs to node {owner}")
    return 0


__all__ = ["register", "FIELDS"]
