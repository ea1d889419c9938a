#!/usr/bin/env python3
"""Benchmark: `cluster-query` over 10,000 nodes against the floor of the sqlite3 command-line
tool printing the same WIKI lines from the same database, in one run (not a timed test).

    tools/bench_cluster_query.py [--nodes 10000] [--repeat 7]

Measured in --repeat interleaved rounds (every case once per round, order alternating), median
and spread (min-max) of the wall time of a real process (and the median CPU time, user + system,
which other load on a shared machine disturbs less). The checkout's bytecode is compiled first,
as tools/install-launcher leaves it:
  floor     sqlite3 -batch DB "<one SELECT producing the same lines>" (every node has
            hardware facts, as after its first call-home: CPROC and CMEMORY on every line)
  warm      cluster-query as Moab runs it (the console-script wrapper, no argument), the report
            file still true for the database's change key: stat + read + write, no SQLite
  lean      the same entry point from a `python3 -S` launcher (no site-packages processing)
  cold      the same after a commit (a writer's transaction, which bumps the change stamp): one
            snapshot read, the report rebuilt and written; with pip's wrapper and the launcher
  python    `python3 -c pass` with the same interpreter: what any Python command pays to start
and `file://` (CLUSTERQUERYURL pointing at the report file): no process at all, Moab reads the
file; its cost here is one read of it. The aim is cold <= 3x the floor with the launcher.
Ends with `RESULT ...` (tools/bench_common.result).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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

launcher = SourceFileLoader("install_launcher", str(ROOT / "tools" / "install-launcher")).load_module()

from msm_plugin import wiki  # noqa: E402
from pxe import config, db, hwfacts  # noqa: E402

# The same lines wiki.build prints for a healthy node (STATE=Idle; OS; OSLIST; ARCH; POWER;
# UPDATETIME; CPROC and CMEMORY from the hardware facts every node sent at its call-home).
FLOOR_SQL = """
WITH osl AS (SELECT arch, group_concat(label, ',') AS labels
             FROM (SELECT arch, label FROM images ORDER BY label) GROUP BY arch)
SELECT n.name || ' STATE=Idle;OS=' || COALESCE(n.current_os, '_none')
       || COALESCE(';OSLIST=' || osl.labels, '') || ';ARCH=' || n.arch || ';POWER=On'
       || ';UPDATETIME=' || CAST(n.updated AS INTEGER)
       || ';CPROC=' || json_extract(f.facts, '$.cpus')
       || ';CMEMORY=' || json_extract(f.facts, '$.memory_mib')
FROM nodes n LEFT JOIN osl ON osl.arch = n.arch LEFT JOIN node_facts f ON f.node = n.name
ORDER BY n.name;
"""
FACTS = "cpus 32\nmemory_kib 263856128\ncpu_model Intel Xeon Gold 6130\nserial SN{i:08d}\n"


def populate(cfg: config.Config, count: int) -> None:
    conn = db.connect(cfg.database)
    now = time.time()
    labels = ["centos5", "rocky9", "sles11", "ubuntu22"]
    with db.transaction(conn):
        for label in labels:
            conn.execute("INSERT INTO images(label, os_name, kernel_sha, created) "
                         "VALUES (?, ?, ?, ?)", (label, label, "0" * 64, now))
        conn.executemany(
            "INSERT INTO nodes(name, state, current_os, updated) VALUES (?, 'ready', ?, ?)",
            [(f"n{i:05d}", labels[i % len(labels)], now) for i in range(1, count + 1)])
        conn.executemany(  # what each node reported at its last call-home (pxe.hwfacts)
            "INSERT INTO node_facts(node, facts, reported) VALUES (?, ?, ?)",
            [(f"n{i:05d}", json.dumps(hwfacts.parse(FACTS.format(i=i))), now)
             for i in range(1, count + 1)])
        conn.executemany(
            "INSERT INTO macs(mac, node) VALUES (?, ?)",
            [(f"52:54:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
              f"{i & 255:02x}", f"n{i:05d}") for i in range(1, count + 1)])
    conn.close()


def run_once(argv: list[str], env: dict[str, str], before=None) -> tuple[float, float, bytes]:
    """(wall s, CPU s of the process: user + system, less disturbed by other load, stdout)."""
    if before:
        before()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, check=True, timeout=120)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)
    return elapsed, cpu, proc.stdout


def body(text: bytes) -> list[bytes]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith(b"#")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args()
    sqlite = shutil.which("sqlite3")
    if not sqlite:
        print("bench_cluster_query: the sqlite3 command-line tool is missing "
              "(apt-get install sqlite3)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-cq-") as tmp:
        root = Path(tmp)
        cfg_path = root / "dynprov.toml"
        cfg_path.write_text(config.example(root))
        cfg = config.load(cfg_path)
        populate(cfg, args.nodes)
        # The console script pip generates for `cluster-query` (what exec:// runs).
        script = root / "cluster-query"
        script.write_text(f"#!{sys.executable}\nimport sys\n"
                          "from msm_plugin.cluster_query import main\nsys.exit(main())\n")
        script.chmod(0o755)
        # The same entry point started without site-packages processing: what a lean launcher
        # (#!/usr/bin/python3 -S, our package on sys.path) costs; the fast path needs nothing
        # from site-packages.
        lean = root / "cluster-query-lean"  # what tools/install-deps installs
        launcher.install(lean, sys.executable, ROOT)
        env = {**os.environ, "DYNPROV_CONFIG": str(cfg_path),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        holder = db.connect(cfg.database)  # the server daemon keeps one open, as in production

        def commit() -> None:  # a writer's transaction: COMMIT, then the stamp is bumped
            with db.transaction(holder):
                holder.execute("INSERT INTO events(ts, kind) VALUES (?, 'bench')", (time.time(),))

        floor_argv = [sqlite, "-batch", "-noheader", str(cfg.db_path), FLOOR_SQL]
        cases = {
            "floor": (floor_argv, None),
            "cold": ([str(script)], commit),
            "cold_lean": ([str(lean)], commit),
            "warm": ([str(script)], None),
            "warm_lean": ([str(lean)], None),
            "python": ([sys.executable, "-c", "pass"], None),
            "python_S": ([sys.executable, "-S", "-c", "pass"], None),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        outs: dict[str, bytes] = {}
        subprocess.run([str(script)], env=env, stdout=subprocess.DEVNULL, check=True)
        for r in range(args.repeat):  # interleaved: every case once per round, order alternating
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                argv, before = cases[name]
                if name.startswith("warm"):
                    run_once(argv, env)  # whatever ran before, the report is now fresh
                seconds, used, outs[name] = run_once(argv, env, before)
                times[name].append(seconds)
                cpu[name].append(used)
        report = wiki.report_path(cfg.paths.state_dir)
        reads = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            report.read_bytes()
            reads.append(time.perf_counter() - start)
        times["file"] = reads
        holder.close()
    same = body(outs["floor"]) == body(outs["warm"]) == body(outs["cold_lean"])
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["floor"]
    print(f"cluster-query, {args.nodes} nodes, {args.repeat} interleaved rounds, median and "
          f"spread (same lines as the floor: {'yes' if same else 'NO'}); {bc.load_note()}")
    names = {
        "floor": "floor: sqlite3 CLI, same lines",
        "cold": "cold (after a commit), pip's wrapper",
        "cold_lean": "cold, python3 -S launcher",
        "warm": "warm (report still true), pip's wrapper",
        "warm_lean": "warm, python3 -S launcher",
        "python": "python3 -c pass",
        "python_S": "python3 -S -c pass",
        "file": "file:// URL: one read, no process",
    }
    cpu["file"] = times["file"]
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(bc.table(["case", "median ms", "spread ms", "x floor", "CPU ms", "CPU x floor"],
                   [(names[k], f"{med[k] * 1000:.1f}",
                     bc.spread([t * 1000 for t in times[k]]), f"{med[k] / floor:.2f}",
                     f"{med_cpu[k] * 1000:.1f}", f"{med_cpu[k] / med_cpu['floor']:.2f}")
                    for k in names]))
    print(f"cold / floor = {med['cold_lean'] / floor:.2f}x with the launcher Moab runs "
          f"(aim <= 3x); warm {med['warm_lean'] / floor:.2f}x")
    bc.result({"nodes": args.nodes, "repeat": args.repeat, "same_lines": same,
               "floor_ms": floor * 1000, "cold_ms": med["cold_lean"] * 1000,
               "cold_cpu_ratio": med_cpu["cold_lean"] / med_cpu["floor"],
               "warm_ms": med["warm_lean"] * 1000, "cold_wrapper_ms": med["cold"] * 1000,
               "cold_ratio": med["cold_lean"] / floor, "warm_ratio": med["warm_lean"] / floor,
               "cold_ratio_spread": f"{min(times['cold_lean']) / max(times['floor']):.2f}-"
                                    f"{max(times['cold_lean']) / min(times['floor']):.2f}"},
              args.json)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
