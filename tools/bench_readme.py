#!/usr/bin/env python3
"""Regenerate README's benchmark table from real runs of tools/bench_*.py.

Every benchmark ends with one line `RESULT key=value ...` (tools/bench_common.result, with the
load average at the end of the run). This script keeps each benchmark's full output under
docs/bench/<name>.txt and rewrites the table between `<!-- bench-table:begin -->` and
`<!-- bench-table:end -->` in README.md from the RESULT lines found there: the figure each
benchmark exists for, its goal, the median, the spread of the repeats, the machine's load and
the date of the run. No figure is typed by hand.

    tools/bench_readme.py                 # table from the saved outputs
    tools/bench_readme.py --run render    # run these benchmarks first (all: --run all)
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"

# name -> (argv after the script, [(RESULT key, what, goal text, spread key or None)])
BENCHES: dict[str, tuple[list[str], list[tuple[str, str, str, str | None]]]] = {
    "render": (["--nodes", "10000", "--repeat", "5"], [
        ("render_ratio", "`set-boot --render`, 10,000 nodes, DHCP unchanged (no check needed) "
         "/ bare `dhcpd -t`", "<= 2x", "render_ratio_spread"),
        ("render_one_changed_ratio", "the same after one node's MAC changed: that entry "
         "rendered, checked with `dhcpd -t`, spliced in / bare `dhcpd -t`", "<= 2x",
         "render_one_changed_ratio_spread"),
        ("render_full_ratio", "the same rendering the whole file (none installed): render + "
         "`dhcpd -t` + install / bare `dhcpd -t`", "-", "render_full_ratio_spread"),
        ("render_ms_per_config", "loader config rendered per request (ms, in-process)",
         "<= 1 ms", None),
        ("http_added_ms", "added per config over HTTP at 500 req/s (ms, vs a static file)",
         "<= 1 ms", None)]),
    "cluster_query": (["--repeat", "7"], [
        ("cold_ratio", "cluster-query cold (after a commit), 10,000 nodes / sqlite3 floor",
         "<= 3x", "cold_ratio_spread"),
        ("warm_ratio", "cluster-query warm, python3 -S launcher / sqlite3 floor", "-", None)]),
    "tftp": (["--rounds", "3", "--single-rounds", "3"], [
        ("storm_ratio", "TFTP storm 128 x 8 MiB, tftpd-hpa time / ours", ">= 1.0x",
         "storm_ratio_spread"),
        ("cold_storm_ratio", "the same, cold (first requests for the file)", ">= 1.0x",
         "cold_storm_ratio_spread"),
        ("cold_vs_warm", "our cold storm / our warm storm", "<= 1.1x", None)]),
    "http": (["--rounds", "9"], [
        ("http_ratio", "HTTP 32 x 64 MiB, nginx time / ours", ">= 1.0x", "http_ratio_spread")]),
    "boot": (["--nodes", "4", "--rounds", "3"], [
        ("http_vs_tftp", "4 simulated nodes booting: HTTP (iPXE) wall / TFTP-only wall",
         "<= 0.6x", "http_vs_tftp_spread")]),
    "boot_lab": (["--nodes", "4", "--rounds", "3"], [
        ("lab_http_vs_tftp", "4 QEMU nodes (lab, BIOS) os-switch to all ready: HTTP wall / "
         "TFTP-only wall", "<= 0.6x", "lab_http_vs_tftp_spread")]),
    "power": (["--count", "200", "--repeat", "3"], [
        ("api_vs_ipmipower", "power status, 200 BMCs: pxe.power.run / ipmipower", "<= 3x",
         "api_vs_ipmipower_spread"),
        ("speedup_vs_ipmitool", "the same: ipmitool loop / pxe.power.run", ">= 20x", None)]),
    "state": (["--nodes", "10000", "--repeat", "3"], [
        ("setboot_ratio", "set-boot of 10,000 nodes, PostgreSQL time / SQLite time", "-",
         "setboot_ratio_spread"),
        ("query_ratio", "cluster-query cold, 10,000 nodes, PostgreSQL / SQLite", "-",
         "query_ratio_spread"),
        ("callhome_rate_ratio", "call-home reports per second, SQLite / PostgreSQL", "-",
         "callhome_rate_ratio_spread")]),
    "os_switch": (["--nodes", "1000", "--repeat", "5"], [
        ("vs_ipmipower", "os-switch 1,000 nodes to all power-cycled / `ipmipower --cycle "
         "--on-if-off` (both complete)", "-", "vs_ipmipower_spread"),
        ("power_vs_ipmipower", "the power phase alone / the same ipmipower", "-", None)]),
    "slurm_boot": (["--rounds", "5"], [
        ("slurm_vs_registered", "`sbatch --constraint=B` to job start / bare boot into B to "
         "slurmd registered (QEMU)", "<= 1.1x", "slurm_vs_registered_spread"),
        ("slurm_vs_bare", "the same / bare boot into B to dynprov's ready", "-",
         "slurm_vs_bare_spread")]),
    "slurm_helper": (["--repeat", "21"], [
        ("configured_helper_ms", "Slurm helper as configured (Helper=), per call (ms)", "< 50 ms",
         "configured_helper_ms_spread")]),
}


def result_of(text: str) -> dict[str, str]:
    """The key=value pairs of the last RESULT line."""
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {}
    return dict(p.split("=", 1) for p in lines[-1].split()[1:] if "=" in p)


def run(name: str) -> None:
    argv = [sys.executable, str(ROOT / "tools" / f"bench_{name}.py"), *BENCHES[name][0]]
    print(f"bench_readme: {' '.join(argv[1:])}", file=sys.stderr)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=7200)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    (OUT / f"{name}.txt").write_text(f"# {' '.join(argv[1:])} ({stamp}, exit "
                                     f"{proc.returncode})\n" + proc.stdout)


def table() -> str:
    rows = ["| benchmark | figure | goal | median | spread | load | run |",
            "|---|---|---|---|---|---|---|"]
    for name, (_argv, figures) in BENCHES.items():
        path = OUT / f"{name}.txt"
        if not path.exists():
            continue
        text = path.read_text()
        when = text.splitlines()[0].split("(", 1)[-1].split(",")[0] if text.startswith("#") else "?"
        res = result_of(text)
        for key, what, goal, spread in figures:
            if key not in res:
                continue
            rows.append(f"| `bench_{name}` | {what} | {goal} | {res[key]} | "
                        f"{res.get(spread, '-') if spread else '-'} | {res.get('load', '?')} | "
                        f"{when} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs="*", default=[], metavar="NAME",
                    help=f"run these first ({', '.join(BENCHES)}, or all)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args()
    names = list(BENCHES) if "all" in args.run else args.run
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"bench_readme: unknown benchmark {unknown[0]!r}", file=sys.stderr)
        return 2
    for name in names:
        run(name)
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"bench_readme: {args.readme} has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    print(f"bench_readme: {args.readme} updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
