#!/usr/bin/env python3
"""Benchmark: `os-switch` on N nodes against N virtual IPMI BMCs on 127.0.0.1, side by side with
FreeIPMI's ipmipower power-cycling the same nodes (not a timed test).

    tools/bench_os_switch.py [--nodes 1000] [--bmc-processes 32] [--repeat 3]

Ours, once per round: one aggregated call (AGGREGATENODEACTIONS TRUE: `os-switch n[0001-N]
--set OS=bench-a`, the image alternating between rounds so every round is a real switch), then
the state database is polled until every node of that run is power-cycled or failed; then the
run is cancelled and the driver left to exit. Reported per round: how long the call blocked
(Moab's scheduling loop waits that long), the detached driver's start, its render + stage of every
node's boot files plus the netboot fan-out (from the run's own timestamped events), and the whole
request -> every node cycled or failed.

Baseline, once per round on the same virtual BMCs (same processes, same capacity):
`ipmipower -D LAN_2_0 --cycle --on-if-off --session-timeout 60000` over every node (password in
a 0600 config file, never argv). `--on-if-off` because a cycle of a powered-off node is otherwise
skipped silently (no output line) while ours powers it on; the 60 s session timeout (default
20 s) because with 1,000 sessions opened at once on a loaded host a BMC may answer late, and an
admin would rather wait than re-run the stragglers (`--ipmipower-args` to change them).

The sides run interleaved, the order alternating, after one untimed `ipmipower --on` of every
node (warms the BMCs, starts every round from the same state). The last line is
`RESULT nodes=N repeat=R ours_s=S ours_ok=K ipmipower_s=S ipmipower_ok=K vs_ipmipower=X
vs_ipmipower_spread=LO-HI return_s=S load=L`: medians; *_ok the fewest nodes done in a round;
vs_ipmipower = our median / ipmipower's (lower is better for us); its spread: the range of the
rounds' own ratios (each round's two sides ran back to back). power_s / power_vs_ipmipower: our
power phase alone (boot files set -> last node cycled), the part ipmipower does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
IMAGES = ("bench-a", "bench-b")
IPMIPOWER_ARGS = "--session-timeout 60000"


@dataclass
class Round:
    """One timed run of one side."""

    seconds: float
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


def fake_kernel(path: Path) -> Path:
    head = bytearray(0x400)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(head) + os.urandom(1024))
    return path


def make_site(root: Path, count: int, base: int, sessions: int | None) -> config.Config:
    cfg_path = root / "dynprov.toml"
    cfg_path.write_text(config.example(root, subnet="10.0.0.0/16", server="10.0.0.1")
                        + "\n[power]\ntimeout = 5.0\nretries = 2\n"
                        + (f"ipmi_sessions = {sessions}\n" if sessions else ""))
    secrets = root / "bmc-secrets"
    secrets.write_text(f'default = "{PASSWORD}"\n')
    secrets.chmod(0o600)
    cfg = config.load(cfg_path)
    nodes = [build(cfg, {"name": f"n{i:04d}", "mac": f"52:54:01:00:{i >> 8:02x}:{i & 255:02x}",
                         "bmc_type": "ipmi", "bmc_address": "127.0.0.1",
                         "bmc_port": str(base + i - 1), "bmc_user": "admin"})
             for i in range(1, count + 1)]
    Inventory(cfg).add(nodes)
    for label in IMAGES:
        Catalog(cfg).add(label, fake_kernel(root / f"vmlinuz-{label}"), prov_seconds=600)
    return cfg


def ours(cfg: config.Config, cfg_path: Path, names: list[str], label: str) -> Round:
    """One os-switch of every node to `label`, until each is power-cycled or failed; then the
    run is cancelled and the driver has exited (the next round starts from a quiet site)."""
    conn = db.connect(cfg.database)
    last_run = conn.execute("SELECT COALESCE(MAX(id), 0) FROM runs").fetchone()[0]
    env = {**os.environ, "DYNPROV_CONFIG": str(cfg_path)}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "msm_plugin.os_switch", fold(names),
                           "--set", f"OS={label}"], capture_output=True, text=True, env=env,
                          timeout=120)
    returned = time.time()
    if proc.returncode != 0:
        conn.close()
        return Round(returned - start, 0, {f"os-switch exit {proc.returncode}: "
                                           f"{proc.stderr.strip()[:200]}": len(names)})
    end = start + 600
    while time.time() < end:
        waiting = conn.execute("SELECT COUNT(*) FROM run_nodes WHERE run_id > ? AND state = ?",
                               (last_run, "requested")).fetchone()[0]
        if not waiting:
            break
        time.sleep(0.1)
    done = time.time()
    events = dict(((k, (lo, hi, n)) for k, lo, hi, n in conn.execute(
        "SELECT kind, MIN(ts), MAX(ts), COUNT(*) FROM events WHERE ts >= ? AND kind IN "
        "('run-requested', 'set-boot', 'run-power-cycled', 'run-failed') "
        "AND (node IS NOT NULL OR kind = 'set-boot') GROUP BY kind", (start,)).fetchall()))
    errors: dict[str, int] = {}
    for (reason,) in conn.execute("SELECT reason FROM run_nodes WHERE run_id > ? AND state = ?",
                                  (last_run, "failed")).fetchall():
        errors[reason] = errors.get(reason, 0) + 1
    run.cancel(cfg, conn, names)  # the driver exits once nothing is in a run
    stop = time.time() + 60
    while run.driver_running(cfg) and time.time() < stop:
        time.sleep(0.2)
    conn.close()
    cycled = events.get("run-power-cycled", (0.0, 0.0, 0))
    failed = events.get("run-failed", (0.0, 0.0, 0))
    boot = events.get("set-boot", (0.0, 0.0, 0))
    requested = events.get("run-requested", (0.0, 0.0, 0))
    # The power phase ends with the last node's outcome, cycled or failed: never negative.
    last = max(cycled[1], failed[1])
    phases = {"return_s": returned - start,
              "driver_s": max(0.0, boot[0] - requested[0]) if boot[2] else 0.0,
              "power_s": max(0.0, last - boot[1]) if boot[2] else 0.0}
    return Round(done - start, cycled[2], errors, phases)


def ipmipower_argv(conf: Path, hosts: str, action: str, extra: list[str]) -> list[str]:
    return ["ipmipower", "-D", "LAN_2_0", "--config-file", str(conf), "-h", hosts, action, *extra]


def ipmipower(argv: list[str]) -> Round:
    """One ipmipower run over every node: seconds, nodes that said ok, the other answers."""
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    ok, errors = 0, {}
    for line in out.stdout.splitlines():
        answer = line.split(": ", 1)[-1]
        if answer == "ok":
            ok += 1
        else:
            errors[answer] = errors.get(answer, 0) + 1
    if out.returncode and not out.stdout:
        errors[f"exit {out.returncode}: {out.stderr.strip()[:200]}"] = 1
    return Round(seconds, ok, errors)


def summary(rounds: list[Round]) -> tuple[float, int, str]:
    times = [r.seconds for r in rounds]
    return statistics.median(times), min(r.ok for r in rounds), bc.spread(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--bmc-processes", type=int, default=32,
                   help="processes hosting the virtual BMCs, shared by both sides")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved rounds (each side once per round, order alternating)")
    p.add_argument("--sessions", type=int, default=None,
                   help="[power] ipmi_sessions: IPMI sessions in flight (default: the power "
                        "layer's)")
    p.add_argument("--ipmipower-args", default=IPMIPOWER_ARGS,
                   help=f"extra ipmipower options for the baseline (default: {IPMIPOWER_ARGS!r})")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args()
    if not 1 <= args.nodes <= 4000 or not 1 <= args.repeat <= 20:
        p.error("--nodes 1-4000, --repeat 1-20")
    if not shutil.which("ipmipower"):
        print("bench_os_switch: ipmipower not found (Debian: freeipmi-tools)", file=sys.stderr)
        return 2
    extra = shlex.split(args.ipmipower_args)
    mine: list[Round] = []
    theirs: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bench-os-switch-") as tmp:
        root = Path(tmp)
        base = free_udp_base(args.nodes)
        cfg = make_site(root, args.nodes, base, args.sessions)
        pw_file = root / "vbmc-pw"
        pw_file.write_text(PASSWORD + "\n")
        pw_file.chmod(0o600)
        conf = root / "freeipmi.conf"
        conf.write_text(f"username admin\npassword {PASSWORD}\n")
        conf.chmod(0o600)
        names = [f"n{i:04d}" for i in range(1, args.nodes + 1)]
        hosts = ",".join(f"127.0.0.1:{base + i}" for i in range(args.nodes))
        with VbmcProcess(fold(names), base, pw_file, processes=args.bmc_processes,
                         lifetime=900.0 + 120.0 * args.repeat, start_timeout=300.0):
            warm = ipmipower(ipmipower_argv(conf, hosts, "--on", extra))
            for r in range(args.repeat):
                for side in (("ours", "ipmipower") if r % 2 == 0 else ("ipmipower", "ours")):
                    if side == "ours":
                        mine.append(ours(cfg, root / "dynprov.toml", names, IMAGES[r % 2]))
                    else:
                        theirs.append(ipmipower(ipmipower_argv(
                            conf, hosts, "--cycle", ["--on-if-off", *extra])))
    ours_s, ours_ok, ours_spread = summary(mine)
    ipp_s, ipp_ok, ipp_spread = summary(theirs)
    n = args.nodes
    print(f"os-switch on {n} nodes vs ipmipower --cycle, {n} virtual IPMI BMCs in "
          f"{args.bmc_processes} processes, median of {args.repeat} interleaved rounds "
          f"({bc.load_note()})")
    print(f"  warm-up: ipmipower --on, every node      {warm.seconds:7.2f} s ({warm.ok} ok)")
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True), start=1):
        print(f"  round {i}: ours {a.seconds:6.2f} s ({a.ok}/{n} cycled; call returned "
              f"{a.phases.get('return_s', 0):.2f} s, driver at set-boot "
              f"{a.phases.get('driver_s', 0):.2f} s, boot set -> power done "
              f"{a.phases.get('power_s', 0):.2f} s)   ipmipower {b.seconds:6.2f} s "
              f"({b.ok}/{n} ok)")
        for label, rnd in (("ours", a), ("ipmipower", b)):
            for reason, count in sorted(rnd.errors.items())[:5]:
                print(f"    {label} failed: {count} x {reason}")
    print(f"  ours      {ours_s:7.2f} s ({ours_spread})  fewest cycled {ours_ok}/{n}")
    print(f"  ipmipower {ipp_s:7.2f} s ({ipp_spread})  fewest ok {ipp_ok}/{n}  "
          f"[ipmipower -D LAN_2_0 --cycle --on-if-off {args.ipmipower_args}]")
    # Each round's two sides ran back to back (same load): their ratios are the spread.
    paired = [a.seconds / b.seconds for a, b in zip(mine, theirs, strict=True) if b.seconds > 0]
    print(f"  ours / ipmipower per round: {', '.join(f'{x:.2f}' for x in paired)}")
    power_s = statistics.median(r.phases.get("power_s", 0.0) for r in mine)
    ratio: object = ours_s / ipp_s if ipp_s > 0 else "n/a"
    fields: dict[str, object] = {
        "nodes": n, "bmc_processes": args.bmc_processes, "repeat": args.repeat,
        "ours_s": ours_s, "ours_ok": ours_ok, "ipmipower_s": ipp_s, "ipmipower_ok": ipp_ok,
        "vs_ipmipower": ratio,
        "vs_ipmipower_spread": bc.spread(paired),
        "return_s": statistics.median(r.phases.get("return_s", 0.0) for r in mine),
        "power_s": power_s,
        "power_vs_ipmipower": power_s / ipp_s if ipp_s > 0 else "n/a"}
    if args.json:
        print(json.dumps({**fields, "ours_runs": [r.seconds for r in mine],
                          "ipmipower_runs": [r.seconds for r in theirs]}, sort_keys=True))
    bc.result(fields)
    return 0 if ours_ok == n and ipp_ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
