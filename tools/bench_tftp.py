#!/usr/bin/env python3
"""TFTP benchmark: `pxe-stage serve` against tftpd-hpa, same machine, same run, same client.

The client is curl's tftp:// (a real, independent TFTP client). Measured, in rounds that
alternate the servers (so a busy neighbour hurts both alike), medians reported:
- one transfer of an 8 MiB file at blksize 512, 1468 and 65464;
- a boot storm: N clients (default 128) each fetching the 8 MiB file at blksize 1468, warm (the
  server has served the file before) and cold (a file no server has served yet: a new copy per
  round, so every worker's first requests for it arrive together).
Ratio = tftpd-hpa seconds / serve seconds (above 1: serve is faster). Every transfer's size is
checked; a storm with a failed or short transfer is reported as such.

    python3 tools/bench_tftp.py [--rounds 3] [--clients 128] [--workers N] [--with-tftpy] [--json]

Ends with `RESULT storm_ratio=... cold_storm_ratio=... cold_vs_warm=...` (tools/bench_common).

Needs root (tftpd-hpa chroots into its root), curl and in.tftpd. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_common as bc

SIZE = 8 << 20
FILE = "storm.bin"


def curl_argv(port: int, blksize: int, name: str = FILE) -> list[str]:
    return ["curl", "-s", "-S", "--max-time", "600", "--tftp-blksize", str(blksize),
            "-o", "/dev/null", "-w", "%{size_download}", f"tftp://{bc.LOOPBACK}:{port}/{name}"]


def run_once(port: int, clients: int, blksize: int, name: str = FILE) -> tuple[float, int]:
    """(seconds, failed transfers) for ``clients`` simultaneous downloads."""
    seconds, outs = bc.parallel([curl_argv(port, blksize, name)] * clients)
    failed = sum(1 for o in outs if o.strip() != str(SIZE))
    return seconds, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the storm")
    ap.add_argument("--single-rounds", type=int, default=9,
                    help="rounds of each single transfer (short and noisy: more of them)")
    ap.add_argument("--clients", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None, help="serve's TFTP workers")
    ap.add_argument("--blksizes", default="512,1468,65464")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (server logs)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    ap.add_argument("--with-tftpy", action="store_true",
                    help="also measure stock tftpy.TftpServer (the baseline serve improves on)")
    args = ap.parse_args()
    for tool in ("curl", "in.tftpd"):
        if not shutil.which(tool):
            print(f"bench_tftp: {tool} not found (tools/install-deps installs it)", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("bench_tftp: run as root (tftpd-hpa chroots into its root)", file=sys.stderr)
        return 2

    return bc.run_in_workdir("bench-tftp-", _bench, args, keep=args.keep)


def _bench(work: Path, args: argparse.Namespace) -> int:
    ports = {"tftpd-hpa": bc.free_port(), "serve": bc.free_port()}
    serve_cfg = {"tftp_address": bc.LOOPBACK, "tftp_port": ports["serve"], "http": False,
                 "max_transfers": max(512, args.clients * 2)}
    if args.workers:
        serve_cfg["tftp_workers"] = args.workers
    config = bc.make_site(work / "site", serve_cfg)
    root = work / "site" / "tftp"
    data = os.urandom(SIZE)
    (root / FILE).write_bytes(data)
    os.chmod(root / FILE, 0o644)

    servers = {
        "tftpd-hpa": ["in.tftpd", "--foreground", "--listen", "--address",
                      f"{bc.LOOPBACK}:{ports['tftpd-hpa']}", "--secure", str(root)],
        "serve": bc.serve_argv(config),
    }
    if args.with_tftpy:
        ports["tftpy"] = bc.free_port()
        servers["tftpy"] = [sys.executable, "-c",
                            "import sys, tftpy; tftpy.TftpServer(sys.argv[1]).listen("
                            "sys.argv[2], int(sys.argv[3]))", str(root), bc.LOOPBACK,
                            str(ports["tftpy"])]
    blksizes = [int(b) for b in args.blksizes.split(",")]
    tests = [(f"1 client, blksize {b}", 1, b) for b in blksizes]
    storm = f"{args.clients} clients x 8 MiB, blksize 1468"
    cold = f"{args.clients} clients x 8 MiB, cold (first requests)"
    tests.append((storm, args.clients, 1468))
    tests.append((cold, args.clients, 1468))
    rounds = max(args.rounds, args.single_rounds)
    times: dict[tuple[str, str], list[float]] = {}
    failures: dict[tuple[str, str], int] = {}

    with _started(servers, ports, work) as _:
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name, clients, blksize in tests:
                if r >= (args.rounds if clients > 1 else args.single_rounds):
                    continue
                for server in order:
                    name_on_disk = FILE
                    if name == cold:  # a file this server has never served
                        name_on_disk = f"cold-{r}-{server}.bin"
                        (root / name_on_disk).write_bytes(data)
                        os.chmod(root / name_on_disk, 0o644)
                    seconds, failed = run_once(ports[server], clients, blksize, name_on_disk)
                    times.setdefault((name, server), []).append(seconds)
                    failures[(name, server)] = failures.get((name, server), 0) + failed
                    time.sleep(0.2)
            print(f"round {r + 1}/{rounds} done ({bc.load_note()})", file=sys.stderr)

    rows = []
    for name, clients, _b in tests:
        if (name, "tftpd-hpa") not in times:
            continue  # not measured (--single-rounds 0)
        base = bc.median(times[(name, "tftpd-hpa")])
        for server in servers:
            t = bc.median(times[(name, server)])
            mbs = clients * SIZE / t / 1e6
            rows.append([name, server, f"{t:.3f}", f"{mbs:.0f}",
                         f"{base / t:.2f}x", failures[(name, server)]])
    print(f"TFTP, loopback, curl {_curl_version()} client, 8 MiB file, medians of "
          f"{args.single_rounds} (single) and {args.rounds} (storm) alternating rounds "
          f"({bc.load_note()} at the end)")
    print(bc.table(["test", "server", "seconds", "MB/s", "vs tftpd-hpa", "failed"], rows))
    fields: dict[str, object] = {"clients": args.clients, "rounds": args.rounds}
    for key, test in (("storm", storm), ("cold_storm", cold)):
        hpa, ours = times.get((test, "tftpd-hpa")), times.get((test, "serve"))
        if hpa and ours:
            fields[f"{key}_ratio"] = bc.median(hpa) / bc.median(ours)
            fields[f"{key}_ratio_spread"] = f"{min(hpa) / max(ours):.2f}-{max(hpa) / min(ours):.2f}"
            fields[f"{key}_serve_s"] = bc.median(ours)
    if times.get((storm, "serve")) and times.get((cold, "serve")):
        fields["cold_vs_warm"] = bc.median(times[(cold, "serve")]) / bc.median(times[(storm, "serve")])
    fields["failed"] = sum(failures.values())
    bc.result(fields, args.json)
    return 1 if any(failures.values()) else 0


class _started:
    """Start every server, wait until each answers a TFTP request, stop them all at the end."""

    def __init__(self, servers: dict[str, list[str]], ports: dict[str, int], work: Path):
        self.servers, self.ports, self.work = servers, ports, work
        self.stack: list = []

    def __enter__(self) -> _started:
        try:
            for name, argv in self.servers.items():
                cm = bc.server(argv, self.work / f"{name}.log")
                cm.__enter__()
                self.stack.append(cm)
                bc.wait_until(lambda n=name: bc.curl_ok(
                    f"tftp://{bc.LOOPBACK}:{self.ports[n]}/{FILE}"), name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self.stack:
            self.stack.pop().__exit__(None, None, None)


def _curl_version() -> str:
    out = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    return out.split()[1] if out else "?"


if __name__ == "__main__":
    sys.exit(main())
