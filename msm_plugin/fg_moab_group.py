"""`fg-moab-group`: who may change the image repository (translation only; logic in
pxe.groupadmin).

    fg-moab-group -add USER | -remove USER | -list   [-config FILE]

The group is ``[groups] image`` of the site configuration (default ``fgimage``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "fg-moab-group"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, add_help=False,
        description="Add or remove members of the unix group that may change the image "
                    "repository (fg-moab-image), or list them.",
        epilog="-add creates the group if it does not exist. Changing members needs root. "
               "A user's new membership counts from their next login (sudo checks it at once). "
               "Exit status: 0 ok, 1 failed, 2 bad usage or input.")
    p.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    acts = p.add_mutually_exclusive_group(required=True)
    acts.add_argument("-add", "--add", metavar="USER", help="add USER to the group")
    acts.add_argument("-remove", "--remove", metavar="USER", help="remove USER from the group")
    acts.add_argument("-list", "--list", action="store_true", help="list the members")
    p.add_argument("-config", "--config", metavar="FILE", help="site configuration (TOML)")
    from pxe.cli.guard import add_debug_flag

    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pxe.cli import guard

    return guard.run(PROG, _main, argv)


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from pxe import audit, authz, groupadmin, repository

    cfg = repository.load_config(args.config)
    group = cfg.groups.image
    if args.list:
        for name in groupadmin.members(group):
            print(name)
        return 0
    if args.add:
        created = groupadmin.add(group, args.add)
        audit.append(cfg.paths.state_dir, authz.real_user(), "group-add", group=group,
                     member=args.add)
        print(("created group " + group + "; " if created else "")
              + f"added {args.add} to {group}")
    else:
        groupadmin.remove(group, args.remove)
        audit.append(cfg.paths.state_dir, authz.real_user(), "group-remove", group=group,
                     member=args.remove)
        print(f"removed {args.remove} from {group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
