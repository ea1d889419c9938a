"""`pxe-stage`: the admin's command. One module per noun under pxe/cli/, each with register()."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pxe.cli import guard

TYPE_CHECKING = False  # not typing's (~2 ms on every start)
if TYPE_CHECKING:
    from collections.abc import Sequence

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


def _terminal_columns() -> int:
    """What shutil.get_terminal_size().columns says ($COLUMNS, else stdout's terminal, else 80),
    without importing shutil (and with it bz2, lzma, fnmatch: ~3 ms of every start)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, its width found without shutil (argparse builds one per argument)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """Every pxe-stage parser (subcommands inherit it): _Formatter unless one is named."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser (help, man pages), or with ``argv`` only the subcommand it names."""
    parser = _Parser(
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
    guard.exit_status_everywhere(parser)
    return parser


# Commands run per provisioning batch or poll that end in well under a second, leaving no thread
# or child behind: launch() runs them without the cyclic garbage collector and without Python's
# teardown.
SHORT_COMMANDS = frozenset({"set-boot", "render"})


def main(argv: Sequence[str] | None = None) -> int:
    return guard.run("pxe-stage", _main, argv)


def launch() -> int:
    """The installed command's entry (pyproject's script, tools/install-launcher): main(), with
    SHORT_COMMANDS ended the quick way (pxe.cli.guard.launch)."""
    return guard.launch(main, _command_word(sys.argv[1:]) in SHORT_COMMANDS)


def _main(argv: list[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup = _LoggingSetup(args.verbose)
    if "logging" in sys.modules:
        setup.configure(sys.modules["logging"])
    else:  # most commands never log: configure it when (if) something imports it (~6 ms)
        sys.meta_path.insert(0, setup)
    try:
        return int(args.func(args) or 0)
    finally:
        if setup in sys.meta_path:
            sys.meta_path.remove(setup)


class _LoggingSetup:
    """Configures logging as pxe-stage wants it at the moment a module first imports logging:
    a meta-path finder that hands back the standard loader wrapped to configure after it runs."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def configure(self, logging) -> None:  # type: ignore[no-untyped-def]
        logging.basicConfig(level=logging.DEBUG if self.verbose else logging.INFO,
                            format="pxe-stage: %(levelname)s: %(message)s", stream=sys.stderr)

    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name != "logging":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenConfigure(spec.loader, self.configure)
        return spec


class _ThenConfigure:
    """A module loader that runs ``after(module)`` once the module has been executed."""

    def __init__(self, loader, after) -> None:  # type: ignore[no-untyped-def]
        self.loader, self.after = loader, after

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        self.loader.exec_module(module)
        self.after(module)


if __name__ == "__main__":
    sys.exit(launch())
