#!/usr/bin/env python3
"""Benchmark: each step of a changed DHCP config for N nodes (render + the daemon's check +
install), as the code before issue 18's render work ran it and as it runs now.

    tools/bench_dhcp_steps.py [--nodes 10000] [--backend isc|dnsmasq] [--repeat 5] [--json]

Every sample is a fresh process (importing Jinja and compiling are part of the cost; the
nodes read, pxe.render imported and the network facts computed before the clock starts), both
ways interleaved, the same number of repeats, on one N-node SQLite site; median per step,
wall and CPU (the check's CPU is its child's).
  before  the templates as they were (tests/data/dhcp-reference: nested loops over DhcpHost
          objects), Snapshot.hosts(), compiled in-process, the temp file fsynced, then the
          daemon's check, then the rename (pxe/dhcp at 42d102b)
  now     the packaged templates (loops over tuples built in Python, collector paused),
          compiled in-process, the check started as soon as the file
          is written and its fsync done while the daemon reads (pxe.dhcp.PendingCheck)
Not here: reading the nodes (pxe.dhcpinputs.read, the same both ways) and the overlap of the
check with set-boot's transaction (`set-boot --render`: tools/bench_render.py, changed case).
Ends with `RESULT ...` (see tools/bench_common.result).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_common as bc  # noqa: E402

STEPS = ("import jinja2", "template", "hosts + render", "write + check + rename")

# One sample, run as `python3 -c CHILD MODE`: reads the nodes first (not timed), prints the
# steps as JSON {step: [wall s, CPU s]}.
CHILD = r'''
import json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path
mode, reference = sys.argv[1], Path(sys.argv[2])
from pxe import config, dhcp, dhcpinputs
from pxe.inventory import Inventory
cfg = config.load()
snapshot = dhcpinputs.read(Inventory(cfg).conn, "")
target = cfg.dhcp.config_file
from pxe.render import Renderer
renderer = Renderer(cfg)
net = renderer.net  # netaddr, the same both ways: not timed
def clock():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
steps, last = {}, [clock()]
def mark(name):
    now = clock()
    steps[name] = [now[0] - last[0][0], now[1] - last[0][1]]
    last[0] = now
name = {"isc": "dhcpd.conf.j2", "dnsmasq": "dnsmasq.conf.j2"}[cfg.dhcp.backend]
if mode == "before":
    import jinja2
    mark("import jinja2")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(reference), autoescape=False,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.get_template(name)
    mark("template")
    hosts = [h for h in snapshot.hosts() if h.macs]
    text = template.render(net=net, boot=cfg.boot, hosts=hosts, dhcp=cfg.dhcp)
    mark("hosts + render")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text); fh.flush(); os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    argv = dhcp.backend(cfg.dhcp.backend).check_argv(Path(tmp))
    assert subprocess.run(argv, capture_output=True, text=True, timeout=120).returncode == 0
    os.replace(tmp, target)
    mark("write + check + rename")
else:
    import jinja2
    mark("import jinja2")
    renderer.template(f"dhcp/{name}")
    mark("template")
    text = renderer.dhcp_config(snapshot)
    mark("hosts + render")
    dhcp.PendingCheck(cfg, text).install(reload=False)
    mark("write + check + rename")
print(json.dumps(steps))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--backend", default="isc", choices=("isc", "dnsmasq"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    from bench_render import site_with

    reference = ROOT / "tests" / "data" / "dhcp-reference"
    samples: dict[str, list[dict[str, list[float]]]] = {"before": [], "now": []}
    with tempfile.TemporaryDirectory(prefix="dynprov-bench-") as tmp:
        cfg = site_with(args.nodes, args.backend, Path(tmp) / "site", bc.free_port())
        env = {**os.environ, "DYNPROV_CONFIG": str(cfg.path), "PYTHONPATH": str(ROOT)}
        for mode in ("now", "before"):  # warm: the page cache and bytecode
            subprocess.run([sys.executable, "-c", CHILD, mode, str(reference)], env=env,
                           check=True, capture_output=True)
        for r in range(args.repeat):
            for mode in (("before", "now") if r % 2 == 0 else ("now", "before")):
                out = subprocess.run([sys.executable, "-c", CHILD, mode, str(reference)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                samples[mode].append(json.loads(out))
    med = {m: {s: [statistics.median(x[s][i] for x in samples[m]) for i in (0, 1)]
               for s in STEPS} for m in samples}
    total = {m: [sum(med[m][s][i] for s in STEPS) for i in (0, 1)] for m in med}
    print(f"{args.nodes} nodes, backend {args.backend}, {args.repeat} rounds interleaved, a fresh "
          f"process each; {bc.load_note()}")
    rows = [(s, *(f"{med[m][s][i] * 1000:.1f}" for m in ("before", "now") for i in (0, 1)))
            for s in (*STEPS,)]
    rows.append(("total", *(f"{total[m][i] * 1000:.1f}" for m in ("before", "now")
                            for i in (0, 1))))
    print(bc.table(["step (median ms)", "before wall", "before CPU", "now wall", "now CPU"], rows))
    fields: dict[str, object] = {"nodes": args.nodes, "backend": args.backend,
                                 "repeat": args.repeat,
                                 "before_ms": total["before"][0] * 1000,
                                 "now_ms": total["now"][0] * 1000,
                                 "before_cpu_ms": total["before"][1] * 1000,
                                 "now_cpu_ms": total["now"][1] * 1000,
                                 "now_over_before": total["now"][0] / total["before"][0],
                                 "now_over_before_cpu": total["now"][1] / total["before"][1]}
    for s in STEPS:
        key = s.split()[0].replace("+", "")
        fields[f"{key}_before_ms"] = med["before"][s][0] * 1000
        fields[f"{key}_now_ms"] = med["now"][s][0] * 1000
    bc.result(fields, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
