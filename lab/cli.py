"""`dynprov-lab up|status|console NODE|down|exec`: the virtual cluster (test and demo hardware).

The lab is its own package, outside the product: nothing under ``pxe/`` imports it
(tests/test_import_graph_lab.py). It uses the product like a site would: the site configuration,
the inventory, ``pxe-stage serve``. The verbs live in ``lab/commands.py``; this module is the
console script around them (global options, exit codes through ``pxe.cli.guard``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pxe.cli import guard

PROG = "dynprov-lab"


class _AsTopLevel:
    """Hands ``commands.register`` a subparsers stand-in whose one parser is the whole command.

    ``register`` adds a single noun parser (``lab``) and its verbs; forcing its ``prog`` makes
    the verbs read ``dynprov-lab up``, ``dynprov-lab down``... in usage, help and man pages.
    """

    def __init__(self) -> None:
        self.parser: argparse.ArgumentParser | None = None

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        if self.parser is not None:
            raise RuntimeError(f"lab commands registered a second command {name!r}")
        kwargs.pop("help", None)
        self.parser = argparse.ArgumentParser(prog=PROG, **kwargs)
        return self.parser


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``dynprov-lab`` parser (``argv`` accepted for the same signature as pxe-stage's)."""
    from lab import commands

    holder = _AsTopLevel()
    commands.register(holder)  # type: ignore[arg-type]
    parser = holder.parser
    assert parser is not None, "lab.commands.register added no parser"
    parser.epilog = ("Exit status: 0 ok, 1 failed, 2 bad usage or input, 130 interrupted. "
                     "Config: --config, else $DYNPROV_CONFIG, else /etc/dynprov/dynprov.toml.")
    parser.add_argument("--config", metavar="FILE", help="site configuration (TOML)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    guard.add_debug_flag(parser)
    guard.exit_status_everywhere(parser)  # each verb's --help says what its exit codes mean
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return guard.run(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"{PROG}: %(levelname)s: %(message)s", stream=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
