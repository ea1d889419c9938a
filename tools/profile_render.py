#!/usr/bin/env python3
"""Profile `set-boot --render` with the DHCP config unchanged and with one node's MAC changed,
for one or more checkouts of dynprov side by side (interleaved, one N-node site each).

    tools/profile_render.py [--nodes 10000] [--repeat 7] [--strace] [--importtime] [CHECKOUT...]

CHECKOUT: a directory holding a `pxe/` package (default: this one). Each case of each checkout
runs as a fresh process through the `python3 -S` launcher (tools/install-launcher), as
tools/bench_render.py runs it; medians of wall and CPU time, and the bare `dhcpd -t` of the same
file for scale. --strace: once per case, `strace -c -f` (syscall counts, fsyncs) per checkout;
--importtime: the slowest imports (`-X importtime`) per checkout and case. This is the tool to
find where the milliseconds go before changing code; tools/bench_render.py keeps the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_common as bc  # noqa: E402
import bench_render as br  # noqa: E402

from pxe.dhcp import backend as dhcp_backend  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--strace", action="store_true", help="strace -c -f once per case")
    ap.add_argument("--importtime", action="store_true", help="slowest imports per case")
    ap.add_argument("checkouts", nargs="*", type=Path, default=[ROOT])
    args = ap.parse_args()
    py, n = sys.executable, args.nodes
    nodes = f"n[00000-{n - 1:05d}]"
    with tempfile.TemporaryDirectory(prefix="dynprov-profile-") as tmp:
        runs = []
        for k, code in enumerate(args.checkouts):
            code = code.resolve()
            cfg = br.site_with(n, "isc", Path(tmp) / f"site{k}", bc.free_port())
            env = {**os.environ, "DYNPROV_CONFIG": str(cfg.path), "PYTHONPATH": str(code)}
            stage = str(br.launcher.install(Path(tmp) / f"pxe-stage{k}", py, code, "pxe-stage"))
            subprocess.run([stage, "render", "--no-reload"], env=env, check=True,
                           capture_output=True)
            runs.append((str(code), cfg, env, stage))
        argv = lambda stage, t: [stage, "set-boot", nodes, *t, "--render", "--no-reload"]  # noqa: E731
        times: dict[tuple[int, str], list[tuple[float, float]]] = {}
        bare: list[tuple[float, float]] = []
        for r in range(args.repeat):
            order = list(enumerate(runs)) if r % 2 == 0 else list(enumerate(runs))[::-1]
            for k, (_code, cfg, env, stage) in order:
                target = ["--os", "centos5"] if r % 2 == 0 else ["--local"]
                wall, cpu, out = br.timed(argv(stage, target), env)
                assert "unchanged" in out.split("boot files")[0], out
                times.setdefault((k, "unchanged"), []).append((wall, cpu))
                br.change_one_mac(cfg, (r * 7919 + k) % n, r)
                wall, cpu, out = br.timed(argv(stage, target), env)
                assert "installed" in out.split("boot files")[0], out
                times.setdefault((k, "one changed"), []).append((wall, cpu))
            cfg = runs[0][1]
            wall, cpu, _ = br.timed(dhcp_backend("isc").check_argv(cfg.dhcp.config_file),
                                    runs[0][2])
            bare.append((wall, cpu))
        print(f"{n} nodes, {args.repeat} rounds interleaved; {bc.load_note()}")
        bare_wall = statistics.median(w for w, _c in bare)
        rows = [("bare dhcpd -t", "", f"{bare_wall * 1000:.1f}",
                 f"{statistics.median(c for _w, c in bare) * 1000:.1f}", "1.00")]
        for (k, case), values in times.items():
            wall = statistics.median(w for w, _c in values)
            rows.append((case, runs[k][0], f"{wall * 1000:.1f}",
                         f"{statistics.median(c for _w, c in values) * 1000:.1f}",
                         f"{wall / bare_wall:.2f}"))
        print(bc.table(["case", "checkout", "wall ms", "CPU ms", "x bare"], rows))
        for k, (code, cfg, env, stage) in enumerate(runs):
            for case in ("unchanged", "one changed"):
                if case == "one changed":
                    br.change_one_mac(cfg, (k * 31 + 17) % n, 200 + k)
                prefix = []
                if args.strace and shutil.which("strace"):
                    prefix = ["strace", "-c", "-f", "-o", str(Path(tmp) / "strace.txt")]
                extra = ["-X", "importtime"] if args.importtime else []
                proc = subprocess.run([*prefix, py, "-S", *extra, *argv(stage, ["--local"])],
                                      env=env, capture_output=True, text=True, check=True)
                print(f"\n== {code}: {case}")
                if prefix:
                    lines = (Path(tmp) / "strace.txt").read_text().splitlines()
                    print("\n".join(lines[:14]))
                    print("\n".join(line for line in lines if "fsync" in line or "fdatasync" in line))
                if extra:
                    imports = [line for line in proc.stderr.splitlines()
                               if line.startswith("import time:")
                               and line.split("|")[1].strip().isdigit()]
                    imports.sort(key=lambda line: -int(line.split("|")[1]))
                    print("\n".join(imports[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
