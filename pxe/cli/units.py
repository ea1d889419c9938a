"""`pxe-stage install-units`: the sandboxed systemd units of serve and the REST service."""

from __future__ import annotations

import argparse
from pathlib import Path

from pxe.cli.common import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "install-units", help="install the systemd units of serve and the REST service",
        description="Write dynprov-serve.service (pxe-stage serve) and dynprov-api.service "
                    "(pxe-stage api serve) into /etc/systemd/system: the packaged units, with "
                    "this installation's pxe-stage, this config file and the site's state, TFTP "
                    "and HTTP roots as the only writable paths of their sandbox. Each unit must "
                    "pass systemd-analyze verify first; nothing is written otherwise. Then run "
                    "systemctl daemon-reload and enable the services.")
    p.add_argument("--unit", choices=("serve", "api"), action="append",
                   help="only this unit (repeatable; default: both)")
    p.add_argument("--root", type=Path, metavar="DIR",
                   help="install below DIR instead of / (packaging, tests)")
    p.add_argument("--exec", type=Path, metavar="PATH", dest="exe",
                   help="the pxe-stage the units run (default: the one beside this Python, by its "
                        "/usr/local/bin link if there is one)")
    p.set_defaults(func=cmd_install_units)


def cmd_install_units(args: argparse.Namespace) -> int:
    from pxe import units

    cfg = load_config(args)
    which = tuple(dict.fromkeys(args.unit or ("serve", "api")))
    written = units.install(cfg, which, root=args.root, exe=args.exe)
    for path, changed in written.items():
        print(f"{path}: {'installed' if changed else 'unchanged'}")
    missing = sorted({str(p) for w in which for p in units.read_write_paths(cfg, w) if not p.is_dir()})
    if missing and args.root is None:
        print(f"note: create {' '.join(missing)} before starting: systemd refuses to start a "
              f"unit whose ReadWritePaths= does not exist")
    if args.root is None:
        names = " ".join(units.UNITS[w] for w in which)
        print(f"next: systemctl daemon-reload && systemctl enable --now {names}")
    return 0
