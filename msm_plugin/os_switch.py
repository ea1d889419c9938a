"""`os-switch`: Moab's NODEMODIFYURL - start re-imaging nodes, return at once.

    os-switch NODES --set OS=LABEL [--force] [--wait]
    os-switch NODES --clear OS
    os-switch NODES --set POWER=on|off

Moab blocks its whole scheduling loop on this call, so it only checks and records: unknown node,
unknown label, a label not in the node's OSLIST (the images for its architecture), a node outside
the scheduler's pool, a node already in a run for another OS -> one line per node on stderr and
exit 1; the other nodes of the call still start (a re-sent call finds them in their run and is
accepted: Moab re-sends aggregated calls that failed). Bad usage (malformed --set, empty node
list) exits 2 and starts nothing. The same request for a node already in a run for that OS is
accepted (exit 0) and starts no second run. The request goes through the toolkit's entry point
(pxe.provision.start); the work itself runs in the detached run driver, and later failures
reach Moab through cluster-query (Down + MESSAGE).

Never exit 4 (Moab reads it as "the resource manager died"); never print the word ERROR on
stderr on success (Moab's CHILDSTDERRCHECK); stdout carries one informational line per node.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pxe.cli.guard import add_debug_flag
from pxe.errors import InputError

PROG = "os-switch"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Point nodes' network boot at an OS image and power-cycle them (Moab's "
                    "NODEMODIFYURL). Returns as soon as the request is recorded; the "
                    "provisioning run proceeds in the background and cluster-query reports it.",
        epilog="Attributes: OS=LABEL (also os=LABEL), POWER=on|off; --clear OS cancels a run. "
               "In on-demand mode nodes already running LABEL and healthy are left alone; in "
               "per-job mode (fg-moab -mode perjob) every node is re-imaged. Each node must "
               "report ready within its image's prov_seconds, capped at PROVDURATION minus "
               "[moab] margin, or it is timed out. Exit status: 0 accepted, 1 some node refused "
               "or failed (one line per node on stderr), 2 bad usage; never 4. "
               "Config: --config, else $DYNPROV_CONFIG, else /etc/dynprov/dynprov.toml.")
    p.add_argument("nodes", nargs="?", default="", help="node list: n001,n002 or n[001-016]")
    p.add_argument("--set", action="append", default=[], metavar="ATTR=VALUE",
                   help="OS=LABEL or POWER=on|off")
    p.add_argument("--clear", action="append", default=[], metavar="ATTR",
                   help="OS: cancel the nodes' provisioning runs")
    p.add_argument("--force", action="store_true",
                   help="re-image even nodes already running the OS")
    p.add_argument("--wait", action="store_true",
                   help="block until the run ends and print each node's result (for admins)")
    p.add_argument("--config", metavar="FILE", help="site configuration (TOML)")
    add_debug_flag(p)
    return p


def parse_action(sets: Sequence[str], clears: Sequence[str]) -> tuple[str, str]:
    """('os', LABEL) | ('power', on|off) | ('clear', 'os'); InputError when malformed."""
    from pxe import validate

    if len(sets) + len(clears) != 1:
        raise InputError("give exactly one --set OS=LABEL, --set POWER=on|off or --clear OS")
    if clears:
        if clears[0].strip().upper() != "OS":
            raise InputError(f"malformed --clear {clears[0]!r}: only OS can be cleared")
        return "clear", "os"
    item = sets[0]
    attr, eq, value = item.partition("=")
    attr, value = attr.strip().upper(), value.strip()
    if not eq or not attr or not value:
        raise InputError(f"malformed --set {item!r}: expected OS=LABEL or POWER=on|off")
    if attr == "OS":
        return "os", validate.label(value, "OS label")
    if attr == "POWER":
        if value.lower() not in ("on", "off"):
            raise InputError(f"malformed --set {item!r}: POWER must be on or off")
        return "power", value.lower()
    raise InputError(f"malformed --set {item!r}: unknown attribute {attr} (OS or POWER)")


def main(argv: Sequence[str] | None = None) -> int:
    from pxe.cli import guard

    # Whatever happens, Moab sees one line and never exit 4 ("resource manager died").
    return guard.run(PROG, _main, argv, remap=lambda code: EXIT_FAILED if code == 4 else code)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    action, value = parse_action(args.set, args.clear)
    from msm_plugin.fg_moab import settings
    from pxe import config, db, provision
    from pxe import run as prun
    from pxe.nodeset import expand, fold, max_nodes
    from pxe.pools import scheduler_pool

    cfg = config.load(args.config)
    # InputError (exit 2) for an empty, malformed or oversized list, counted before expanding
    names = expand(args.nodes, max_nodes(cfg))
    ms = settings(cfg)
    conn = db.connect(cfg.database)

    if action == "power":
        results = prun.power(cfg, conn, names, value)
        bad = {n: e for n, e in results.items() if e}
        for name, error in bad.items():
            print(f"{name}: {error}", file=sys.stderr)
        ok = [n for n in names if n not in bad]
        if ok:
            print(f"{fold(ok)}: power {value}")
        return EXIT_FAILED if bad else EXIT_OK

    if action == "clear":
        cancelled = provision.cancel(cfg, names)
        print(f"{fold(cancelled)}: provisioning cancelled" if cancelled
              else f"{fold(names)}: no provisioning run to cancel")
        return EXIT_OK  # the report is rewritten through pxe.hooks by provision.cancel

    conn.close()
    req = provision.start(cfg, names, value, force=args.force,
                          max_seconds=ms.max_run_seconds, pool=scheduler_pool(cfg))
    for line in req.summary():
        print(line)
    for line in req.refusals():  # bare: Moab's CHILDSTDERRCHECK reads these
        print(line, file=sys.stderr)
    if args.wait and (req.started or req.joined):
        req.results = provision.wait(cfg, [*req.started, *req.joined])
        for name in [*req.started, *req.joined]:
            res = req.results.get(name)
            state = res.state if res else "unknown"
            reason = f": {res.reason}" if res and res.reason else ""
            print(f"{name}: {state}{reason}")
    return EXIT_OK if req.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
