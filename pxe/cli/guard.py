"""The one way every console script ends: a one-line `<prog>: message` and an exit code.

Exit codes (all commands, docs/admin-guide.md "Exit codes"):
    0    ok
    1    failed: the operation did not succeed, including permission denied (the message names
         the file and says to run as root or through sudo) and unexpected internal errors
    2    bad usage or input (argparse errors, InputError, unreadable/invalid config or input file)
    130  interrupted (Ctrl-C)
A traceback is never printed unless `--debug` is given (anywhere on the command line) or
DYNPROV_DEBUG=1 is set. Imports nothing heavy: cluster-query runs this on every Moab poll.
"""

from __future__ import annotations

import os
import sys

from pxe.errors import DynprovError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: typing (and re, enum) cost the poll ~10 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_FLAG = "--debug"
DEBUG_HELP = "on an error, also print the Python traceback (also DYNPROV_DEBUG=1)"
MAX_MESSAGE = 400  # characters of one message line: a 1 MB argument is not echoed back whole


def add_debug_flag(parser) -> None:  # type: ignore[no-untyped-def]
    """Declare --debug on a parser (for --help and man pages; run() strips it before parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)


EXIT_HEADING = "Exit status:"


def exit_status_everywhere(parser, inherited: str = "") -> None:  # type: ignore[no-untyped-def]
    """Give every subcommand's --help the exit-status sentence of its nearest parent that has
    one (``pxe-stage nodes add --help`` says what its codes mean, as ``pxe-stage --help`` does)."""
    epilog = parser.epilog or ""
    start = epilog.find(EXIT_HEADING)
    if start >= 0:
        end = epilog.find(". ", start)
        inherited = epilog[start:] if end < 0 else epilog[start:end + 1]
    elif inherited:
        parser.epilog = f"{epilog} {inherited}" if epilog else inherited
    for action in parser._actions:  # argparse has no public walk (see tools/manpage.py)
        for child in getattr(action, "_name_parser_map", {}).values():
            exit_status_everywhere(child, inherited)


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """argv without --debug (before a '--'), and whether it or DYNPROV_DEBUG=1 asked for it."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    debug = DEBUG_FLAG in args[:end]
    if debug:
        args = [a for a in args[:end] if a != DEBUG_FLAG] + args[end:]
    return args, debug or os.environ.get("DYNPROV_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    """Whitespace collapsed, control characters escaped, length capped."""
    flat = " ".join(str(text).split())
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in flat)
    return flat if len(flat) <= MAX_MESSAGE else flat[:MAX_MESSAGE] + "..."


def describe(exc: BaseException) -> tuple[str, int]:
    """The message and exit code for an exception that reached the top of a command."""
    if isinstance(exc, DynprovError):
        return str(exc), exc.exit_code
    if isinstance(exc, PermissionError):
        where = exc.filename or "a file"
        return f"permission denied: {where} (run as root or through sudo)", EXIT_FAILED
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", EXIT_FAILED
    if isinstance(exc, UnicodeError):
        return f"input is not valid UTF-8 text: {exc}", EXIT_USAGE
    if isinstance(exc, MemoryError):
        return "out of memory", EXIT_FAILED
    sqlite3 = sys.modules.get("sqlite3")  # not imported here: whoever raised it had it loaded
    if (sqlite3 is not None and isinstance(exc, sqlite3.Error)) \
            or type(exc).__name__ == "OperationalError":  # (PostgreSQL's subclass sqlite3's)
        text = str(exc)
        if "readonly" in text or "unable to open" in text:
            return (f"the state database cannot be written by this user ({text}); run as root "
                    "or through sudo", EXIT_FAILED)
        return f"state database error: {text}", EXIT_FAILED
    return (f"internal error: {type(exc).__name__}: {exc} (run again with --debug for the "
            "traceback and report it)", EXIT_FAILED)


def run(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        prefix: str = "", stream: TextIO | None = None,
        remap: Callable[[int], int] | None = None) -> int:
    """Run ``body(argv)`` and turn whatever ends it into an exit code and at most one line.

    ``prefix``/``stream`` let node-power print ``ERROR: node-power: ...`` on stdout (Moab reads
    stdout); ``remap`` lets os-switch turn a forbidden code (4) into 1.
    """
    args, debug = split_debug(sys.argv[1:] if argv is None else argv)
    try:
        code = body(args)
        code = EXIT_OK if code is None else int(code)
    except SystemExit as exc:  # argparse: 2 on bad usage (message already printed), 0 for --help
        code = exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        _say(prog, "interrupted", prefix, stream)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        code = EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the one place every command's errors end
        message, code = describe(exc)
        if debug:
            import traceback

            traceback.print_exc(file=sys.stderr)
        _say(prog, message, prefix, stream)
    return remap(code) if remap else code


def _say(prog: str, message: str, prefix: str, stream: TextIO | None) -> None:
    out = stream or sys.stderr
    try:
        print(f"{prefix}{prog}: {one_line(message)}", file=out)
        out.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass


def _quiet_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def launch(entry: Callable[[], int], short: bool) -> int:
    """Run a console script's ``entry``; a ``short`` one (a poll, a provisioning batch: well under
    a second, no thread or child left behind) without the cyclic garbage collector and without
    Python's teardown. For `set-boot --render` against a 10,000-host `dhcpd -t`, ~10% of the
    time was that bookkeeping, not the work: collections during imports (nothing it makes in
    its lifetime is a cycle worth finding) and freeing every module and object one by one at
    exit. So once ``entry`` returned and stdout and stderr are flushed (every child reaped and
    every file renamed into place by then), the process ends with os._exit; anything unusual
    (a thread still running, logging configured, output that cannot be flushed) takes the
    ordinary exit, as does a command that spoke to PostgreSQL (its server would log every
    connection dropped unclosed)."""
    if not short:
        return entry()
    import _thread
    import gc

    gc.disable()
    code = entry()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return code  # the ordinary exit reports it
    if _thread._count() == 0 and not {"logging", "psycopg"} & sys.modules.keys():
        os._exit(code)  # nothing left to finish
    return code
