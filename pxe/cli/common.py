"""Shared CLI helpers: loading the config, printing tables and JSON."""

from __future__ import annotations

import sys

from pxe import config

TYPE_CHECKING = False  # not typing's: every command imports this module (typing costs ~2 ms)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable, Sequence
    from typing import Any


def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(getattr(args, "config", None))


def print_json(data: Any) -> None:
    import json  # only the --json outputs pay for it

    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = [["-" if v in (None, "") else str(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip())
    for r in rows:
        print(fmt.format(*r).rstrip())


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
