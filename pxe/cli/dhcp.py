"""`pxe-stage dhcp probe`: which DHCP servers answer on the provisioning network, and whether
that suits `[dhcp] mode` (proxy mode needs the campus server; only one may answer boot options)."""

from __future__ import annotations

import argparse
import sys

from pxe.cli.common import load_config, print_json
from pxe.errors import DynprovError

PROBE_MAC = "02:64:79:6e:00:01"  # locally administered: a client that is nobody's node


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dhcp", help="check the DHCP servers on the provisioning network",
                       description="Look at what answers DHCP on the provisioning network.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    pr = verbs.add_parser("probe", help="broadcast one PXE DISCOVER and judge the answers",
                          description="Broadcast one DHCPDISCOVER shaped like a BIOS PXE ROM's "
                                      "on network.interface, collect the offers of every "
                                      "server but our own (network.server), and say whether "
                                      "they suit [dhcp] mode: proxy mode needs a server that "
                                      "hands out addresses and no other server answering boot "
                                      "options; server mode needs no other server at all.")
    pr.add_argument("--interface", help="interface to probe (default: network.interface)")
    pr.add_argument("--mac", default=PROBE_MAC,
                    help=f"client MAC to ask with (default {PROBE_MAC}, a locally "
                         "administered address)")
    pr.add_argument("--wait", type=float, default=3.0,
                    help="seconds to collect offers (default 3, at most 30)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=cmd_probe)


def _interface(value: str) -> str:
    """--interface, checked as network.interface is (a name, never a path), and said so."""
    from pxe import validate

    return validate.interface(value, "--interface")


def cmd_probe(args: argparse.Namespace) -> int:
    from pxe import validate
    from pxe.dhcp import probe

    cfg = load_config(args)
    iface = _interface(args.interface) if args.interface else cfg.network.interface
    mac = validate.mac(args.mac)
    if not 0 < args.wait <= 30:
        from pxe.errors import InputError

        raise InputError(f"--wait must be between 0 and 30 seconds, got {args.wait:g}")
    result = probe.probe(iface, mac, wait=args.wait, ignore=(cfg.network.server,))
    problems = probe.verdict(cfg, result)
    if args.json:
        print_json({"interface": iface, "mode": cfg.dhcp.mode, "problems": problems,
                    "offers": [o.__dict__ for o in result.offers]})
    else:
        for o in result.offers:
            print(f"{o.server}: address {o.address or '-'}; boot "
                  f"{', '.join(o.boot) if o.boot else '-'}")
        if not result.offers:
            print(f"no other DHCP server answered on {iface}")
    if problems:
        for line in problems[1:]:
            print(f"pxe-stage: {line}", file=sys.stderr)
        raise DynprovError(problems[0])
    print(f"{iface}: fits [dhcp] mode = \"{cfg.dhcp.mode}\"")
    return 0
