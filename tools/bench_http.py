#!/usr/bin/env python3
"""HTTP boot-file benchmark: `pxe-stage serve` against nginx, same machine, same run.

N concurrent curl downloads (default 32) of one 64 MiB file, in rounds that alternate the
servers (same repeats each); ratio = nginx seconds / server seconds (above 1: faster than nginx),
taken per round (the two servers of one round ran back to back, under the same load) and reported
as the median and min-max of those rounds. Also the CPU seconds each server's processes used
(user + system, from /proc): on loopback most of the wall time is the clients' copies, so the
server's own CPU cost is the figure that does not move with the machine's load; and the
median time to the first byte of the answer (curl's time_starttransfer), and the server CPU per
request of 1,000 keep-alive GETs of a 1 KiB file (one curl): the per-request cost.
serve answers boot files on its fast path (pxe/serve/fastpath.py: its own request parse, one
write per small file, sendfile in 512 KiB turns, corked with TCP_CORK), not through the framework.
nginx runs as a boot server would run it: 2 workers, sendfile on, tcp_nopush on (TCP_CORK, as
serve), its default sendfile_max_chunk (2 MiB since nginx 1.21.4; 0, unbounded, before).
Besides serve and nginx, two references show why serve's HTTP is
built the way it is (`--all`):
- "starlette-stock": the same framework without our zero-copy protocol (Starlette's
  StaticFiles/FileResponse on uvicorn's h11 protocol, 2 worker processes: 64 KiB reads through a
  thread pool);
- "http.server": Python's standard library server (threads, copies through user space).

    python3 tools/bench_http.py [--rounds 5] [--clients 32] [--size-mb 64] [--all]

Loopback only; every server is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import bench_common as bc

FILE = "image.bin"
SMALL = "small.cfg"  # 1 KiB: the per-request cost, without the copying
SMALL_GETS = 1000

STOCK_STARLETTE = r"""
import os, socket, sys, uvicorn
from starlette.applications import Starlette
from starlette.staticfiles import StaticFiles
root, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(); sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port)); sock.listen(1024)
for _ in range(workers - 1):
    if os.fork() == 0:
        break
app = Starlette(); app.mount("/", StaticFiles(directory=root))
uvicorn.Server(uvicorn.Config(app, http="h11", lifespan="off", access_log=False,
                              log_level="warning")).run(sockets=[sock])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="worker processes of every server")
    ap.add_argument("--all", action="store_true", help="also the two Python references")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    for tool in ("curl", "nginx"):
        if not shutil.which(tool):
            print(f"bench_http: {tool} not found (tools/install-deps installs it)", file=sys.stderr)
            return 2
    return bc.run_in_workdir("bench-http-", _bench, args)


def _bench(work: Path, args: argparse.Namespace) -> int:
    size = args.size_mb << 20
    ports = {"nginx": bc.free_port(), "serve": bc.free_port()}
    config = bc.make_site(work / "site", {"http_address": bc.LOOPBACK, "http_port": ports["serve"],
                                          "http_workers": args.workers, "tftp": False})
    root = work / "site" / "http"
    with open(root / FILE, "wb") as fh:
        for _ in range(args.size_mb):
            fh.write(os.urandom(1 << 20))
    os.chmod(root / FILE, 0o644)
    (root / SMALL).write_bytes(os.urandom(1024))
    os.chmod(root / SMALL, 0o644)
    ng = work / "nginx"
    ng.mkdir()
    (ng / "nginx.conf").write_text(
        f"worker_processes {args.workers};\nuser root;\npid {ng}/nginx.pid;\n"
        f"error_log {ng}/error.log;\ndaemon off;\nevents {{ worker_connections 1024; }}\n"
        f"http {{ access_log off; sendfile on; tcp_nopush on; client_body_temp_path {ng}/b; "
        f"proxy_temp_path {ng}/p; fastcgi_temp_path {ng}/f; uwsgi_temp_path {ng}/u; "
        f"scgi_temp_path {ng}/s;\n  server {{ listen {bc.LOOPBACK}:{ports['nginx']}; "
        f"root {root}; }} }}\n")
    servers = {"nginx": ["nginx", "-p", str(ng), "-c", str(ng / "nginx.conf")],
               "serve": bc.serve_argv(config, "--no-tftp")}
    if args.all:
        ports["starlette-stock"] = bc.free_port()
        ports["http.server"] = bc.free_port()
        servers["starlette-stock"] = [sys.executable, "-c", STOCK_STARLETTE, str(root),
                                      str(ports["starlette-stock"]), str(args.workers)]
        servers["http.server"] = [sys.executable, "-m", "http.server", "--bind", bc.LOOPBACK,
                                  "--directory", str(root), str(ports["http.server"])]

    times: dict[str, list[float]] = {s: [] for s in servers}
    cpu: dict[str, list[float]] = {s: [] for s in servers}
    first_byte: dict[str, list[float]] = {s: [] for s in servers}
    small_cpu: dict[str, list[float]] = {s: [] for s in servers}
    failures = dict.fromkeys(servers, 0)
    groups: dict[str, int] = {}
    stack = []
    try:
        for name, argv in servers.items():
            cm = bc.server(argv, work / f"{name}.log")
            groups[name] = cm.__enter__()
            stack.append(cm)
            bc.wait_until(lambda n=name: bc.curl_ok(
                f"http://{bc.LOOPBACK}:{ports[n]}/{FILE}", "-r", "0-0"), name)
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                argv = ["curl", "-s", "-S", "--max-time", "600", "-o", "/dev/null", "-w",
                        "%{size_download} %{time_starttransfer}", f"http://{bc.LOOPBACK}:{ports[name]}/{FILE}"]
                used = group_cpu_seconds(groups[name])
                seconds, outs = bc.parallel([argv] * args.clients)
                times[name].append(seconds)
                cpu[name].append(group_cpu_seconds(groups[name]) - used)
                failures[name] += sum(1 for o in outs if o.split()[:1] != [str(size)])
                first_byte[name] += [float(o.split()[1]) for o in outs
                                     if len(o.split()) == 2 and o.split()[0] == str(size)]
                time.sleep(0.2)
            for name in order:  # the per-request cost: one keep-alive client, small GETs
                used = group_cpu_seconds(groups[name])
                url = f"http://{bc.LOOPBACK}:{ports[name]}/{SMALL}"
                argv = ["curl", "-s", "-S", "--max-time", "120", "-w", "%{http_code}\\n"]
                for _ in range(SMALL_GETS):
                    argv += ["-o", "/dev/null", url]
                _, outs = bc.parallel([argv])
                small_cpu[name].append((group_cpu_seconds(groups[name]) - used) / SMALL_GETS)
                failures[name] += SMALL_GETS - outs[0].split().count("200")
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {times[n][-1]:.3f} s (CPU {cpu[n][-1]:.2f} s)" for n in servers)
                + f" ({bc.load_note()})", flush=True)
    finally:
        while stack:
            stack.pop().__exit__(None, None, None)

    base = bc.median(times["nginx"])
    rows = []
    for name in servers:
        t = bc.median(times[name])
        per_round = [a / b for a, b in zip(times["nginx"], times[name], strict=True)]
        rows.append([name, f"{t:.3f}", f"{args.clients * size / t / 1e6:.0f}",
                     f"{bc.median(per_round):.2f}x", bc.spread(per_round),
                     f"{bc.median(cpu[name]):.2f}", f"{bc.median(first_byte[name]) * 1e3:.0f}",
                     f"{bc.median(small_cpu[name]) * 1e3:.3f}",
                     failures[name]])
    print(f"HTTP, loopback, {args.clients} concurrent curl downloads of {args.size_mb} MiB, "
          f"{args.workers} worker processes each, median of {args.rounds} alternating rounds "
          f"({bc.load_note()} at the end)")
    print(bc.table(["server", "seconds", "MB/s", "vs nginx (rounds)", "spread", "server CPU s",
                    "first byte ms", "CPU ms per small GET", "failed"], rows))
    ratios = [a / b for a, b in zip(times["nginx"], times["serve"], strict=True)]
    bc.result({"clients": args.clients, "size_mb": args.size_mb, "rounds": args.rounds,
               "http_ratio": bc.median(ratios), "http_ratio_spread": bc.spread(ratios),
               "serve_s": bc.median(times["serve"]), "nginx_s": base,
               "serve_cpu_s": bc.median(cpu["serve"]), "nginx_cpu_s": bc.median(cpu["nginx"]),
               "serve_first_byte_ms": bc.median(first_byte["serve"]) * 1e3,
               "nginx_first_byte_ms": bc.median(first_byte["nginx"]) * 1e3,
               "serve_cpu_ms_per_get": bc.median(small_cpu["serve"]) * 1e3,
               "nginx_cpu_ms_per_get": bc.median(small_cpu["nginx"]) * 1e3,
               "failed": sum(failures.values())}, args.json)
    return 1 if any(failures.values()) else 0


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in the group (the server's workers)."""
    ticks = sum(int(f[11]) + int(f[12]) for _, f in bc.group_stats(pgid))  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
