"""`node-power`: Moab's NODEPOWERURL - power nodes on or off.

    node-power NODES ON|OFF
    node-power NODES RESET|REBOOT|CYCLE     (power cycle)
    node-power NODES NODES                  (the same list twice, no verb: a power cycle)

Moab does not check the exit code of this call; it looks for the word ERROR on stdout. So each
node that failed gets ``ERROR: <node>: <reason>`` on stdout, and the exit status is 1 as well.
The last form is how Moab's reboot request arrives (a known bug sends the node list twice and no
verb). A node in a provisioning run is refused: the run owns its power.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

PROG = "node-power"
VERBS = {"on": "on", "off": "off", "reset": "cycle", "reboot": "cycle", "cycle": "cycle"}


def build_parser():  # type: ignore[no-untyped-def]
    import argparse

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Power nodes on, off or cycle them (Moab's NODEPOWERURL).",
        epilog="Exit status: 0 every node done, 1 a node failed (it prints 'ERROR: NODE: REASON' "
               "on stdout, where Moab looks), 2 bad usage. RESET, REBOOT, CYCLE or the node list given "
               "twice mean a power cycle. Config: --config, else $DYNPROV_CONFIG, else "
               "/etc/dynprov/dynprov.toml.")
    p.add_argument("nodes", help="node list: n001,n002 or n[001-016]")
    p.add_argument("verb", help="ON, OFF, RESET, REBOOT, CYCLE, or the node list again")
    p.add_argument("--config", metavar="FILE", help="site configuration (TOML)")
    from pxe.cli.guard import add_debug_flag

    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pxe.cli import guard

    def body(args: list[str]) -> int:
        try:
            return _main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
            if code:
                print(f"ERROR: {PROG}: bad usage")
            return code

    # Moab reads stdout for the word ERROR: failures are said there.
    return guard.run(PROG, body, argv, prefix="ERROR: ", stream=sys.stdout)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from pxe import config, db
    from pxe import run as prun
    from pxe.errors import InputError
    from pxe.nodeset import expand, fold, max_nodes

    cfg = config.load(args.config)
    names = expand(args.nodes, max_nodes(cfg))
    action = VERBS.get(args.verb.strip().lower())
    if action is None:
        try:
            again = expand(args.verb, max_nodes(cfg))
        except InputError:
            again = []
        if again != names:
            raise InputError(f"unknown power verb {args.verb!r}: expected ON, OFF, RESET, "
                             "REBOOT, CYCLE or the node list again")
        action = "cycle"
    conn = db.connect(cfg.database)
    results = prun.power(cfg, conn, names, action)
    bad = {n: e for n, e in results.items() if e}
    for name, error in bad.items():
        print(f"ERROR: {name}: {error}")
    ok = [n for n in names if n not in bad]
    if ok:
        print(f"{fold(ok)}: power {action} done")
    from msm_plugin import wiki

    try:
        wiki.refresh_cfg(cfg)
    except Exception:  # noqa: BLE001 - cluster-query rebuilds it on its next poll anyway
        pass
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
