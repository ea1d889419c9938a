#!/usr/bin/env python3
"""Where a netboot fan-out's time goes: our IPMI client against ipmipower on the same BMCs.

    tools/profile_power_cycle.py [--nodes 1000] [--bmc-processes 32] [--repeat 3] [--pcap]

Per round, on N virtual IPMI BMCs on 127.0.0.1 (lab.vbmc, one process group shared by both
sides): ``pxe.power.run(cfg, nodes, "netboot")`` in this process (wall and CPU seconds, the
power-cycle of every node plus its next-boot flag), then ``ipmipower -D LAN_2_0 --cycle
--on-if-off`` (password in a 0600 config file). With ``--pcap`` (needs tcpdump, root) each side's
UDP datagrams to and from the BMC ports are counted: requests and answers per node, i.e. the
round trips of one cycle. Not a timed test; the figures go to docs/bench/os_switch-power-*.txt.
The RESULT line also has our engine's own count (``ours_requests_per_session``: requests sent
once, resends left out) and ``failed`` (nodes not done on either side; exit 1 if any).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_common as bc  # noqa: E402
import bench_os_switch as bos  # noqa: E402

from lab.ports import free_udp_base  # noqa: E402
from lab.vbmc import VbmcProcess  # noqa: E402
from pxe import power  # noqa: E402
from pxe.inventory import Inventory  # noqa: E402
from pxe.nodeset import fold  # noqa: E402
from pxe.power import rmcp  # noqa: E402


class Capture:
    """tcpdump on lo for the BMC port range, started and stopped by its own PID."""

    def __init__(self, path: Path, base: int, count: int):
        self.path = path
        self.filter = f"udp and portrange {base}-{base + count - 1}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        self.proc = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-q", "-w", str(self.path),
                                      "-B", "16384", "--immediate-mode", self.filter],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # tcpdump needs a moment before it captures
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(2.0)  # let tcpdump drain its ring before it stops
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=10)
        self.stats = " ".join(line for line in err.decode().splitlines() if "packets" in line)


def count_packets(pcap: Path, base: int, count: int) -> tuple[int, int]:
    """(datagrams to the BMCs, datagrams from them) in a capture."""
    out = subprocess.run(["tcpdump", "-n", "-q", "-r", str(pcap)], capture_output=True,
                         text=True, timeout=120).stdout
    to_bmc = from_bmc = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[3] != ">":
            continue
        src, dst = parts[2], parts[4].rstrip(":")
        if src == dst:  # a vBMC process's own wake-up datagram, not IPMI
            continue
        if base <= int(dst.rsplit(".", 1)[-1]) < base + count:
            to_bmc += 1
        else:
            from_bmc += 1
    return to_bmc, from_bmc


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(f[11]) + int(f[12]) for _, f in bc.group_stats(pgid)) / ticks


def children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


class EngineCounts:
    """The wire counts of every rmcp.Engine run while installed (our side's own view)."""

    def __init__(self) -> None:
        self.runs: list[dict[str, int]] = []
        self.original = rmcp.Engine.run

    def __enter__(self) -> EngineCounts:
        original, runs = self.original, self.runs

        def run(engine: rmcp.Engine, targets: object) -> None:
            try:
                original(engine, targets)  # type: ignore[arg-type]
            finally:
                runs.append(dict(getattr(engine, "counts", {})))  # older engines: none

        rmcp.Engine.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        rmcp.Engine.run = self.original  # type: ignore[method-assign]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--bmc-processes", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--sessions", type=int, default=None)
    p.add_argument("--pcap", action="store_true", help="count datagrams with tcpdump")
    p.add_argument("--keep", metavar="DIR", help="work in DIR (an existing, empty directory) "
                   "and leave the site and the captures there")
    args = p.parse_args()
    if not 1 <= args.nodes <= 4000 or not 1 <= args.repeat <= 20:
        p.error("--nodes 1-4000, --repeat 1-20")
    if not shutil.which("ipmipower") or (args.pcap and not shutil.which("tcpdump")):
        print("profile_power_cycle: needs ipmipower (and tcpdump for --pcap)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="profile-power-") as tmp:
        tmp = args.keep or tmp  # --keep: the site, configs and captures stay for a look
        root = Path(tmp)
        base = free_udp_base(args.nodes)
        cfg = bos.make_site(root, args.nodes, base, args.sessions)
        pw_file = root / "vbmc-pw"
        pw_file.write_text(bos.PASSWORD + "\n")
        pw_file.chmod(0o600)
        conf = root / "freeipmi.conf"
        conf.write_text(f"username admin\npassword {bos.PASSWORD}\n")
        conf.chmod(0o600)
        names = [f"n{i:04d}" for i in range(1, args.nodes + 1)]
        nodes = Inventory(cfg).select(fold(names))
        hosts = ",".join(f"127.0.0.1:{base + i}" for i in range(args.nodes))
        cycle = bos.ipmipower_argv(conf, hosts, "--cycle",
                                   ["--on-if-off", *bos.IPMIPOWER_ARGS.split()])
        wire: list[dict[str, int]] = []
        failed = 0
        ours_wall: list[float] = []
        ours_cpu: list[float] = []
        theirs: list[float] = []
        theirs_cpu: list[float] = []
        bmc_cpu: dict[str, list[float]] = {"ours": [], "ipmipower": []}
        print(f"netboot fan-out vs ipmipower --cycle --on-if-off, {args.nodes} virtual BMCs in "
              f"{args.bmc_processes} processes ({bc.load_note()})")
        with VbmcProcess(fold(names), base, pw_file, processes=args.bmc_processes,
                         lifetime=600.0 + 60.0 * args.repeat, start_timeout=300.0) as bmcs:
            assert bmcs.proc is not None
            pgid = bmcs.proc.pid
            bos.ipmipower(bos.ipmipower_argv(conf, hosts, "--on", []))
            for r in range(args.repeat):
                for side in (("ours", "ipmipower") if r % 2 == 0 else ("ipmipower", "ours")):
                    before = group_cpu(pgid)
                    if side == "ours":
                        cpu, wall = time.process_time(), time.perf_counter()
                        with EngineCounts() as counts:
                            res = power.run(cfg, nodes, "netboot")
                        ours_wall.append(time.perf_counter() - wall)
                        ours_cpu.append(time.process_time() - cpu)
                        bad = sum(1 for x in res.values() if not x.ok)
                        failed += bad
                        wire.append(counts.runs[-1])
                        bmc_cpu[side].append(group_cpu(pgid) - before)
                        print(f"  round {r + 1}: ours      {ours_wall[-1]:5.2f} s wall, CPU "
                              f"{ours_cpu[-1]:.2f} s client + {bmc_cpu[side][-1]:.2f} s vBMCs, "
                              f"{bad} failed; wire: {counts.runs[-1]}")
                    else:
                        child = children_cpu()
                        rnd = bos.ipmipower(cycle)
                        theirs_cpu.append(children_cpu() - child)
                        bmc_cpu[side].append(group_cpu(pgid) - before)
                        theirs.append(rnd.seconds)
                        failed += args.nodes - rnd.ok
                        print(f"  round {r + 1}: ipmipower {rnd.seconds:5.2f} s wall, CPU "
                              f"{theirs_cpu[-1]:.2f} s client + {bmc_cpu[side][-1]:.2f} s vBMCs, "
                              f"{rnd.ok} ok")
            if args.pcap:
                for side in ("ours", "ipmipower"):
                    pcap = root / f"{side}.pcap"
                    with Capture(pcap, base, args.nodes) as cap:
                        if side == "ours":
                            power.run(cfg, nodes, "netboot")
                        else:
                            bos.ipmipower(cycle)
                    sent, got = count_packets(pcap, base, args.nodes)
                    print(f"  datagrams {side:9}: {sent} to the BMCs ({sent / args.nodes:.2f} a "
                          f"node), {got} from them ({got / args.nodes:.2f} a node); tcpdump: {cap.stats}")
    ow, oc, ip, ic, ob, ib = (statistics.median(x) for x in (
        ours_wall, ours_cpu, theirs, theirs_cpu, bmc_cpu["ours"], bmc_cpu["ipmipower"]))
    n = args.nodes
    print(f"  median: ours {ow:.2f} s (client CPU {1000 * oc / n:.2f} ms a node, vBMC CPU "
          f"{1000 * ob / n:.2f} ms a node), ipmipower {ip:.2f} s (client CPU "
          f"{1000 * ic / n:.2f} ms a node, vBMC CPU {1000 * ib / n:.2f} ms a node): "
          f"ratio {ow / ip:.2f}")
    sent = sum(w.get("sent", 0) - w.get("resent", 0) for w in wire)
    sessions = sum(w.get("sessions", 0) for w in wire)
    bc.result({"nodes": n, "ours_s": ow, "ours_cpu_s": oc, "ours_bmc_cpu_s": ob,
               "ipmipower_s": ip, "ipmipower_cpu_s": ic, "ipmipower_bmc_cpu_s": ib,
               "vs_ipmipower": ow / ip, "ours_sessions": sessions,
               "ours_requests_per_session": sent / sessions if sessions else 0.0,
               "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
