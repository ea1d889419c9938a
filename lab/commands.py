"""`dynprov-lab up|status|console NODE|down|exec`: the virtual cluster (test and demo hardware)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pxe.cli.common import add_json_flag, load_config, print_json, print_table
from pxe.errors import DynprovError, NotFound


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="virtual cluster of QEMU nodes (tests and demo)",
                       description="A virtual cluster inside a network namespace: one QEMU VM per "
                                   "node behind a virtual IPMI or Redfish BMC or Wake-on-LAN, "
                                   "DHCP from the config `pxe-stage render` writes, boot files "
                                   "from `pxe-stage serve`. The lab plays the hardware only.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    upp = verbs.add_parser("up", help="create the namespace, nodes and BMCs (nodes start off)")
    upp.add_argument("--spec", metavar="FILE",
                     help="lab spec (TOML with a [lab] table); default: the site's [lab] section, "
                          "else three nodes (IPMI/BIOS, Redfish/UEFI, WoL/BIOS)")
    upp.add_argument("--profile", choices=("cluster", "school"),
                     help="school: three Wake-on-LAN workstations (unless the spec lists "
                          "nodes) and a campus DHCP server (ISC dhcpd, addresses only) beside "
                          "dynprov's proxyDHCP; needs [dhcp] mode = \"proxy\"")
    upp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for ready")
    add_json_flag(upp)
    upp.set_defaults(func=cmd_up)

    st = verbs.add_parser("status", help="namespace, services, and each node's power and state")
    add_json_flag(st)
    st.set_defaults(func=cmd_status)

    con = verbs.add_parser("console", help="a node's serial console log (every boot)")
    con.add_argument("node")
    con.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    con.add_argument("--seconds", type=float, default=3600.0,
                     help="stop following after this long (default 3600)")
    con.add_argument("--lines", type=int, default=0, help="only the last N lines (0: all)")
    con.set_defaults(func=cmd_console)

    dn = verbs.add_parser("down", help="stop everything and remove the namespace (also after a "
                                       "crash)")
    dn.set_defaults(func=cmd_down)

    ex = verbs.add_parser("exec", help="run a command inside the lab's namespace (where the BMCs "
                                       "and the provisioning network are)")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    ex.set_defaults(func=cmd_exec)


def cmd_up(args: argparse.Namespace) -> int:
    from lab import cluster

    cfg = load_config(args)
    spec = cluster.load_spec(cfg, args.spec, args.profile)
    state = cluster.up(cfg, spec, ready_timeout=args.timeout)
    if args.json:
        print_json(cluster.status(cfg))
        return 0
    print(f"lab up: namespace {state['netns']}, bridge {state['bridge']} {state['address']}")
    if state.get("registered"):
        print(f"registered in the inventory: {', '.join(state['registered'])}")
    print_table(("NODE", "FW", "MAC", "IP", "POWER CONTROL"),
                [(n["name"], n["firmware"], n["mac"], n["ip"], n["bmc"]) for n in state["nodes"]])
    print("run product commands inside it: dynprov-lab exec -- os-switch ...")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from lab import cluster

    info = cluster.status(load_config(args))
    if args.json:
        print_json(info)
        return 0
    if not info["up"]:
        print("no lab is up")
        return 1
    health = "ready" if info["ready"] and info["supervisor_alive"] else (
        "supervisor gone (run `dynprov-lab down`)" if not info["supervisor_alive"] else
        "starting")
    print(f"lab {info['netns']}: {health}; namespace "
          f"{'present' if info['namespace_exists'] else 'missing'}")
    for name, svc in sorted(info["services"].items()):
        print(f"  {name:<6} pid {svc.get('pid')} {'running' if svc['alive'] else 'stopped'}")
    print_table(("NODE", "POWER", "FW", "IP", "OS", "STATE", "REASON", "CONTROL"),
                [(n["name"], n["power"], n["firmware"], n["ip"], n["os"], n["state"],
                  n["reason"][:40], n["bmc"]) for n in info["nodes"]])
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from lab import cluster

    cfg = load_config(args)
    state = cluster.read_state(cfg)
    if state is None:
        raise NotFound("no lab is up for this site")
    node = next((n for n in state["nodes"] if n["name"] == args.node), None)
    if node is None:
        raise NotFound(f"no lab node {args.node!r} "
                       f"(nodes: {', '.join(n['name'] for n in state['nodes'])})")
    path = Path(node["serial_log"])
    data = path.read_bytes() if path.exists() else b""
    if args.lines > 0:
        data = b"\n".join(data.splitlines()[-args.lines:]) + b"\n"
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    if not args.follow:
        return 0
    pos = path.stat().st_size if path.exists() else 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > pos:
            with open(path, "rb") as fh:
                fh.seek(pos)
                chunk = fh.read(1 << 20)
            pos += len(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        else:
            time.sleep(0.2)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from lab import cluster

    for line in cluster.down(load_config(args)):
        print(line)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from lab import cluster

    cfg = load_config(args)
    state = cluster.read_state(cfg)
    if state is None:
        raise NotFound("no lab is up for this site")
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise DynprovError("lab exec: no command given (dynprov-lab exec -- CMD ...)")
    os.environ["DYNPROV_CONFIG"] = str(cfg.path)
    os.execvp("ip", ["ip", "netns", "exec", state["netns"], *argv])
    return 1  # not reached
