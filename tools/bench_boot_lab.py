#!/usr/bin/env python3
"""Real-lab boot benchmark: a 4-node `os-switch` over iPXE/HTTP against the TFTP-only chain.

The lab (`dynprov-lab`, package lab/) plays the hardware: N QEMU VMs (TCG) with virtual IPMI
BMCs in a network namespace of their own, DHCP from the config `pxe-stage render` wrote, boot
files from `pxe-stage serve`. Each switch is `os-switch NODES --set OS=tiny --force --wait` run
inside the namespace as Moab runs it (power-cycle every node, then wait until every node has
called home `ready`); the figure is its wall time, requested to all ready. The two paths differ
only in `[boot] ipxe_http` (then `pxe-stage render`; the lab restarts its DHCP server when the
rendered config changes):
- "http": TFTP carries undionly.kpxe (BIOS) / ipxe.efi (UEFI) only; iPXE fetches its script,
  the kernel and the initrd over HTTP;
- "tftp": pxelinux (BIOS) / GRUB (UEFI) fetch their config, the kernel and the initrd over TFTP.
Rounds alternate the order of the paths (http, tftp / tftp, http, ...); the same repeats each.
Ratio = HTTP wall / TFTP wall per round (goal <= 0.6), median and min-max of the rounds.

    tools/bench_boot_lab.py [--nodes 4] [--rounds 3] [--firmware bios|uefi|mixed] [--json]
    tools/bench_boot.py --lab ...          (the same)

Root only (namespaces, taps). Nothing leaves the machine: the namespace has no uplink and is
removed at the end (`dynprov-lab down`), with the throw-away site. serve's byte counters prove
each switch went over the path it was asked for (else the switch counts as failed). Not part of
CI: one round of 4 BIOS nodes costs about 3 minutes on 2 busy cores (HTTP 60 s, TFTP 120 s at
load 12-25), plus a first uncounted switch; 3 rounds ended in 10 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import bench_common as bc

ROOT = bc.ROOT
PATHS = ("http", "tftp")
LABEL = "tiny"


class Lab:
    """A throw-away site with its lab: images built, nodes registered, QEMU VMs defined."""

    def __init__(self, work: Path, nodes: int, firmware: str, timeout: float):
        self.work = work
        self.site = work / "site"
        self.config = self.site / "dynprov.toml"
        self.netns = f"dpb-{uuid.uuid4().hex[:8]}"
        self.names = [f"node{i + 1}" for i in range(nodes)]
        self.firmware = firmware
        self.timeout = timeout
        self.env = {**os.environ, "DYNPROV_CONFIG": str(self.config), "PYTHONPATH": str(ROOT)}
        self.up = False
        self.base = ""

    def run(self, *argv: str, inside: bool = False, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
        full = list(argv)
        if inside:
            full = [sys.executable, "-m", "lab.cli", "exec", "--", *full]
        proc = subprocess.run(full, env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=str(ROOT))
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-600:]}")
        return proc

    def pxe(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "pxe.cli.main", *argv, **kw)

    def node_firmware(self, i: int) -> str:
        if self.firmware == "mixed":
            return "bios" if i % 2 == 0 else "uefi"
        return self.firmware

    def make(self) -> None:
        from pxe import config

        self.site.mkdir(parents=True)
        os.chmod(self.work, 0o755)
        lines = [config.example(self.site), "", "[lab]", f'netns = "{self.netns}"']
        for i, name in enumerate(self.names):
            lines += ["", "[[lab.nodes]]", f'name = "{name}"', f'mac = "52:54:00:b7:00:{i + 1:02x}"',
                      f'ip = "198.18.0.{11 + i}"', f'firmware = "{self.node_firmware(i)}"',
                      'power = "ipmi"']
        self.base = "\n".join(lines) + "\n"
        self.set_path("http")
        kroot = subprocess.run([str(ROOT / "tools/fetch-kernel")], capture_output=True, text=True,
                               check=True, timeout=900).stdout.strip()
        out = self.site / "images" / LABEL
        out.mkdir(parents=True)
        self.run(str(ROOT / "tools/make-test-image"), LABEL, "-o", str(out / f"{LABEL}.tar.gz"),
                 "--kernel-root", kroot, "--boot-dir", str(out))
        # no_timer_check: on a host loaded by 4 TCG VMs and other runs, the kernel's IO-APIC timer
        # check can fail ("IO-APIC + timer doesn't work", a panic at 0.06 s, seen in a bench run)
        # and that node never calls home; the same command line over both paths.
        self.pxe("images", "add", LABEL, "--kernel", str(out / "vmlinuz"), "--initrd",
                 str(out / "initrd.img"), "--rootfs", str(out / f"{LABEL}.tar.gz"), "--os-name",
                 "Tiny", "--cmdline", "console=ttyS0,115200 no_timer_check", "--prov-seconds",
                 str(int(self.timeout)))

    def start(self) -> None:
        self.up = True  # from here on `down` must run, whatever happens
        self.run(sys.executable, "-m", "lab.cli", "up", timeout=180)

    def stop(self) -> None:
        if self.up:
            self.run(sys.executable, "-m", "lab.cli", "down", check=False, timeout=180)
            self.up = False

    def set_path(self, path: str) -> None:
        """[boot] ipxe_http for this path, the DHCP config rendered, the lab's DHCP restarted."""
        self.config.write_text(f"{self.base}\n[boot]\nipxe_http = "
                               f"{'true' if path == 'http' else 'false'}\n")
        if not self.up:
            return
        from pxe import config

        conf = config.load(self.config).dhcp.config_file
        rendered = conf.read_text()
        before = self.dhcp_pid()
        self.pxe("render")
        if conf.read_text() == rendered:
            return  # the same DHCP config: nothing to restart
        deadline = time.monotonic() + 30  # the supervisor looks once a second
        while time.monotonic() < deadline:
            pid = self.dhcp_pid()
            if pid and pid != before:
                time.sleep(1.0)  # dnsmasq binds its sockets
                return
            time.sleep(0.2)
        raise RuntimeError("the lab did not restart its DHCP server after render")

    def dhcp_pid(self) -> int | None:
        from lab import cluster
        from pxe import config

        state = cluster.read_state(config.load(self.config)) or {}
        return (state.get("services") or {}).get("dhcp", {}).get("pid")

    def switch(self) -> tuple[float, str, bool, dict[str, float]]:
        """os-switch --force --wait of every node: (wall seconds, its output, all ready, each
        node's seconds to ready, seen by polling the state database while it runs)."""
        import threading

        t0 = time.monotonic()
        ready_at: dict[str, float] = {}
        left: set[str] = set()  # nodes seen out of "ready" (power-cycled, booting)
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                try:
                    states = self.states()
                except Exception:  # noqa: BLE001 (a busy database: look again next time)
                    continue
                for name, state in states.items():
                    if state != "ready":
                        left.add(name)
                    elif name in left and name not in ready_at:
                        ready_at[name] = time.monotonic() - t0

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            proc = self.run(sys.executable, "-m", "msm_plugin.os_switch", ",".join(self.names),
                            "--set", f"OS={LABEL}", "--force", "--wait", inside=True,
                            timeout=self.timeout + 120, check=False)
        finally:
            done.set()
            watcher.join(5)
        wall = time.monotonic() - t0
        with contextlib.suppress(Exception):  # ready in the last half second: at the end
            for name, state in self.states().items():
                if state == "ready" and name in left and name not in ready_at:
                    ready_at[name] = wall
        return wall, (proc.stdout + proc.stderr).strip(), proc.returncode == 0 and \
            self.all_ready(), ready_at

    def bytes_served(self) -> dict[str, float]:
        """serve's byte counters (/metrics, inside the namespace): which path carried the files."""
        from pxe import config

        cfg = config.load(self.config)
        out = self.run("curl", "-s", "-S", "--max-time", "10",
                       f"http://{cfg.network.server}:{cfg.boot.http_port}/metrics",
                       inside=True, timeout=60).stdout
        values = {}
        for row in out.splitlines():
            name, _, value = row.rpartition(" ")
            if name in ("dynprov_tftp_bytes_total", "dynprov_http_bytes_total"):
                values[name.split("_")[1]] = float(value)
        return values

    def states(self) -> dict[str, str]:
        import sqlite3

        from pxe import config

        conn = sqlite3.connect(f"file:{config.load(self.config).db_path}?mode=ro", uri=True,
                               timeout=5)
        try:
            return dict(conn.execute("SELECT name, state FROM nodes").fetchall())
        finally:
            conn.close()

    def all_ready(self) -> bool:
        rows = self.states()
        return all(rows.get(n) == "ready" for n in self.names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4, help="QEMU nodes switched at once (1-8)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each path once per round")
    ap.add_argument("--firmware", choices=("bios", "uefi", "mixed"), default="bios")
    ap.add_argument("--timeout", type=float, default=420.0,
                    help="seconds a switch may take (each node's prov_seconds)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (not the lab)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args(argv)
    if not 1 <= args.nodes <= 8 or not 1 <= args.rounds <= 20:
        print("bench_boot_lab: --nodes 1-8, --rounds 1-20", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_boot_lab: run as root (network namespaces, QEMU taps)", file=sys.stderr)
        return 2
    for tool in ("qemu-system-x86_64", "dnsmasq", "ip"):
        if not shutil.which(tool):
            print(f"bench_boot_lab: {tool} not found (tools/install-deps installs it)",
                  file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="bench-boot-lab-"))
    try:
        return _bench(Lab(work, args.nodes, args.firmware, args.timeout), args)
    finally:
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _bench(lab: Lab, args: argparse.Namespace) -> int:
    walls: dict[str, list[float]] = {p: [] for p in PATHS}
    carried: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    per_firmware: dict[str, dict[str, list[float]]] = {p: {} for p in PATHS}
    failed = dict.fromkeys(PATHS, 0)
    t_start = time.monotonic()
    try:
        lab.make()
        lab.start()
        # A first switch (not counted) so every counted one starts from nodes that run the image.
        lab.set_path(PATHS[0])
        wall, out, ok, _ = lab.switch()
        print(f"warm-up switch over http: {wall:.1f} s ({'all ready' if ok else 'FAILED'})",
              flush=True)
        for r in range(args.rounds):
            for path in PATHS if r % 2 == 0 else tuple(reversed(PATHS)):
                lab.set_path(path)
                before = lab.bytes_served()
                wall, out, ok, ready_at = lab.switch()
                after = lab.bytes_served()
                moved = {k: (after.get(k, 0) - before.get(k, 0)) / 1e6 for k in ("tftp", "http")}
                # The path must be the one asked for: TFTP-only moves the kernels over TFTP.
                big, small = ("http", "tftp") if path == "http" else ("tftp", "http")
                if ok and not moved[big] > moved[small]:
                    ok, out = False, f"files went over {small}, not {big}: {moved}"
                walls[path].append(wall)
                carried[path].append(moved)
                for i, name in enumerate(lab.names):
                    if name in ready_at:
                        per_firmware[path].setdefault(lab.node_firmware(i), []).append(
                            ready_at[name])
                failed[path] += 0 if ok else 1
                nodes = " ".join(f"{n} {lab.node_firmware(i)} {ready_at[n]:.0f} s"
                                 for i, n in enumerate(lab.names) if n in ready_at)
                print(f"round {r + 1}/{args.rounds} {path}: {wall:.1f} s, TFTP "
                      f"{moved['tftp']:.1f} MB, HTTP {moved['http']:.1f} MB, ready: {nodes} "
                      f"({'all ready' if ok else 'FAILED: ' + out[-300:]}) ({bc.load_note()})",
                      flush=True)
    finally:
        lab.stop()
    ratios = [h / t for h, t in zip(walls["http"], walls["tftp"], strict=False)]
    print(f"{args.nodes} QEMU nodes (TCG, {args.firmware}, IPMI) switched at once by os-switch, "
          f"requested to all ready, {args.rounds} interleaved rounds "
          f"({bc.load_note()} at the end; whole bench {time.monotonic() - t_start:.0f} s)")
    rows = [[p, "iPXE: script, kernel, initrd over HTTP" if p == "http" else
             "pxelinux/GRUB: all over TFTP", f"{bc.median(walls[p]):.1f}", bc.spread(walls[p]),
             f"{bc.median([m['tftp'] for m in carried[p]]):.1f}",
             f"{bc.median([m['http'] for m in carried[p]]):.1f}", failed[p]] for p in PATHS]
    print(bc.table(["path", "boot files", "wall s (median)", "spread s", "TFTP MB",
                    "HTTP MB", "failed"], rows))
    for firmware in sorted({f for p in PATHS for f in per_firmware[p]}):
        times = {p: per_firmware[p].get(firmware, []) for p in PATHS}
        print(f"{firmware} nodes, seconds to ready (median of every node and round): "
              + ", ".join(f"{p} {bc.median(times[p]):.1f}" for p in PATHS)
              + f" = {bc.median(times['http']) / bc.median(times['tftp']):.2f}x")
    print(f"HTTP / TFTP wall time = {bc.median(ratios):.2f} (goal <= 0.6)")
    bc.result({"nodes": args.nodes, "firmware": args.firmware, "rounds": args.rounds,
               "http_s": bc.median(walls["http"]), "tftp_s": bc.median(walls["tftp"]),
               "lab_http_vs_tftp": bc.median(ratios), "lab_http_vs_tftp_spread": bc.spread(ratios),
               "failed": sum(failed.values())}, args.json)
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
