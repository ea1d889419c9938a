#!/usr/bin/env python3
"""Benchmark: set-boot + render + validate for 100 / 1,000 / 10,000 nodes, against bare `dhcpd -t`.

Each measurement runs the real commands as processes (what an admin or a run pays), in one
throw-away site per size, side by side with the daemon's own check of the same rendered file.
Usage: tools/bench_render.py [--sizes 100,1000,10000] [--backend isc|dnsmasq] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pxe import config  # noqa: E402
from pxe.dhcp import backend as dhcp_backend  # noqa: E402
from pxe.images import Catalog  # noqa: E402
from pxe.inventory import Inventory, build  # noqa: E402
from tests.conftest import fake_bzimage  # noqa: E402


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr}")
    return elapsed


def file_floor(count: int, where: Path) -> float:
    """The filesystem's own floor: create + rename ``count`` small files (what any per-node tool pays)."""
    scratch = where / "floor"
    scratch.mkdir(exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        tmp = scratch / f".f{i}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, b"x" * 400)
        os.close(fd)
        os.replace(tmp, scratch / f"f{i}")
    os.sync()
    elapsed = time.perf_counter() - start
    for i in range(count):
        (scratch / f"f{i}").unlink()
    return elapsed


def site_with(n: int, backend: str, root: Path) -> config.Config:
    root.mkdir(parents=True)
    # a /16 so that 10,000 fixed addresses fit beside the dynamic range
    text = config.example(root, backend=backend, subnet="198.18.0.0/16", server="198.18.0.1")
    (root / "dynprov.toml").write_text(text)
    cfg = config.load(root / "dynprov.toml")
    nodes = []
    for i in range(n):
        hi, lo = divmod(i, 250)
        nodes.append(build(cfg, {"name": f"n{i:05d}", "mac": f"52:54:{(i >> 16) & 255:02x}:"
                                 f"{(i >> 8) & 255:02x}:{i & 255:02x}:01",
                                 "ip": f"198.18.{hi + 2}.{lo + 2}",
                                 "firmware": "uefi" if i % 3 == 0 else "bios"}))
    Inventory(cfg).add(nodes)
    Catalog(cfg).add("centos5", fake_bzimage(root / "vmlinuz", os.urandom(1024)))
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--backend", default="isc", choices=("isc", "dnsmasq"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    py = sys.executable
    print(f"backend {args.backend}; median of {args.repeat} runs; seconds")
    print("ratio = total / bare daemon check; files = the same number of file creates+renames alone")
    print(f"{'nodes':>6} {'set-boot':>9} {'render+check':>13} {'total':>7} {'bare check':>11} "
          f"{'ratio':>7} {'files':>7} {'set-boot/files':>15}")
    with tempfile.TemporaryDirectory(prefix="dynprov-bench-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            cfg = site_with(n, args.backend, Path(tmp) / str(n))
            env = {**os.environ, "DYNPROV_CONFIG": str(cfg.path)}
            last = f"n{n - 1:05d}"
            setboot, render, bare, floor = [], [], [], []
            for r in range(args.repeat):
                label = "centos5" if r % 2 == 0 else None
                target = ["--os", "centos5"] if label else ["--local"]
                setboot.append(timed([py, "-m", "pxe.cli.main", "set-boot", f"n[00000-{last[1:]}]",
                                      *target], env))
                cfg.dhcp.config_file.unlink(missing_ok=True)  # force a full install every time
                render.append(timed([py, "-m", "pxe.cli.main", "render", "--no-reload"], env))
                bare.append(timed(dhcp_backend(args.backend).check_argv(cfg.dhcp.config_file), env))
                floor.append(file_floor(2 * n, Path(tmp)))  # 2 boot files per node
            s, r_, b, f = (statistics.median(x) for x in (setboot, render, bare, floor))
            print(f"{n:>6} {s:>9.3f} {r_:>13.3f} {s + r_:>7.3f} {b:>11.3f} {(s + r_) / b:>6.1f}x "
                  f"{f:>7.3f} {s / f:>14.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
