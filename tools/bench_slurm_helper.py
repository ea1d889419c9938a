#!/usr/bin/env python3
"""bench_slurm_helper: the per-call cost of `dynprov-slurm helper`, as slurmd runs it.

slurmd runs the helper (no argument) at every registration and waits for it up to ExecTime
(10 s): it must answer in well under that; the aim is < 50 ms. Measured: the helper as a process
(python3 -m slurm_plugin.cli helper, and with python3 -S as a lean launcher would), the sh fast
path contrib/slurm/dynprov-slurm-helper, against the interpreter's bare start-up, and the helper
with a FEATURE: a real `pxe-stage serve` on 127.0.0.1
answering POST /node/next-image (boot files rendered, token issued) for an enrolled node.
The figure the aim is about is the *configured* helper: the Helper= program that
`dynprov-slurm config` writes into helpers.conf for a site without [slurm] helper/tools_dir
(the sh fast path since it is the default), timed as slurmd runs it.
Network rule: everything talks to 127.0.0.1; the server is stopped by PID.

    tools/bench_slurm_helper.py [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_common as bc
from bench_common import ROOT, free_port, make_site, run_in_workdir

SPREADS: dict[str, str] = {}  # argv[0] -> min-max of its repeats (ms)


def timed(argv: list[str], env: dict[str, str], repeat: int) -> tuple[float, str]:
    """Median wall time of ``argv`` over ``repeat`` runs, and its last stdout."""
    times, out = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
        out = proc.stdout
    SPREADS[argv[0]] = bc.spread([t * 1000 for t in times])
    return statistics.median(times), out


def configured_helper(cfg_path: Path, env: dict[str, str]) -> str:
    """The Helper= program `dynprov-slurm config` prints for this site (no [slurm] helper)."""
    with open(cfg_path, "a") as fh:
        fh.write("\n[slurm]\nresume_timeout = 900\n")
    proc = subprocess.run([sys.executable, "-m", "slurm_plugin.cli", "config"], env=env,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"dynprov-slurm config -> {proc.returncode}: {proc.stderr.strip()}")
    helpers = [ln for ln in proc.stdout.splitlines() if ln.startswith("Feature=")]
    return helpers[0].split("Helper=", 1)[1]


def bench(work: Path, args: argparse.Namespace) -> int:
    import httpx

    node_root = work / "node"
    (node_root / "etc").mkdir(parents=True)
    (node_root / "proc").mkdir()
    (node_root / "etc" / "os-release").write_text("ID=debian\nIMAGE_ID=alpha\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DYNPROV_NODE_ROOT": str(node_root)}
    helper = [sys.executable, "-m", "slurm_plugin.cli", "helper"]
    bare, _ = timed([sys.executable, "-c", "pass"], env, args.repeat)
    plain, out = timed(helper, env, args.repeat)
    lean, lean_out = timed([sys.executable, "-S", *helper[1:]], env, args.repeat)
    fast, fast_out = timed([str(ROOT / "contrib" / "slurm" / "dynprov-slurm-helper")], env,
                           args.repeat)
    assert out == lean_out == fast_out == "alpha\n", (out, lean_out, fast_out)

    # with a feature: a real server, an enrolled node
    http_port = free_port()
    cfg_path = make_site(work / "site", {"http_address": "127.0.0.1", "http_port": http_port,
                                         "tftp_address": "127.0.0.1", "tftp_port": free_port()})
    site_env = {**env, "DYNPROV_CONFIG": str(cfg_path)}
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import fake_bzimage

    kernel = fake_bzimage(work / "vmlinuz", b"k" * 1024)

    def admin(*argv: str) -> None:
        subprocess.run([sys.executable, "-m", "pxe.cli.main", *argv], env=site_env, check=True,
                       capture_output=True, timeout=60)

    admin("nodes", "add", "n001", "--mac", "52:54:00:be:00:01")
    for label in ("alpha", "beta"):
        admin("images", "add", label, "--kernel", str(kernel))
    configured = configured_helper(cfg_path, site_env)
    conf_time, conf_out = timed([configured], env, args.repeat)
    conf_spread = SPREADS[configured]
    assert conf_out == "alpha\n", conf_out
    admin("set-boot", "n001", "--os", "alpha")
    from pxe import config
    from pxe.inventory import Inventory

    token = Inventory(config.load(cfg_path)).get("n001").boot_token
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "pxe.cli.main", "serve"], env=site_env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{http_port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        (node_root / "proc" / "cmdline").write_text(
            f"dynprov.server={url} dynprov.node=n001 dynprov.token={token}\n")
        subprocess.run([*helper[:-1], "enroll"], env=env, check=True, capture_output=True,
                       timeout=60)
        feature, fout = timed([*helper, "beta"], env, args.repeat)
        assert "next boot beta" in fout, fout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()

    print(f"dynprov-slurm helper, median of {args.repeat} runs each; configured: {configured}")
    rows = [("python3 -c pass (interpreter start)", bare),
            ("helper (no argument): prints the image", plain),
            ("helper, lean launcher (python3 -S)", lean),
            ("fast helper (contrib/slurm, sh, no argument)", fast),
            ("helper FEATURE: POST /node/next-image", feature),
            ("configured Helper= (dynprov-slurm config)", conf_time)]
    for name, seconds in rows:
        print(f"  {name:<44} {seconds * 1000:8.1f} ms")
    ok = conf_time < 0.050
    bc.result({"configured_helper_ms": conf_time * 1000,
               "configured_helper_ms_spread": conf_spread, "helper_ms": plain * 1000,
               "helper_own_ms": (plain - bare) * 1000, "helper_lean_ms": lean * 1000,
               "helper_sh_ms": fast * 1000, "helper_feature_ms": feature * 1000,
               "interpreter_ms": bare * 1000, "aim": 50, "verdict": "ok" if ok else "OVER"},
              as_json=args.json)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_args()
    if not 1 <= args.repeat <= 1000:
        p.error("--repeat must be 1..1000")
    return run_in_workdir("bench-slurm-helper-", bench, args)


if __name__ == "__main__":
    sys.exit(main())
