#!/usr/bin/env python3
"""Benchmark: each step of `set-boot --render` (DHCP config unchanged) for N nodes, in-process,
as the code before issue 18's migration 8 ran it and as it runs now.

    tools/bench_setboot_steps.py [--nodes 10000] [--repeat 5] [--json]

Before (the statements of that code, replayed here): the arch/unknown-node aggregate over the
names, the UPDATE, one `set-boot` event per node, COMMIT, then render's proof that the DHCP
config is unchanged: read and sha256 every node's DHCP facts. Now: the UPDATE (its row count is
the check, nodes.boot_set written by it), one event for the command, COMMIT, then the proof:
the DHCP-facts generation (one row) against the installed record. Both run interleaved, the
same number of repeats, on the same 10,000-node SQLite site, an image and a --local set-boot
alternating; median and spread (min-max) per step. Also, now only: pxe.setboot.set_boot() +
render_all() as `set-boot --render` calls them (lock, image lookup, tokens included).
Ends with `RESULT ...` (see tools/bench_common.result).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_common as bc  # noqa: E402
from bench_render import site_with  # noqa: E402

from pxe import db, dhcpinputs  # noqa: E402
from pxe.inventory import Inventory  # noqa: E402
from pxe.setboot import TOKEN_CHARS, _record, _token_text, render_all, set_boot  # noqa: E402

Steps = dict[str, float]
KEYS = {"check (aggregate)": "check", "UPDATE": "update", "event(s)": "events", "COMMIT": "commit",
        "render: DHCP unchanged?": "unchanged_proof"}


def _timer() -> Callable[[str], None]:
    marks: Steps = {}
    last = [time.perf_counter()]

    def mark(name: str) -> None:
        now = time.perf_counter()
        marks[name] = now - last[0]
        last[0] = now
    mark.marks = marks  # type: ignore[attr-defined]
    return mark


def before(conn, names: list[str], image: bool) -> Steps:  # type: ignore[no-untyped-def]
    """The statements set-boot and render ran before migration 8 (pxe/setboot.py at 42d102b)."""
    mark = _timer()
    array = json.dumps(names)
    counts = dict(conn.execute("SELECT n.arch, COUNT(*) FROM json_each(?) AS j LEFT JOIN nodes "
                               "AS n ON n.name = j.value GROUP BY n.arch", (array,)).fetchall())
    assert None not in counts and set(counts) == {"x86_64"}
    mark("check (aggregate)")
    conn.execute("BEGIN IMMEDIATE")
    now = time.time()
    if image:
        conn.execute("UPDATE nodes SET boot_target = 'os', desired_os = ?, boot_token = "
                     f"CAST(substr(?, j.key * {TOKEN_CHARS} + 1, {TOKEN_CHARS}) AS TEXT), "
                     "updated = ? FROM json_each(?) AS j WHERE nodes.name = j.value",
                     ("centos5", _token_text(len(names)).encode("ascii"), now, array))
    else:
        conn.execute("UPDATE nodes SET boot_target = 'local', boot_token = NULL, updated = ? "
                     "WHERE name IN (SELECT value FROM json_each(?))", (now, array))
    mark("UPDATE")
    conn.execute("INSERT INTO events(ts, node, run_id, kind, detail) SELECT ?, j.value, NULL, "
                 "'set-boot', ? FROM json_each(?) AS j ORDER BY j.key",
                 (now, "centos5" if image else "local", array))
    mark("event(s)")
    conn.execute("COMMIT")
    mark("COMMIT")
    conn.execute("BEGIN")
    cursor = conn.cursor()
    cursor.row_factory = None
    rows = cursor.execute(f"SELECT {', '.join(dhcpinputs.HOST_COLUMNS)} FROM nodes "
                          "ORDER BY name").fetchall()
    macs = sorted(cursor.execute("SELECT node, idx, mac FROM macs").fetchall())
    conn.execute("COMMIT")
    h = hashlib.sha256(repr(dhcpinputs.HOST_COLUMNS).encode())
    for part in (rows, macs):
        h.update(b"\0" + "\n".join(map(repr, part)).encode())
    h.hexdigest()
    mark("render: DHCP unchanged?")
    return mark.marks  # type: ignore[attr-defined]


def now_(cfg, conn, names: list[str], image: bool) -> Steps:  # type: ignore[no-untyped-def]
    """What pxe.setboot runs now (its own functions)."""
    mark = _timer()
    mark("check (aggregate)")  # none: the UPDATE's row count
    conn.execute("BEGIN IMMEDIATE")
    changed = _record(conn, names, "centos5" if image else None, "x86_64",
                      _token_text(len(names)) if image else "", False)
    assert changed == len(names)
    mark("UPDATE")
    db.log_event(conn, "set-boot", None, f"centos5: {names[0]}.. ({len(names)} node(s))")
    mark("event(s)")
    conn.execute("COMMIT")
    mark("COMMIT")
    assert dhcpinputs.installed(cfg, dhcpinputs.generation(conn), "")
    mark("render: DHCP unchanged?")
    return mark.marks  # type: ignore[attr-defined]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    n = args.nodes
    with tempfile.TemporaryDirectory(prefix="dynprov-bench-") as tmp:
        cfg = site_with(n, "isc", Path(tmp) / "site", bc.free_port())
        render_all(cfg, reload=False)  # installed and recorded: every later render is "unchanged"
        names = [f"n{i:05d}" for i in range(n)]
        conn = db.connect(cfg.database)
        results: dict[str, list[Steps]] = {"before": [], "now": []}
        whole: list[float] = []
        for r in range(args.repeat):
            order = ("before", "now") if r % 2 == 0 else ("now", "before")
            for i, which in enumerate(order):
                image = (r + i) % 2 == 0
                results[which].append(before(conn, names, image) if which == "before"
                                      else now_(cfg, conn, names, image))
            start = time.perf_counter()
            inv = Inventory(cfg)
            set_boot(cfg, f"n[00000-{n - 1:05d}]", "centos5" if r % 2 else None, inv)
            report = render_all(cfg, reload=False, inventory=inv)
            whole.append(time.perf_counter() - start)
            inv.conn.close()
            assert not report.dhcp_changed
        conn.close()
    steps = list(results["now"][0])
    rows, fields = [], {"nodes": n, "repeat": args.repeat}
    for step in [*steps, "total"]:
        cells = [step]
        for which in ("before", "now"):
            values = [sum(s.values()) if step == "total" else s[step] for s in results[which]]
            med = statistics.median(values)
            cells += [f"{med * 1000:.1f}", bc.spread([v * 1000 for v in values])]
            key = KEYS.get(step, step)
            fields[f"{which}_{key}_ms"] = round(med * 1000, 2)
        rows.append(cells)
    print(f"{n} nodes, SQLite, {args.repeat} rounds interleaved (os/local alternating); "
          f"{bc.load_note()}")
    print(bc.table(["step (in-process)", "before ms", "spread ms", "now ms", "spread ms"], rows))
    whole_ms = statistics.median(whole) * 1000
    print(f"now: set_boot() + render_all() as `set-boot --render` calls them: {whole_ms:.1f} ms "
          f"(spread {bc.spread([w * 1000 for w in whole])} ms)")
    fields.update(whole_ms=round(whole_ms, 2),
                  saved_ratio=round(fields["before_total_ms"] / fields["now_total_ms"], 2))
    bc.result(fields, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
