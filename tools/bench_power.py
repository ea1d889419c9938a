#!/usr/bin/env python3
"""Power-status sweep over N virtual IPMI BMCs on 127.0.0.1, side by side in one run:

  (a) a sequential `ipmitool -I lanplus ... chassis power status` loop,
  (b) FreeIPMI's `ipmipower --stat` (the parallel C tool HPC sites use),
  (c) dynprov: pxe.power.run(cfg, nodes, "status") in-process, and `pxe-stage power status`
      as a process (start-up, config, inventory and all),
  (d) optionally pyghmi's client on a thread pool (why dynprov has its own RMCP+ client).

Goals (issue 3): (c) at least 20x faster than (a) and within 3x of (b). Prints both ratios and the
time per 1,000 nodes; --json for machines. Passwords go through a 0600 file or the environment
(ipmitool -E, ipmipower --config-file), never argv. Traffic stays on 127.0.0.1; the BMC processes
are ours and are stopped by PID.

    tools/bench_power.py                 # 200 BMCs, median of 3 interleaved rounds
    tools/bench_power.py --count 1000 --skip-ipmitool --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tools"))

import bench_common as bc  # noqa: E402

from lab.ports import free_udp_base as free_base  # noqa: E402
from lab.vbmc import VbmcProcess  # noqa: E402

USER, PASSWORD = "admin", "bench-pw-1"


@dataclass
class Row:
    seconds: float  # the median run
    runs: list[float]
    answered: int  # the fewest nodes that answered in a run
    per_1000_nodes_s: float = 0.0


def interleaved(tools: dict[str, Callable[[], int]], repeat: int) -> dict[str, Row]:
    """Every tool once per round, the order alternating; median and all runs per tool."""
    runs: dict[str, list[float]] = {k: [] for k in tools}
    answers: dict[str, list[int]] = {k: [] for k in tools}
    for r in range(repeat):
        for name in (list(tools) if r % 2 == 0 else list(reversed(tools))):
            t = time.perf_counter()
            answers[name].append(tools[name]())
            runs[name].append(time.perf_counter() - t)
    return {k: Row(statistics.median(runs[k]), runs[k], min(answers[k])) for k in tools}


def make_site(tmp: Path, base: int, count: int) -> Path:
    from pxe import config
    from pxe.inventory import Inventory, build

    conf = tmp / "dynprov.toml"
    conf.write_text(config.example(tmp) + "\n[power]\ntimeout = 5.0\nretries = 1\n")
    secrets = tmp / "bmc-secrets"
    secrets.write_text(f'default = "{PASSWORD}"\n')
    secrets.chmod(0o600)
    cfg = config.load(conf)
    nodes = [build(cfg, {"name": f"b{i + 1:04d}", "mac": f"52:54:01:00:{(i + 1) >> 8:02x}:"
                                                        f"{(i + 1) & 0xFF:02x}",
                         "bmc_type": "ipmi", "bmc_address": "127.0.0.1", "bmc_port": base + i,
                         "bmc_user": USER}) for i in range(count)]
    Inventory(cfg).add(nodes)
    return conf


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200, help="virtual BMCs (default 200)")
    p.add_argument("--processes", type=int, default=4, help="BMC server processes (default 4)")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved rounds (every tool once each); median and spread")
    p.add_argument("--skip-ipmitool", action="store_true",
                   help="skip the sequential ipmitool loop (about 27 ms per node)")
    p.add_argument("--pyghmi", action="store_true", help="also time pyghmi's client, 32 threads")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not 1 <= args.count <= 4000 or not 1 <= args.repeat <= 20:
        p.error("--count 1-4000, --repeat 1-20")
    tmp = Path(tempfile.mkdtemp(prefix="bench-power-"))
    env_pw = {**os.environ, "IPMI_PASSWORD": PASSWORD}
    results: dict[str, Row] = {}
    tools: dict[str, Callable[[], int]] = {}
    try:
        pwfile = tmp / "vbmc-pw"
        pwfile.write_text(PASSWORD + "\n")
        pwfile.chmod(0o600)
        base = free_base(args.count)
        with VbmcProcess(f"b[0001-{args.count:04d}]", base, pwfile, user=USER,
                         processes=args.processes, lifetime=1800, start_timeout=120):
            ports = [base + i for i in range(args.count)]

            if not args.skip_ipmitool and shutil.which("ipmitool"):
                def ipmitool_loop() -> int:
                    ok = 0
                    for port in ports:
                        out = subprocess.run(
                            ["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port),
                             "-U", USER, "-E", "chassis", "power", "status"],
                            capture_output=True, text=True, env=env_pw, timeout=60)
                        ok += "Chassis Power is" in out.stdout
                    return ok
                tools["ipmitool loop"] = ipmitool_loop

            if shutil.which("ipmipower"):
                fconf = tmp / "freeipmi.conf"
                fconf.write_text(f"username {USER}\npassword {PASSWORD}\n")
                fconf.chmod(0o600)
                hosts = ",".join(f"127.0.0.1:{port}" for port in ports)

                def ipmipower() -> int:
                    out = subprocess.run(["ipmipower", "-D", "LAN_2_0", "--config-file",
                                          str(fconf), "-h", hosts, "--stat"],
                                         capture_output=True, text=True, timeout=300)
                    return sum(1 for line in out.stdout.splitlines()
                               if line.endswith((": on", ": off")))
                tools["ipmipower"] = ipmipower

            conf = make_site(tmp, base, args.count)
            from pxe import config, power
            from pxe.inventory import Inventory

            cfg = config.load(conf)
            nodes = Inventory(cfg).all()

            def ours() -> int:
                res = power.run(cfg, nodes, "status")
                return sum(1 for r in res.values() if r.ok)
            ours()  # warm-up: imports (cryptography) happen once per process
            tools["dynprov power.run"] = ours

            def cli() -> int:
                out = subprocess.run([sys.executable, "-m", "pxe.cli.main", "--config", str(conf),
                                      "power", "status", f"b[0001-{args.count:04d}]", "--json"],
                                     capture_output=True, text=True, timeout=300, cwd=ROOT)
                return sum(1 for r in json.loads(out.stdout or "[]") if r["ok"])
            tools["dynprov pxe-stage CLI"] = cli

            if args.pyghmi:
                def pyghmi_threads() -> int:
                    code = ("import os,sys\nfrom concurrent.futures import ThreadPoolExecutor\n"
                            "from pyghmi.ipmi import command\n"
                            "pw=os.environ['IPMI_PASSWORD']\n"
                            "def one(p):\n"
                            "  try:\n"
                            "    c=command.Command('127.0.0.1','admin',pw,port=p)\n"
                            "    r=c.get_power()['powerstate']; c.ipmi_session.logout(); return 1\n"
                            "  except Exception: return 0\n"
                            "ports=[int(x) for x in sys.stdin.read().split()]\n"
                            "with ThreadPoolExecutor(32) as ex: print(sum(ex.map(one, ports)))\n")
                    out = subprocess.run([sys.executable, "-c", code], input=" ".join(
                        map(str, ports)), capture_output=True, text=True, env=env_pw,
                        timeout=300)
                    return int(out.stdout.strip() or 0)
                tools["pyghmi 32 threads"] = pyghmi_threads
            results = interleaved(tools, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.count
    for row in results.values():
        row.per_1000_nodes_s = row.seconds * 1000 / n
    summary: dict[str, object] = {"bmcs": n, "bmc_processes": args.processes,
                                  "repeat": args.repeat,
                                  "tools": {k: asdict(v) for k, v in results.items()}}
    api_s = results["dynprov power.run"].seconds
    cli_s = results["dynprov pxe-stage CLI"].seconds
    lines = []
    if "ipmitool loop" in results:
        loop = results["ipmitool loop"].seconds
        summary["speedup_vs_ipmitool_loop"] = {"api": loop / api_s, "cli": loop / cli_s}
        lines.append(f"  vs ipmitool loop: {loop / api_s:.1f}x faster (API), {loop / cli_s:.1f}x (CLI)"
                     "   goal >= 20x")
    if "ipmipower" in results:
        ipp = results["ipmipower"].seconds
        summary["ratio_to_ipmipower"] = {"api": api_s / ipp, "cli": cli_s / ipp}
        lines.append(f"  vs ipmipower:     {api_s / ipp:.2f}x its time (API), {cli_s / ipp:.2f}x (CLI)"
                     "   goal <= 3x")
    fields: dict[str, object] = {"bmcs": n, "repeat": args.repeat}
    if "ipmipower" in results:
        ipp = results["ipmipower"]
        fields["api_vs_ipmipower"] = api_s / ipp.seconds
        fields["cli_vs_ipmipower"] = cli_s / ipp.seconds
        api_runs = results["dynprov power.run"].runs
        fields["api_vs_ipmipower_spread"] = (f"{min(api_runs) / max(ipp.runs):.2f}-"
                                             f"{max(api_runs) / min(ipp.runs):.2f}")
    if "ipmitool loop" in results:
        fields["speedup_vs_ipmitool"] = results["ipmitool loop"].seconds / api_s
    fields["api_s"], fields["cli_s"] = api_s, cli_s
    if args.json:
        print(json.dumps(summary, indent=2))
        bc.result(fields, True)
        return 0
    print(f"power status over {n} virtual BMCs ({args.processes} BMC processes), median of "
          f"{args.repeat} interleaved rounds; {bc.load_note()}")
    for name, row in results.items():
        print(f"  {name:<24} {row.seconds:8.3f} s  ({min(row.runs):.3f}-{max(row.runs):.3f})  "
              f"{row.answered:>5}/{n} answered   {row.per_1000_nodes_s:7.2f} s per 1,000 nodes")
    print("\n".join(lines))
    bc.result(fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
