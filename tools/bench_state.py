#!/usr/bin/env python3
"""Benchmark: the state store, PostgreSQL vs SQLite, 10,000 nodes, in one run (not a timed test).

    tools/bench_state.py [--nodes 10000] [--repeat 5] [--reports 1000] [--json]

Two sites with the same inventory (--nodes nodes, a MAC each, 4 images), one keeping its state
in the SQLite file, one in PostgreSQL (a throw-away cluster in a temp dir: initdb, Unix socket
only, started and removed here, run as the `postgres` user). Per round, backends interleaved
(order alternating), wall time of:
  set-boot       pxe.setboot.set_boot of every node to an image (one transaction: tokens, boot
                 target, an event per node), in this process, connection open
  cluster-query  a real `python3 -m msm_plugin.cluster_query` process right after that commit
                 (the cold path: connect, one snapshot read, the report rebuilt and written)
  call-home      --reports `ready` reports, one after another on one connection, as a serve
                 worker records them (pxe.reports.record_report: token check, node, agent,
                 event in one transaction) -> reports per second
Medians and spreads (min-max); "PG cost x" = PostgreSQL's time (or SQLite's rate) over SQLite's
time (or PostgreSQL's rate), the *_ratio fields the same per round. PostgreSQL runs with
fsync off here (a throw-away cluster): its figures are the protocol's and the server's cost,
not a disk's. Ends with `RESULT ...` (tools/bench_common.result).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_common as bc  # noqa: E402
import pg_support  # noqa: E402

from pxe import config, db, reports, setboot  # noqa: E402

LABELS = ["centos5", "rocky9", "sles11", "ubuntu22"]
BACKENDS = ("sqlite", "postgresql")


def make_site(root: Path, url: str | None) -> config.Config:
    root.mkdir(parents=True)
    path = root / "dynprov.toml"
    path.write_text(config.example(root) + (f'\n[state]\nurl = "{url}"\n' if url else ""))
    return config.load(path)


def populate(cfg: config.Config, count: int) -> None:
    conn = db.connect(cfg.database)
    now = time.time()
    with db.transaction(conn):
        for label in LABELS:
            conn.execute("INSERT INTO images(label, os_name, kernel_sha, created) "
                         "VALUES (?, ?, ?, ?)", (label, label, "0" * 64, now))
        conn.executemany(
            "INSERT INTO nodes(name, state, current_os, updated) VALUES (?, 'ready', ?, ?)",
            [(f"n{i:05d}", LABELS[i % len(LABELS)], now) for i in range(1, count + 1)])
        conn.executemany(
            "INSERT INTO macs(mac, node) VALUES (?, ?)",
            [(f"52:54:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
              f"{i & 255:02x}", f"n{i:05d}") for i in range(1, count + 1)])
    conn.close()


def one_round(cfg: config.Config, nodes: int, label: str, count: int) -> dict[str, float]:
    start = time.perf_counter()
    sets = setboot.set_boot(cfg, f"n[00001-{nodes:05d}]", label)
    t_setboot = time.perf_counter() - start
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "msm_plugin.cluster_query", "--config",
                          str(cfg.path)], capture_output=True, env=env, timeout=300, check=True)
    t_query = time.perf_counter() - start
    lines = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith(b"#")]
    if len(lines) != nodes:
        raise SystemExit(f"bench_state: cluster-query printed {len(lines)} lines, not {nodes}")
    conn = db.connect(cfg.database)
    try:
        start = time.perf_counter()
        for s in sets[:count]:
            reports.record_report(conn, s.name, s.boot_token, "ready")
        t_reports = time.perf_counter() - start
    finally:
        conn.close()
    return {"setboot": t_setboot, "query": t_query, "callhome_rate": count / t_reports}


def bench(work: Path, args: argparse.Namespace) -> int:
    cluster = pg_support.Cluster()
    try:
        cfgs = {"sqlite": make_site(work / "sqlite", None),
                "postgresql": make_site(work / "pg", cluster.url(cluster.create_database()))}
        for cfg in cfgs.values():
            populate(cfg, args.nodes)
        times: dict[str, dict[str, list[float]]] = {b: {} for b in BACKENDS}
        for r in range(args.repeat):
            order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                got = one_round(cfgs[backend], args.nodes, LABELS[r % len(LABELS)], args.reports)
                for key, value in got.items():
                    times[backend].setdefault(key, []).append(value)
            print(f"  round {r + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        cluster.remove()
    rows = []
    for key, what, unit in (("setboot", f"set-boot of {args.nodes} nodes", "s"),
                            ("query", "cluster-query (cold, real process)", "s"),
                            ("callhome_rate", "call-home reports recorded", "/s")):
        lite, pg = times["sqlite"][key], times["postgresql"][key]
        cost = bc.median(lite) / bc.median(pg) if unit == "/s" else bc.median(pg) / bc.median(lite)
        rows.append([what, f"{bc.median(lite):.3f} {unit}", bc.spread(lite),
                     f"{bc.median(pg):.3f} {unit}", bc.spread(pg), f"{cost:.2f}"])
    print(f"state store, {args.nodes} nodes, {args.repeat} interleaved rounds, "
          f"{args.reports} reports per round; {bc.load_note()}")
    print(bc.table(["case", "SQLite", "spread", "PostgreSQL", "spread", "PG cost x"], rows))
    fields: dict[str, object] = {"nodes": args.nodes, "repeat": args.repeat}
    for key, invert in (("setboot", False), ("query", False), ("callhome_rate", True)):
        lite, pg = times["sqlite"][key], times["postgresql"][key]
        ratio = [(s / p) if invert else (p / s) for s, p in zip(lite, pg, strict=True)]
        fields[f"{key}_ratio"] = bc.median(ratio)  # PostgreSQL's cost over SQLite's, per round
        fields[f"{key}_ratio_spread"] = bc.spread(ratio)
    for backend, short in (("sqlite", "sqlite"), ("postgresql", "pg")):
        for key in ("setboot", "query", "callhome_rate"):
            fields[f"{short}_{key}"] = bc.median(times[backend][key])
    bc.result(fields, args.json)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--reports", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args()
    if not 1 <= args.nodes <= 99_999 or args.repeat < 1 or not 1 <= args.reports <= args.nodes:
        print("bench_state: --nodes 1..99999, --repeat >= 1, --reports 1..nodes", file=sys.stderr)
        return 2
    if not shutil.which("runuser") and os.geteuid() == 0:
        print("bench_state: runuser is missing", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dynprov-bench-state-"))
    try:
        return bench(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
