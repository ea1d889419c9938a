"""`pxe-stage`: the admin's command. One module per noun under pxe/cli/, each with register()."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pxe.cli import guard

# Each entry is a module in pxe/cli/ exposing register(subparsers). Order = order in --help.
COMMANDS = (
    "nodes",
    "images",
    "setboot",
    "render",
    "dhcp",
    "power",
    "run",
    "initramfs",
    "serve",
    "segments",
    "state",
    "api",
    "units",
    "explain",
)
# Command words registered by a module of another name. Only the module of the command being
# run is imported: start-up cost matters when a command runs on thousands of nodes or on a poll.
MODULE_OF = {"set-boot": "setboot", "bootdev": "power", "console": "power",
             "install-units": "units"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _command_word(argv: Sequence[str]) -> str | None:
    """The first positional word (the subcommand), skipping global options and their values."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--config":
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser (help, man pages), or with ``argv`` only the subcommand it names."""
    parser = argparse.ArgumentParser(
        prog="pxe-stage",
        description="dynprov admin toolkit: node inventory, OS images, DHCP and boot configs, "
                    "power, and the provisioning server.",
        epilog="Exit status: 0 ok, 1 failed (also permission denied), 2 bad usage or input, "
               "130 interrupted. "
               "Config: --config, else $DYNPROV_CONFIG, else /etc/dynprov/dynprov.toml.",
    )
    parser.add_argument("--config", metavar="FILE", help="site configuration (TOML)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    guard.add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    word = _command_word(argv) if argv is not None else None
    module = MODULE_OF.get(word, word) if word else None
    for name in [module] if module in COMMANDS else COMMANDS:
        importlib.import_module(f"pxe.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return guard.run("pxe-stage", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="pxe-stage: %(levelname)s: %(message)s", stream=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
