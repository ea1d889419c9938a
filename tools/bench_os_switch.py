#!/usr/bin/env python3
"""Benchmark: `os-switch` on 1,000 nodes against 1,000 virtual IPMI BMCs on 127.0.0.1: the time
until every node is power-cycled (not a timed test).

    tools/bench_os_switch.py [--nodes 1000] [--bmc-processes 8]

One aggregated call (AGGREGATENODEACTIONS TRUE: `os-switch n[0001-1000] --set OS=bench`), then
the state database is polled until every node of the run is power-cycled or failed. Reported:
how long the call blocked (Moab's scheduling loop waits that long), the detached driver's start,
its render + stage of every node's boot files plus the netboot fan-out (from the run's own
timestamped events), and the whole request -> every node cycled or failed; then, on the same
virtual BMCs, the baseline: the same power cycle of every node through FreeIPMI's ipmipower.
The last line is `RESULT nodes=N failed=F return_s=S cycled_s=S ipmipower_s=S vs_ipmipower=R
load=L` (tools/bench_common.result; cycled_s: until every node was power-cycled or failed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tools"))

import bench_common as bc  # noqa: E402

from lab.ports import free_udp_base  # noqa: E402
from lab.vbmc import VbmcProcess  # noqa: E402
from pxe import config, db, run  # noqa: E402
from pxe.images import Catalog  # noqa: E402
from pxe.inventory import Inventory, build  # noqa: E402
from pxe.nodeset import fold  # noqa: E402

PASSWORD = "bench-pw"


def fake_kernel(path: Path) -> Path:
    head = bytearray(0x400)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(head) + os.urandom(1024))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--bmc-processes", type=int, default=32,
                   help="processes hosting the virtual BMCs (real BMCs are 1,000 machines)")
    p.add_argument("--sessions", type=int, default=None,
                   help="[power] ipmi_sessions: IPMI sessions in flight (default: the power "
                        "layer's)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-os-switch-") as tmp:
        root = Path(tmp)
        cfg_path = root / "dynprov.toml"
        cfg_path.write_text(config.example(root, subnet="10.0.0.0/16", server="10.0.0.1")
                            + "\n[power]\ntimeout = 5.0\nretries = 2\n"
                            + (f"ipmi_sessions = {args.sessions}\n" if args.sessions else ""))
        secrets = root / "bmc-secrets"
        secrets.write_text(f'default = "{PASSWORD}"\n')
        secrets.chmod(0o600)
        pw_file = root / "vbmc-pw"
        pw_file.write_text(PASSWORD + "\n")
        pw_file.chmod(0o600)
        cfg = config.load(cfg_path)
        names = [f"n{i:04d}" for i in range(1, args.nodes + 1)]
        base = free_udp_base(args.nodes)
        nodes = [build(cfg, {"name": name, "mac": f"52:54:01:00:{i >> 8:02x}:{i & 255:02x}",
                             "bmc_type": "ipmi", "bmc_address": "127.0.0.1",
                             "bmc_port": str(base + i - 1), "bmc_user": "admin"})
                 for i, name in enumerate(names, start=1)]
        Inventory(cfg).add(nodes)
        Catalog(cfg).add("bench", fake_kernel(root / "vmlinuz"), prov_seconds=600)
        nodeset = fold(names)
        with VbmcProcess(nodeset, base, pw_file, processes=args.bmc_processes,
                         lifetime=900.0, start_timeout=300.0):
            env = {**os.environ, "DYNPROV_CONFIG": str(cfg_path)}
            start = time.time()
            proc = subprocess.run([sys.executable, "-m", "msm_plugin.os_switch", nodeset,
                                   "--set", "OS=bench"], capture_output=True, text=True,
                                  env=env, timeout=120)
            returned = time.time()
            if proc.returncode != 0:
                print(f"os-switch failed ({proc.returncode}): {proc.stderr}", file=sys.stderr)
                return 1
            conn = db.connect(cfg.database)
            end = start + 600
            while time.time() < end:
                states = dict(conn.execute(
                    "SELECT state, COUNT(*) FROM run_nodes GROUP BY state").fetchall())
                if not states.get("requested"):
                    break
                time.sleep(0.1)
            done = time.time()
            events = conn.execute(
                "SELECT kind, MIN(ts), MAX(ts), COUNT(*) FROM events WHERE kind IN "
                "('run-requested', 'set-boot', 'run-power-cycled', 'run-failed') "
                "AND (node IS NOT NULL OR kind = 'set-boot') GROUP BY kind").fetchall()
            phases = {k: (lo, hi, n) for k, lo, hi, n in events}
            failed = conn.execute("SELECT node, reason FROM run_nodes WHERE state = 'failed' "
                                  "LIMIT 5").fetchall()
            run.cancel(cfg, conn, names)  # the driver exits once nothing is in a run
            stop = time.time() + 60
            while run.driver_running(cfg) and time.time() < stop:
                time.sleep(0.2)
            conn.close()
            baseline = ipmipower_cycle(root, base, args.nodes)
    cycled = phases.get("run-power-cycled", (0, 0, 0))
    failed_events = phases.get("run-failed", (0, 0, 0))
    boot = phases.get("set-boot", (0, 0, 0))
    requested = phases.get("run-requested", (0, 0, 0))
    # The power phase ends with the last node's outcome, cycled or failed (a failed node's
    # event can be the last one: never a negative or "-0.00 s" phase).
    last = max(cycled[1], failed_events[1])
    power_s = max(0.0, last - boot[1]) if boot[2] else 0.0
    print(f"os-switch on {args.nodes} nodes, {args.nodes} virtual IPMI BMCs in "
          f"{args.bmc_processes} processes ({bc.load_note()})")
    print(f"  os-switch call returned (Moab blocked)   {returned - start:7.2f} s")
    print(f"  request recorded -> driver at set-boot   {max(0.0, boot[0] - requested[0]):7.2f} s")
    print(f"  boot set, power                          {power_s:7.2f} s")
    print(f"  request -> every node cycled or failed   {done - start:7.2f} s "
          f"({cycled[2]} power-cycled, {failed_events[2]} failed)")
    print(f"  baseline: ipmipower --cycle, same BMCs   {baseline[0]:7.2f} s "
          f"({baseline[1]} cycled)")
    for node, reason in failed:
        print(f"    {node}: {reason}")
    fields = {"nodes": args.nodes, "failed": args.nodes - cycled[2],
              "return_s": returned - start, "cycled_s": done - start,
              "ipmipower_s": baseline[0], "ipmipower_ok": baseline[1],
              "vs_ipmipower": (done - start) / baseline[0] if baseline[0] > 0 else "n/a"}
    if args.json:
        import json

        print(json.dumps(fields, sort_keys=True))
    bc.result(fields)
    return 0 if cycled[2] == args.nodes else 1


def ipmipower_cycle(root: Path, base: int, count: int) -> tuple[float, int]:
    """The baseline: the same power cycle of every node through FreeIPMI's ipmipower
    (password in a 0600 config file, never argv) -> (seconds, nodes that answered ok)."""
    import shutil

    if not shutil.which("ipmipower"):
        return float("nan"), 0
    conf = root / "freeipmi.conf"
    conf.write_text(f"username admin\npassword {PASSWORD}\n")
    conf.chmod(0o600)
    hosts = ",".join(f"127.0.0.1:{base + i}" for i in range(count))
    start = time.perf_counter()
    out = subprocess.run(["ipmipower", "-D", "LAN_2_0", "--config-file", str(conf), "-h", hosts,
                          "--cycle"], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    return seconds, sum(1 for line in out.stdout.splitlines() if line.endswith(": ok"))


if __name__ == "__main__":
    sys.exit(main())
