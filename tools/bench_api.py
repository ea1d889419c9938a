#!/usr/bin/env python3
"""Benchmark the REST service against the local CLI on the same data (not a test).

Builds a throw-away site in a temp dir with N nodes (default 10,000), starts `pxe-stage api
serve` on 127.0.0.1 (a free port, a fresh self-signed certificate, a password-file user), and
measures requests per second, keep-alive clients in threads, each phase bounded in time and
count:
  - GET /api/v1/nodes          the whole node list (JSON)
  - GET /api/v1/whoami         the smallest authenticated call (token check + group lookup)
  - GET /api/v1/status         what the status page polls (nodes, images, pools, runs)
  - POST /api/v1/token         a login (bcrypt, cost 12): what the bearer token saves
side by side with the local way to read the same node list:
  - `pxe-stage nodes list --json` as a process (what a user with a shell runs)
  - the same read in-process (Inventory.all() + JSON), i.e. without interpreter start-up.
Traffic goes to 127.0.0.1 only; the server is stopped by its PID at the end.

    python3 tools/bench_api.py [--nodes 10000] [--seconds 5] [--clients 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_common as bc  # noqa: E402

PASSWORD = "bench-password-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_site(root: Path, nodes: int, workers: int) -> Path:
    from pxe import config
    from pxe.api import auth, tls
    from pxe.inventory import Inventory, build

    cfg_path = root / "dynprov.toml"
    port = free_port()
    cfg_path.write_text(config.example(root, subnet="10.99.0.0/16", server="10.99.0.1") + f"""
[api]
address = "127.0.0.1"
port = {port}
workers = {workers}
cert = "{root}/api.crt"
key = "{root}/api.key"
auth = ["file"]
password_file = "{root}/api-passwords"
""")
    tls.make_cert(root / "api.crt", root / "api.key", ["localhost"], ["127.0.0.1"])
    auth.set_password(root / "api-passwords", "bench", PASSWORD, ["fgadmin"])
    cfg = config.load(cfg_path)
    rows = [build(cfg, {"name": f"n{i:05d}",
                        "macs": f"52:54:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:"
                                f"{i >> 8 & 255:02x}:{i & 255:02x}"})
            for i in range(1, nodes + 1)]
    Inventory(cfg).add(rows)
    return cfg_path


def measure(name: str, call, seconds: float, clients: int, max_count: int) -> dict:
    done = [0] * clients
    errors = [0] * clients
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        state = call.setup() if hasattr(call, "setup") else None
        while time.monotonic() < stop and done[i] < max_count:
            try:
                ok = call(state)
            except Exception:  # noqa: BLE001 - counted, shown
                ok = False
            done[i] += 1
            errors[i] += 0 if ok else 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - start
    total = sum(done)
    return {"what": name, "requests": total, "errors": sum(errors), "seconds": round(elapsed, 2),
            "per_second": round(total / elapsed, 1), "clients": clients}


class Http:
    def __init__(self, url: str, ctx: ssl.SSLContext, path: str, headers: dict[str, str],
                 method: str = "GET"):
        self.url, self.ctx, self.path, self.headers, self.method = url, ctx, path, headers, method

    def setup(self):
        import httpx

        return httpx.Client(base_url=self.url, verify=self.ctx, timeout=60)

    def __call__(self, client) -> bool:
        r = client.request(self.method, self.path, headers=self.headers)
        r.read()
        return r.status_code < 300


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=5.0, help="per phase")
    ap.add_argument("--clients", type=int, default=4, help="concurrent keep-alive clients")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import httpx

    with tempfile.TemporaryDirectory(prefix="bench-api.") as tmp:
        root = Path(tmp)
        print(f"building a site with {args.nodes} nodes ...", file=sys.stderr)
        cfg_path = make_site(root, args.nodes, args.workers)
        from pxe import config

        cfg = config.load(cfg_path)
        url = f"https://127.0.0.1:{cfg.raw['api']['port']}"
        env = {**os.environ, "DYNPROV_CONFIG": str(cfg_path)}
        log = open(root / "server.log", "wb")
        server = subprocess.Popen([sys.executable, "-m", "pxe.cli.main", "api", "serve"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        results = []
        try:
            ctx = ssl.create_default_context(cafile=str(root / "api.crt"))
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/healthz", verify=ctx, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                raise SystemExit("server did not start:\n" + (root / "server.log").read_text())
            r = httpx.post(f"{url}/api/v1/token", auth=("bench", PASSWORD), verify=ctx)
            bearer = {"Authorization": f"Bearer {r.json()['token']}"}
            s, c = args.seconds, args.clients
            results.append(measure("API GET /api/v1/nodes (bearer)",
                                   Http(url, ctx, "/api/v1/nodes", bearer), s, c, 100_000))
            results.append(measure("API GET /api/v1/whoami (bearer)",
                                   Http(url, ctx, "/api/v1/whoami", bearer), s, c, 1_000_000))
            results.append(measure("API GET /api/v1/status (bearer)",
                                   Http(url, ctx, "/api/v1/status", bearer), s, c, 100_000))
            basic = {"Authorization": "Basic " + __import__("base64").b64encode(
                f"bench:{PASSWORD}".encode()).decode()}
            results.append(measure("API POST /api/v1/token (Basic, bcrypt)",
                                   Http(url, ctx, "/api/v1/token", basic, "POST"), s, c, 10_000))

            def cli(_state) -> bool:
                p = subprocess.run([sys.executable, "-m", "pxe.cli.main", "nodes", "list",
                                    "--json"], env=env, cwd=ROOT, capture_output=True,
                                   timeout=120)
                return p.returncode == 0

            results.append(measure("local CLI `pxe-stage nodes list --json` (process)", cli, s,
                                   min(c, os.cpu_count() or 1), 10_000))
            from pxe.inventory import Inventory

            def inproc(_state) -> bool:
                json.dumps([n.public() for n in Inventory(cfg).all()])
                return True

            results.append(measure("local read in-process (Inventory.all + JSON)", inproc, s, 1,
                                   10_000))
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'what':<52} {'req/s':>9} {'requests':>9} {'errors':>7} clients")
        for row in results:
            print(f"{row['what']:<52} {row['per_second']:>9} {row['requests']:>9} {row['errors']:>7} "
                  f"{row['clients']}")
        print(f"({args.nodes} nodes, {args.workers} server workers, {os.cpu_count()} cores, "
              f"{args.seconds} s per phase; {bc.load_note()})")
    fields: dict[str, object] = {"nodes": args.nodes, "workers": args.workers}
    for i, row in enumerate(results):
        fields[f"phase{i + 1}_per_s"] = row["per_second"]
        fields[f"phase{i + 1}_errors"] = row["errors"]
    bc.result(fields, False)  # --json printed the rows above
    return 0


if __name__ == "__main__":
    sys.exit(main())
