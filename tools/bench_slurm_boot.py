#!/usr/bin/env python3
"""bench_slurm_boot: `sbatch --constraint=B` to job start, against the bare boot of the same image.

One QEMU node (g1, the lab of tests/test_slurm_e2e.py: real munged + slurmctld in the lab
namespace, Debian images slA/slB from `fg-image-generate -slurm`, identical but for IMAGE_ID).
Each round times both sides, in alternating order, each from g1 idle in slA (an untimed bare
re-image into slA and slurmd's registration first):

  bare   `pxe-stage run start g1 --os slB --wait`: power-cycle into slB, no scheduler, until the
         node reports ready (its image's agent reports after munged and slurmd started), and on
         until g1's slurmd has registered idle with feature slB (the point a job could start)
  slurm  `sbatch --constraint=slB --nodelist=g1` until the job's own start (scontrol StartTime,
         whole seconds): helper + RebootProgram + the same re-image + slurmd's registration +
         scheduling

The overhead is slurm / (bare to slurmd registered) - 1, per round, median (goal <= 10%);
slurm / (bare to ready) is reported beside it. Each side is split with the run's own times
(runs.created, the node's ready update): before the power-cycle, the boot, after ready.
Network rule: the nodes live in the lab's namespace; everything else is loopback.

    tools/bench_slurm_boot.py [--rounds N] [--images DIR] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import bench_common as bc

sys.path.insert(0, str(bc.ROOT / "tests"))


def run_times(cfg, node: str, since: float) -> tuple[float, float, str]:
    """(created, updated, state) of the node's latest run started after ``since``."""
    from pxe import db

    conn = db.connect(cfg.db_path)
    try:
        row = conn.execute(
            "SELECT r.created, n.updated, n.state FROM runs r JOIN run_nodes n ON n.run_id = r.id "
            "WHERE n.node = ? AND r.created >= ? ORDER BY r.id DESC LIMIT 1",
            (node, since)).fetchone()
    finally:
        conn.close()
    if row is None:
        raise SystemExit(f"no run of {node} since {since}")
    return float(row[0]), float(row[1]), str(row[2])


def registered(lab, label: str, timeout: float = 300) -> None:
    """Wait until g1's slurmd is registered idle in ``label`` (resume it if Slurm set it down
    for the reboot it did not ask for)."""
    from test_slurm_e2e_support import wait_for

    def ok() -> bool:
        state, active = lab.ctl.node("g1")
        if state.startswith("down") and active == label:
            lab.ctl.run("scontrol", "update", "NodeName=g1", "State=RESUME")
        return (state, active) == ("idle", label)
    wait_for(ok, f"g1 idle in {label}", timeout, 1)


def bare_boot(lab, label: str) -> tuple[float, float, float, float]:
    """(total, before power, boot, registered) of `pxe-stage run start g1 --os LABEL --wait`:
    total ends when the command returns (the node reported ready); registered when g1's slurmd
    has registered idle in LABEL (Slurm's own start-up, the point a job could start)."""
    t0 = time.time()
    proc = lab.lab.exec("pxe-stage", "run", "start", "g1", "--os", label, "--force", "--wait")
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"run start g1 --os {label}: {proc.returncode} {proc.stderr.strip()}")
    created, ready, state = run_times(lab.site.cfg, "g1", t0 - 1)
    if state != "ready":
        raise SystemExit(f"bare boot into {label}: {state}")
    registered(lab, label)
    return end - t0, created - t0, ready - created, time.time() - t0


def slurm_boot(lab, job: Path, label: str) -> tuple[float, float, float, float]:
    """(total, before power, boot, after ready) of sbatch --constraint=LABEL to the job's start."""
    t0 = time.time()
    job_id = lab.ctl.submit(job, f"--constraint={label}", "--nodelist=g1")
    state = lab.ctl.wait_job(job_id, 900)
    if state != "COMPLETED":
        raise SystemExit(f"job {job_id}: {state}\n{lab.ctl.log_tail()}")
    start = lab.ctl.job(job_id)["StartTime"]
    started = datetime.datetime.strptime(start, "%Y-%m-%dT%H:%M:%S").timestamp()  # local time
    if f"IMAGE_ID={label}" not in lab.job_output("g1", job_id):
        raise SystemExit(f"job {job_id} did not run in {label}")
    created, ready, run_state = run_times(lab.site.cfg, "g1", t0 - 1)
    if run_state != "ready":
        raise SystemExit(f"re-image for job {job_id}: {run_state}")
    return started - t0, created - t0, ready - created, started - ready


def bench(work: Path, args: argparse.Namespace) -> int:
    from conftest import make_site
    from test_slurm_e2e_support import build_images, console_job_script, slurm_lab_up

    images = args.images or work / "images"
    if not (images / "slB.bundle").is_file():
        images.mkdir(parents=True, exist_ok=True)
        build_images(images)
    site = make_site(work / "site")
    bare: list[tuple[float, float, float, float]] = []
    slurm: list[tuple[float, float, float, float]] = []
    with slurm_lab_up(site, images, nodes=("g1",)) as lab:
        job = console_job_script(lab.ctl.base / "job.sh")
        for i in range(args.rounds):
            for side in (("bare", "slurm") if i % 2 == 0 else ("slurm", "bare")):
                if lab.ctl.node("g1") != ("idle", "slA"):
                    bare_boot(lab, "slA")  # untimed: back to A
                if side == "bare":
                    bare.append(bare_boot(lab, "slB"))
                else:
                    slurm.append(slurm_boot(lab, job, "slB"))
                print(f"round {i + 1} {side:5}: "
                      f"{(bare[-1] if side == 'bare' else slurm[-1])[0]:6.1f} s", flush=True)
    ratios = [s[0] / b[0] for b, s in zip(bare, slurm, strict=True)]
    reg_ratios = [s[0] / b[3] for b, s in zip(bare, slurm, strict=True)]
    med = {k: bc.median([x[j] for x in rows]) for k, rows, j in (
        ("bare", bare, 0), ("bare_before", bare, 1), ("bare_boot", bare, 2),
        ("bare_registered", bare, 3), ("slurm", slurm, 0), ("slurm_before", slurm, 1),
        ("slurm_boot", slurm, 2), ("slurm_after", slurm, 3))}
    ratio, reg_ratio = bc.median(ratios), bc.median(reg_ratios)
    # what the Slurm path adds around the same re-image, whatever the boot itself took
    added = [(s[1] + s[3]) - (b[1] + (b[0] - b[1] - b[2])) for b, s in zip(bare, slurm,
                                                                            strict=True)]
    print(f"\n{args.rounds} rounds, one QEMU node (TCG), image slA -> slB, seconds (median):")
    print(bc.table(["side", "total", "before power-cycle", "boot to ready", "ready to end",
                    "to slurmd registered"],
                   [["bare: pxe-stage run start --wait", f"{med['bare']:.1f}",
                     f"{med['bare_before']:.1f}", f"{med['bare_boot']:.1f}",
                     f"{med['bare'] - med['bare_before'] - med['bare_boot']:.1f}",
                     f"{med['bare_registered']:.1f}"],
                    ["slurm: sbatch --constraint=slB (end: job start)", f"{med['slurm']:.1f}",
                     f"{med['slurm_before']:.1f}", f"{med['slurm_boot']:.1f}",
                     f"{med['slurm_after']:.1f}", "-"]]))
    print("per round (bare to ready, bare to slurmd registered, slurm to job start): " + ", ".join(
        f"{b[0]:.1f}/{b[3]:.1f}/{s[0]:.1f}" for b, s in zip(bare, slurm, strict=True)))
    print(f"slurm / bare to ready: {ratio:.3f} (median of rounds, {bc.spread(ratios)}); "
          f"slurm / bare to slurmd registered: {reg_ratio:.3f} ({bc.spread(reg_ratios)})")
    print(f"added around the boot (slurm's before + after ready - bare's): median "
          f"{bc.median(added):.1f} s = {bc.median(added) / med['bare_boot'] * 100:.0f}% of the "
          "bare boot")
    print("slurm side: StartTime has whole seconds (up to 1 s early)")
    overhead = (reg_ratio - 1) * 100  # the same point: g1 usable by Slurm in slB
    bc.result({"slurm_vs_registered": reg_ratio, "overhead_pct": overhead,
               "slurm_vs_bare": ratio, "slurm_vs_bare_spread": bc.spread(ratios),
               "slurm_vs_registered_spread": bc.spread(reg_ratios),
               "added_s": bc.median(added),
               "added_pct_of_boot": bc.median(added) / med["bare_boot"] * 100,
               "bare_s": med["bare"], "bare_registered_s": med["bare_registered"],
               "slurm_s": med["slurm"], "slurm_before_power_s": med["slurm_before"],
               "slurm_after_ready_s": med["slurm_after"], "rounds": args.rounds,
               "goal_pct": 10, "verdict": "ok" if overhead <= 10 else "OVER"},
              as_json=args.json)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (each times both sides)")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="reuse slA.bundle, slB.bundle and conf/ there; build them into DIR "
                        "(kept) when missing (default: build into the work dir)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args()
    if not 1 <= args.rounds <= 20:
        p.error("--rounds must be 1..20")
    return bc.run_in_workdir("bench-slurm-boot-", bench, args)


if __name__ == "__main__":
    sys.exit(main())
