#!/usr/bin/env python3
"""Benchmark: set-boot + render (with the daemon's check) for N nodes against bare `dhcpd -t` of
the same file, and what rendering a loader config per request costs `pxe-stage serve`.

    tools/bench_render.py [--nodes 10000] [--backend isc|dnsmasq] [--repeat 5] [--rate 500] [--json]

One run, every case interleaved (order alternating), the same repeats; median and spread
(min-max). Every command is a real process started as an admin's is: through the `python3 -S`
launcher tools/install-launcher installs (bytecode compiled, as it leaves it):
  unchanged    `pxe-stage set-boot n[00000-N] --os|--local --render --no-reload`: one transaction,
               then render: the DHCP config's inputs (pxe.dhcpinputs) are those it was installed
               and checked from, so it is neither rendered nor checked again (loader configs are
               rendered per request by serve: no files)
  one changed  the same after ONE node's MAC was changed (what a site does between two set-boots:
               a NIC replaced): only that node's entry is rendered, the daemon checks the header
               and footer with that entry, and it is spliced into the installed file
               (pxe.dhcpincremental)
  full         the same after the installed DHCP file was removed: the full render, the daemon's
               check (dhcpd -t / dnsmasq --test) of the whole file and the install
  set-boot     `pxe-stage set-boot` alone (what the database part costs)
  bare check   the daemon's own check of the same file (the goal: set-boot + render <= 2x it)
  python       `python3 -S -c pass`: what the launcher's interpreter pays to start
All of them beside a running `pxe-stage serve --no-tftp`, as on a live site (serve renders the
loader configs, holds the database open and checkpoints SQLite's WAL every heartbeat, so a
command's close does not); `--without-serve`: no serve, every command checkpoints as it closes.
And, in this process, the set-boot transaction alone (rows updated, one event, COMMIT).
Per request: every MAC's iPXE script rendered from the database (cache emptied by a set-boot),
in-process (ms per config), then over HTTP from a running `pxe-stage serve --no-tftp` at --rate
requests/s, against a static file of the same size from the same server (ms added per config).
Ends with `RESULT ...` (see tools/bench_common.result).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from importlib.machinery import SourceFileLoader  # noqa: E402

import bench_common as bc  # noqa: E402

from pxe import config  # noqa: E402
from pxe.dhcp import backend as dhcp_backend  # noqa: E402
from pxe.images import Catalog  # noqa: E402
from pxe.inventory import Inventory, build  # noqa: E402
from tests.conftest import fake_bzimage  # noqa: E402

launcher = SourceFileLoader("install_launcher", str(ROOT / "tools" / "install-launcher")).load_module()


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the process: user + system, less disturbed by other load, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, proc.stdout


def mac_of(i: int) -> str:
    return f"52:54:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:01"


def site_with(n: int, backend: str, root: Path, http_port: int) -> config.Config:
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    # a /16 so that 10,000 fixed addresses fit beside the dynamic range
    text = config.example(root, backend=backend, subnet="198.18.0.0/16", server="198.18.0.1")
    text += (f'\n[serve]\nhttp_address = "{bc.LOOPBACK}"\nhttp_port = {http_port}\n'
             "http_workers = 1\n")
    (root / "dynprov.toml").write_text(text)
    cfg = config.load(root / "dynprov.toml")
    nodes = []
    for i in range(n):
        hi, lo = divmod(i, 250)
        nodes.append(build(cfg, {"name": f"n{i:05d}", "mac": mac_of(i),
                                 "ip": f"198.18.{hi + 2}.{lo + 2}",
                                 "firmware": "uefi" if i % 3 == 0 else "bios"}))
    Inventory(cfg).add(nodes)
    Catalog(cfg).add("centos5", fake_bzimage(root / "vmlinuz", os.urandom(1024)),
                     cmdline="console=ttyS0,115200")
    return cfg


def change_one_mac(cfg: config.Config, i: int, round_: int | None) -> None:
    """Node i gets a new MAC (outside the timing): one DHCP fact changed; round_ None: its own
    MAC back (the per-request part asks for every mac_of(i))."""
    from pxe import records

    mac = mac_of(i) if round_ is None else \
        f"52:55:{round_ & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}:02"
    inv = Inventory(cfg)
    inv.add([records.replace(inv.get(f"n{i:05d}"), macs=(mac,))], replace_existing=True)
    inv.conn.close()


def transaction_only(cfg: config.Config, n: int, repeat: int) -> tuple[float, float]:
    """Median (wall s, CPU s) of the set-boot transaction alone, in this process: N rows
    updated (the UPDATE is also the check: its row count), one event, COMMIT (with SQLite's
    WAL checkpoint) - the database's part."""
    from pxe import db
    from pxe.setboot import _record, _token_text

    inv = Inventory(cfg)
    names = [f"n{i:05d}" for i in range(n)]
    wall, cpu = [], []
    for _ in range(repeat):
        tokens = _token_text(n)
        start, start_cpu = time.perf_counter(), time.process_time()
        with db.transaction(inv.conn):  # what pxe.setboot.set_boot runs
            if _record(inv.conn, names, "centos5", "x86_64", tokens, False) != n:
                raise SystemExit("set-boot changed fewer nodes than named")
            db.log_event(inv.conn, "set-boot", None, f"centos5: {names[0]}.. ({n} node(s))")
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    inv.conn.close()
    return statistics.median(wall), statistics.median(cpu)


def in_process(cfg: config.Config, n: int) -> float:
    """Seconds per config: every node's iPXE script rendered once from a cold cache."""
    from pxe.serve.bootconfigs import BootConfigs

    configs = BootConfigs(cfg)
    configs.lookup("boot.ipxe")  # the connection and the templates, as a running worker has
    start = time.perf_counter()
    for i in range(n):
        configs.lookup(f"ipxe/{mac_of(i).replace(':', '-')}.ipxe")
    return (time.perf_counter() - start) / n


def paced(port: int, paths: list[str], rate: float) -> list[float]:
    """GET each path at ``rate`` requests/s on one keep-alive connection -> latencies (s)."""
    conn = http.client.HTTPConnection(bc.LOOPBACK, port, timeout=10)
    out = []
    start = time.perf_counter()
    for i, path in enumerate(paths):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        out.append(time.perf_counter() - t0)
        if resp.status != 200 or not body:
            raise SystemExit(f"GET {path}: HTTP {resp.status}")
    conn.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--backend", default="isc", choices=("isc", "dnsmasq"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rate", type=float, default=500.0, help="requests/s of the HTTP part")
    ap.add_argument("--requests", type=int, default=1000, help="requests per HTTP series")
    ap.add_argument("--without-serve", action="store_true",
                    help="run the commands with no `serve` holding the database open (each "
                         "command then checkpoints SQLite's WAL when it closes)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    py, n = sys.executable, args.nodes
    fields: dict[str, object] = {"nodes": n, "backend": args.backend, "repeat": args.repeat,
                                 "serve_running": int(not args.without_serve)}
    with tempfile.TemporaryDirectory(prefix="dynprov-bench-") as tmp:
        port = bc.free_port()
        cfg = site_with(n, args.backend, Path(tmp) / "site", port)
        env = {**os.environ, "DYNPROV_CONFIG": str(cfg.path), "PYTHONPATH": str(ROOT)}
        stage = str(launcher.install(Path(tmp) / "pxe-stage", py, ROOT, "pxe-stage"))
        nodes = f"n[00000-{n - 1:05d}]"
        subprocess.run([stage, "render", "--no-reload"], env=env, check=True, capture_output=True)
        sample = Path(tmp) / "sample"
        live = contextlib.ExitStack()
        if not args.without_serve:  # a live site: serve holds the database open and checkpoints
            live.enter_context(bc.server(bc.serve_argv(cfg.path, "--no-tftp"),
                                         sample.with_suffix(".log")))
            bc.wait_until(lambda: bc.curl_ok(f"http://{bc.LOOPBACK}:{port}/healthz"), "serve")
        cases = {
            "unchanged": lambda t: [stage, "set-boot", nodes, *t, "--render", "--no-reload"],
            "one": lambda t: [stage, "set-boot", nodes, *t, "--render", "--no-reload"],
            "full": lambda t: [stage, "set-boot", nodes, *t, "--render", "--no-reload"],
            "setboot": lambda t: [stage, "set-boot", nodes, *t],
            "bare": lambda t: dhcp_backend(args.backend).check_argv(cfg.dhcp.config_file),
            "python": lambda t: [py, "-S", "-c", "pass"],
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        outputs: dict[str, str] = {}
        moved: set[int] = set()
        for r in range(args.repeat):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for i, name in enumerate(order):
                target = ["--os", "centos5"] if (r + i) % 2 == 0 else ["--local"]
                if name == "one":
                    moved.add((r * 7919 + i) % n)
                    change_one_mac(cfg, (r * 7919 + i) % n, r)  # one entry to re-render
                if name == "full":
                    cfg.dhcp.config_file.unlink()  # render, check and install it all again
                seconds, used, outputs[name] = timed(cases[name](target), env)
                times[name].append(seconds)
                cpu[name].append(used)
        if ("installed" not in outputs["one"] or "installed" not in outputs["full"]
                or "unchanged" not in outputs["unchanged"]):
            raise SystemExit(f"unexpected output: {outputs}")
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"{n} nodes, backend {args.backend}, {args.repeat} rounds interleaved, "
              f"{'no serve running' if args.without_serve else 'beside a running serve'}; "
              f"{bc.load_note()}")
        names = {"unchanged": "set-boot --render, DHCP unchanged",
                 "one": "set-boot --render, one node's MAC changed",
                 "full": "set-boot --render, full render (no installed file)",
                 "setboot": "set-boot alone",
                 "bare": "bare daemon check",
                 "python": "python3 -S -c pass"}
        print(bc.table(["one process (python3 -S launcher)", "median s", "spread s", "x bare",
                        "CPU s", "CPU x bare"],
                       [(names[k], f"{med[k]:.3f}", bc.spread(times[k]),
                         f"{med[k] / med['bare']:.2f}", f"{med_cpu[k]:.3f}",
                         f"{med_cpu[k] / med_cpu['bare']:.2f}") for k in names]))
        ratio, one, full = (med[k] / med["bare"] for k in ("unchanged", "one", "full"))
        print(f"set-boot + render / bare check = {ratio:.2f}x with the DHCP config unchanged (what "
              f"a set-boot leaves it), {one:.2f}x with one node's MAC changed, {full:.2f}x "
              "rendering the whole file (goal <= 2x)")

        def spread(key: str) -> str:
            return f"{min(times[key]) / max(times['bare']):.2f}-" \
                   f"{max(times[key]) / min(times['bare']):.2f}"

        tx_wall, tx_cpu = transaction_only(cfg, n, args.repeat)
        print(f"the set-boot transaction alone, in-process: {tx_wall:.3f} s wall, {tx_cpu:.3f} s "
              f"CPU = {tx_cpu / med_cpu['bare']:.2f}x the bare check's CPU")
        fields.update(transaction_cpu_s=tx_cpu, transaction_cpu_ratio=tx_cpu / med_cpu["bare"])
        fields.update(unchanged_s=med["unchanged"],
                      setboot_s=med["setboot"], bare_check_s=med["bare"], python_s=med["python"],
                      render_ratio=ratio, render_ratio_spread=spread("unchanged"),
                      one_changed_s=med["one"], full_s=med["full"],
                      render_one_changed_ratio=one, render_full_ratio=full,
                      render_cpu_ratio=med_cpu["unchanged"] / med_cpu["bare"],
                      render_one_changed_cpu_ratio=med_cpu["one"] / med_cpu["bare"],
                      render_full_cpu_ratio=med_cpu["full"] / med_cpu["bare"],
                      render_one_changed_ratio_spread=spread("one"),
                      render_full_ratio_spread=spread("full"))

        # -- per request --------------------------------------------------------------------
        for i in moved:
            change_one_mac(cfg, i, None)
        subprocess.run([py, "-m", "pxe.cli.main", "set-boot", nodes, "--os",
                        "centos5"], env=env, check=True, capture_output=True)
        per_config = in_process(cfg, n)
        print(f"in-process: {per_config * 1000:.3f} ms per config rendered from the database "
              f"({n} distinct MACs, cold cache)")
        fields["render_ms_per_config"] = per_config * 1000
        from pxe.serve.bootconfigs import BootConfigs

        size_like = BootConfigs(cfg).lookup(f"ipxe/{mac_of(0).replace(':', '-')}.ipxe")
        static = cfg.paths.http_root / "static.ipxe"
        static.parent.mkdir(parents=True, exist_ok=True)
        static.write_bytes(size_like)
        static.chmod(0o644)
        count = min(args.requests, n)
        with live:
            if args.without_serve:
                live.enter_context(bc.server(bc.serve_argv(cfg.path, "--no-tftp"),
                                             sample.with_suffix(".log")))
                bc.wait_until(lambda: bc.curl_ok(f"http://{bc.LOOPBACK}:{port}/healthz"), "serve")
            rendered_lat, static_lat = [], []
            for r in range(2):  # two rounds, each a cold rendered series and a static series
                subprocess.run([py, "-m", "pxe.cli.main", "set-boot", nodes, "--os",
                                "centos5"], env=env, check=True, capture_output=True)
                paths = [f"/ipxe/{mac_of(i % n).replace(':', '-')}.ipxe"
                         for i in range(r * count // 2, r * count // 2 + count)]
                series = [("rendered", paths), ("static", ["/static.ipxe"] * count)]
                for name, p in (series if r % 2 == 0 else series[::-1]):
                    lat = paced(port, p, args.rate)
                    (rendered_lat if name == "rendered" else static_lat).extend(lat)
        med_r, med_s = statistics.median(rendered_lat), statistics.median(static_lat)
        p95 = lambda v: sorted(v)[int(len(v) * 0.95)]  # noqa: E731
        added = med_r - med_s
        print(f"HTTP at {args.rate:.0f} req/s, {len(rendered_lat)} requests each: rendered "
              f"median {med_r * 1000:.3f} ms (p95 {p95(rendered_lat) * 1000:.3f}), static "
              f"{med_s * 1000:.3f} ms (p95 {p95(static_lat) * 1000:.3f}); added "
              f"{added * 1000:.3f} ms per config (goal <= 1 ms)")
        fields.update(http_rate=args.rate, http_rendered_ms=med_r * 1000,
                      http_static_ms=med_s * 1000, http_added_ms=added * 1000,
                      http_rendered_p95_ms=p95(rendered_lat) * 1000)
    bc.result(fields, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
