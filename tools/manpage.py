"""Man pages generated from the argument parsers, so options cannot drift from the code.

Each console script exposes build_parser(); this module turns a parser (and, for pxe-stage, each
subcommand) into man(7) roff, and merges the hand-written sections kept in docs/man/<page>.md
(DESCRIPTION, FILES, EXIT STATUS, EXAMPLES, ...). Used by tools/make-manpages and the tests.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout (docs/man/)

# console script -> module with build_parser()
COMMANDS: dict[str, str] = {
    "pxe-stage": "pxe.cli.main",
    "dynprov-lab": "lab.cli",
    "os-switch": "msm_plugin.os_switch",
    "cluster-query": "msm_plugin.cluster_query",
    "node-power": "msm_plugin.node_power",
    "fg-moab": "msm_plugin.fg_moab",
    "fg-moab-image": "msm_plugin.fg_moab_image",
    "fg-moab-group": "msm_plugin.fg_moab_group",
    "fg-pool": "pxe.cli.fg_pool",
    "fg-image-generate": "pxe.cli.fg_image_generate",
    "dynprov-slurm": "slurm_plugin.cli",
    # module:function when one module builds several commands' parsers
    "dynprov-slurm-helper": "slurm_plugin.cli:build_helper_parser",
    "dynprov-slurm-reboot": "slurm_plugin.cli:build_reboot_parser",
    "dynprov-slurm-resume": "slurm_plugin.cli:build_resume_parser",
    "dynprov-slurm-suspend": "slurm_plugin.cli:build_suspend_parser",
}
EXTRA_DIR = PROJECT_ROOT / "docs" / "man"
SECTION_ORDER = ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "FILES", "ENVIRONMENT",
                 "EXIT STATUS", "EXAMPLES", "NOTES", "SEE ALSO")


def esc(text: str) -> str:
    """Escape text for roff: backslashes, leading dots/quotes, hyphens in option names."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"(?m)^([.'])", r"\\&\1", text)
    return text.replace("-", "\\-")


def _option_lines(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:  # argparse has no public walk; this is the stable attribute
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            metavar = ""
            if action.nargs != 0:
                metavar = " " + (action.metavar or action.dest.upper())
                if isinstance(metavar, tuple):
                    metavar = " " + " ".join(metavar)
            names = ", ".join(f"\\fB{esc(o)}\\fR" for o in action.option_strings)
            out += [".TP", f"{names}{esc(str(metavar))}"]
        else:
            out += [".TP", f"\\fI{esc(str(action.metavar or action.dest))}\\fR"]
        help_text = (action.help or "").replace("%(default)s", str(action.default))
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            help_text += f" (one of: {', '.join(map(str, action.choices))})"
        out.append(esc(help_text.strip() or "-"))
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _extra_sections(page: str) -> dict[str, str]:
    """Hand-written sections from docs/man/<page>.md: '## TITLE' headings, roff-ready text."""
    path = EXTRA_DIR / f"{page}.md"
    if not path.exists():
        return {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip().upper()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def examples(page: str) -> list[str]:
    """The command lines of a page's EXAMPLES section (lines starting with '$ ')."""
    text = _extra_sections(page).get("EXAMPLES", "")
    return [line[2:].strip() for line in text.splitlines() if line.startswith("$ ")]


def _roff_text(body: str) -> list[str]:
    """Markdown-ish to roff: blank line = paragraph, '$ cmd' and indented lines = example code."""
    out: list[str] = []
    in_code = False
    for line in body.splitlines():
        code = line.startswith("$ ") or line.startswith("    ")
        if code and not in_code:
            out += [".PP", ".nf", ".RS 4"]
            in_code = True
        elif not code and in_code:
            out += [".RE", ".fi"]
            in_code = False
        if not line.strip():
            if not in_code:
                out.append(".PP")
            continue
        if line.startswith("- "):
            out += [".IP \\(bu 2", esc(line[2:].strip())]
        else:
            out.append(esc(line.strip() if not code else line.rstrip().removeprefix("    ")))
    if in_code:
        out += [".RE", ".fi"]
    return out


def render_page(page: str, parser: argparse.ArgumentParser, section: int = 1) -> str:
    today = datetime.date.today().isoformat()
    extra = _extra_sections(page)
    summary = (parser.description or "").split(". ")[0].rstrip(".")
    lines = [f'.TH "{page.upper()}" "{section}" "{today}" "dynprov" "dynprov manual"',
             ".SH NAME", f"{esc(page)} \\- {esc(summary)}",
             ".SH SYNOPSIS", ".nf",
             esc(parser.format_usage().replace("usage: ", "").strip()), ".fi",
             ".SH DESCRIPTION"]
    if parser.description:
        lines.append(esc(parser.description))
    if "DESCRIPTION" in extra:
        lines += [".PP", *_roff_text(extra.pop("DESCRIPTION"))]
    if parser.epilog:
        lines += [".PP", esc(parser.epilog)]
    options = _option_lines(parser)
    if options:
        lines += [".SH OPTIONS", *options]
    subs = _subcommands(parser)
    if subs and page == "pxe-stage":
        lines.append(".SH COMMANDS")
        for name, sub in subs.items():
            lines += [".TP", f"\\fB{esc(name)}\\fR",
                      esc((sub.description or "").strip() or "-") +
                      f" See \\fB{esc(page)}\\-{esc(name)}\\fR(1)."]
    elif subs:  # verbs of a pxe-stage noun: each verb's usage and options inline
        lines.append(".SH COMMANDS")
        for name, sub in subs.items():
            lines += [".SS " + esc(name), ".nf",
                      esc(sub.format_usage().replace("usage: ", "").strip()), ".fi"]
            if sub.description:
                lines += [".PP", esc(sub.description)]
            lines += _option_lines(sub)
    for title in SECTION_ORDER:
        if title in extra:
            lines += [f".SH {title}", *_roff_text(extra.pop(title))]
    for title, body in extra.items():
        lines += [f".SH {esc(title)}", *_roff_text(body)]
    return "\n".join(lines) + "\n"


def all_pages() -> dict[str, str]:
    """Every page: one per console script, one per pxe-stage subcommand (and sub-subcommand)."""
    pages: dict[str, str] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        pages[f"{name}.1"] = render_page(name, parser)
        for sub_name, sub in _subcommands(parser).items():
            if name == "pxe-stage":
                walk(f"{name}-{sub_name}", sub)

    for command, module in COMMANDS.items():
        module, _, function = module.partition(":")
        walk(command, getattr(importlib.import_module(module), function or "build_parser")())
    pages["dynprov.toml.5"] = render_config_page()
    return pages


def render_config_page() -> str:
    today = datetime.date.today().isoformat()
    extra = _extra_sections("dynprov.toml")
    lines = [f'.TH "DYNPROV.TOML" "5" "{today}" "dynprov" "dynprov manual"', ".SH NAME",
             "dynprov.toml \\- dynprov site configuration"]
    for title in SECTION_ORDER:
        if title in extra:
            lines += [f".SH {title}", *_roff_text(extra.pop(title))]
    for title, body in extra.items():
        lines += [f".SH {esc(title)}", *_roff_text(body)]
    return "\n".join(lines) + "\n"


def write_all(out_dir: Path) -> list[Path]:
    written = []
    for name, text in all_pages().items():
        section = name.rsplit(".", 1)[1]
        path = out_dir / f"man{section}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
