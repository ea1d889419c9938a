#!/usr/bin/env python3
"""Benchmark: `set-boot --render` for N nodes as two git revisions run it, interleaved, paired.

    tools/bench_render_revs.py BEFORE AFTER [--nodes 10000] [--backend isc|dnsmasq]
                               [--repeat 15] [--json]

Each revision is exported (git archive) into a temp folder and byte-compiled, and gets its own
site with the same N nodes (a render record names the code it was made by). Each round runs,
for each case, BEFORE and AFTER back to back (order alternating): `set-boot NODES --os|--local
--render --no-reload` with the DHCP config changed (its file removed: render, check, install)
and unchanged, and the bare daemon check of the same file. Reported: medians per revision and
the median of the per-round differences AFTER - BEFORE (wall and CPU, the check's child
included), and in how many rounds AFTER was faster. Ends with `RESULT ...`.
"""

from __future__ import annotations

import argparse
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

import bench_common as bc  # noqa: E402

CASES = ("changed", "unchanged", "bare")


def export(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    folders = [str(into / d) for d in ("pxe", "msm_plugin", "slurm_plugin") if (into / d).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], check=True,
                   capture_output=True)
    return into


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), \
        proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--backend", default="isc", choices=("isc", "dnsmasq"))
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    from bench_render import site_with

    from pxe.dhcp import backend as dhcp_backend

    py, nodes = sys.executable, f"n[00000-{args.nodes - 1:05d}]"
    revs = {"before": args.before, "after": args.after}
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dynprov-bench-") as tmp:
        trees = {k: export(rev, Path(tmp) / f"tree-{k}") for k, rev in revs.items()}
        sites = {k: site_with(args.nodes, args.backend, Path(tmp) / f"site-{k}", bc.free_port())
                 for k in revs}
        envs = {k: {**os.environ, "DYNPROV_CONFIG": str(sites[k].path),
                    "PYTHONPATH": str(trees[k])} for k in revs}
        for k in revs:
            timed([py, "-m", "pxe.cli.main", "render", "--no-reload"], envs[k])
        for r in range(args.repeat):
            target = ["--os", "centos5"] if r % 2 else ["--local"]
            for case in CASES:
                for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    if case == "bare":
                        argv = dhcp_backend(args.backend).check_argv(sites[k].dhcp.config_file)
                    else:
                        argv = [py, "-m", "pxe.cli.main", "set-boot", nodes, *target,
                                "--render", "--no-reload"]
                        if case == "changed":
                            sites[k].dhcp.config_file.unlink()
                    wall, cpu, out = timed(argv, envs[k])
                    if case != "bare" and ("installed" if case == "changed" else
                                           "unchanged") not in out:
                        raise SystemExit(f"{k} {case}: unexpected output {out}")
                    samples.setdefault((k, case), []).append((wall, cpu))
    print(f"{args.nodes} nodes, backend {args.backend}, {args.repeat} rounds, before "
          f"{args.before} / after {args.after} back to back; {bc.load_note()}")
    rows, fields = [], {"nodes": args.nodes, "backend": args.backend, "repeat": args.repeat}
    for case in CASES:
        b, a = samples[("before", case)], samples[("after", case)]
        med = {k: [statistics.median(x[i] for x in samples[(k, case)]) for i in (0, 1)]
               for k in revs}
        diff = [statistics.median(y[i] - x[i] for x, y in zip(b, a, strict=True)) for i in (0, 1)]
        faster = sum(y[0] < x[0] for x, y in zip(b, a, strict=True))
        rows.append((case, f"{med['before'][0]:.3f}", f"{med['after'][0]:.3f}",
                     f"{diff[0] * 1000:+.1f}", f"{med['before'][1]:.3f}", f"{med['after'][1]:.3f}",
                     f"{diff[1] * 1000:+.1f}", f"{faster}/{len(a)}"))
        fields.update({f"{case}_before_s": med["before"][0], f"{case}_after_s": med["after"][0],
                       f"{case}_diff_ms": diff[0] * 1000, f"{case}_cpu_diff_ms": diff[1] * 1000})
    print(bc.table(["case", "before s", "after s", "paired ms", "before CPU s", "after CPU s",
                    "paired CPU ms", "after faster"], rows))
    bare = {k: statistics.median(x[0] for x in samples[(k, "bare")]) for k in revs}
    for k in revs:
        changed = statistics.median(x[0] for x in samples[(k, "changed")])
        fields[f"{k}_changed_ratio"] = changed / bare[k]
    print(f"changed / bare check: before {fields['before_changed_ratio']:.2f}x, after "
          f"{fields['after_changed_ratio']:.2f}x")
    bc.result(fields, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
