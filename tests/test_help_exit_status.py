"""Every command's and subcommand's --help says what its exit codes mean (an admin scripting
`pxe-stage nodes add` reads that help, not the top-level one)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tools import manpage


def _every_parser() -> list[tuple[str, argparse.ArgumentParser]]:
    found: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found.append((name, parser))
        for child_name, child in manpage._subcommands(parser).items():
            walk(f"{name} {child_name}", child)

    for command, spec in manpage.COMMANDS.items():
        module, _, function = spec.partition(":")
        walk(command, getattr(importlib.import_module(module), function or "build_parser")())
    return found


@pytest.mark.unit
def test_every_help_has_an_exit_status_sentence():
    parsers = _every_parser()
    assert len(parsers) > 60  # the walk reached the subcommands
    lacking = [name for name, parser in parsers if "Exit status:" not in parser.format_help()]
    assert lacking == []
    helps = {name: parser.format_help() for name, parser in parsers}
    # a subcommand says its nearest parent's codes, once
    assert "1 a node was refused" in helps["pxe-stage run wait"]
    assert helps["pxe-stage nodes add"].count("Exit status:") == 1
    assert "1 failed or refused, 2 bad input" in helps["dynprov-slurm sync"]


@pytest.mark.integration
def test_subcommand_help_as_a_process():
    for module, argv in (("pxe.cli.main", ("images", "remove", "--help")),
                         ("lab.cli", ("down", "--help")),
                         ("slurm_plugin.cli", ("resume", "--help"))):
        proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0 and "Exit status: 0 ok" in proc.stdout, (argv, proc.stderr)
