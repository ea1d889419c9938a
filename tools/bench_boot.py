#!/usr/bin/env python3
"""Simulated boot storm: N PXE clients (default 500) boot against `pxe-stage serve` at once.

Each simulated node does what its firmware and boot loader would, with its own MAC:
- chain "ipxe" (default, the iPXE/HTTP variant): TFTP `undionly.kpxe` (blksize 1432 + tsize,
  as iPXE asks), HTTP `boot.ipxe`, HTTP `ipxe/<mac>.ipxe`, then kernel and initrd over HTTP from
  the URLs in that script;
- chain "pxelinux": TFTP `pxelinux.0` and `ldlinux.c32` (tsize + blksize 1408), the UUID
  config name (not found, as on real hardware), `pxelinux.cfg/01-<mac>`, then kernel and initrd
  over TFTP from that file;
then it calls home (`booting`, then `ready`) with the token from its kernel command line.
Every file's size is checked and every answer must be the expected one. Both chains by default,
in --rounds interleaved rounds (a set-boot before each: new one-time tokens). Reported per
chain: wall time (median, spread), seconds per 100 nodes, failures, the median time of each
step, and HTTP / TFTP (goal <= 0.6); ends with `RESULT ...` (tools/bench_common.result).

    python3 tools/bench_boot.py [--nodes 500] [--chain both|ipxe|pxelinux] [--rounds 3]
                                [--kernel-mb 8] [--initrd-mb 16] [--client-procs 2] [--json]

`--lab` runs the real thing instead (tools/bench_boot_lab.py): 4 QEMU nodes of `dynprov-lab`
switched by os-switch over both paths, interleaved (root, minutes per round, not in CI).

The clients are asyncio in `--client-procs` processes (a node is a coroutine, not a VM). Each
node sends from its own address (127.1.x.y, as a real node has its own IP) to serve on
127.0.0.1 (loopback only); the site is a temp dir, removed at the end (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import bench_common as bc

STEPS = ("loader", "config", "kernel", "initrd", "report")
# What the simulated nodes saw of TFTP, per client process: seconds from a read's first RRQ to
# the server's first answer, RRQs sent again (silence), answers from a second server port (a
# second transfer answering a repeat: turned away with "Unknown transfer ID", as firmware does).
TFTP_SEEN: dict[str, list[float] | int] = {"first_answer": [], "rrq_repeats": 0,
                                          "strangers": 0}


# -- the simulated node (client side) --------------------------------------------------------------
class TftpGet(asyncio.DatagramProtocol):
    """One TFTP read, lock-step, with options; retransmits its last packet on silence."""

    def __init__(self, name: str, options: dict[str, str]):
        self.name, self.options = name, options
        self.blksize = 512
        self.data = bytearray()
        self.expect = 1
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.last: tuple[bytes, tuple] | None = None
        self.heard = 0
        self.tid: tuple | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.asked = 0.0  # when the first RRQ went out

    def send(self, packet: bytes, addr: tuple) -> None:
        self.last = (packet, addr)
        assert self.transport is not None
        self.transport.sendto(packet, addr)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.tid is None:
            self.tid = addr  # the first answer's port is the transfer's (RFC 1350 TID)
            TFTP_SEEN["first_answer"].append(time.monotonic() - self.asked)  # type: ignore[union-attr]
        elif addr != self.tid:  # a second server port (our repeated request): turn it away
            TFTP_SEEN["strangers"] += 1  # type: ignore[operator]
            assert self.transport is not None
            self.transport.sendto(struct.pack("!HH", 5, 5) + b"Unknown transfer ID\0", addr)
            return
        self.heard += 1
        if self.done.done() or len(data) < 4:
            return
        opcode = struct.unpack("!H", data[:2])[0]
        if opcode == 6:
            parts = data[2:].split(b"\0")[:-1]
            opts = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}
            self.blksize = int(opts.get("blksize", 512))
            self.send(struct.pack("!HH", 4, 0), addr)
        elif opcode == 3:
            block = struct.unpack("!H", data[2:4])[0]
            if block == self.expect & 0xFFFF:
                self.data += data[4:]
                self.expect += 1
                self.send(struct.pack("!HH", 4, block), addr)
                if len(data) - 4 < self.blksize:
                    self.done.set_result(bytes(self.data))
            elif self.last:  # a duplicate: answer with our last ACK again
                self.send(*self.last)
        elif opcode == 5:
            code = struct.unpack("!H", data[2:4])[0]
            self.done.set_exception(FileNotFoundError(f"TFTP error {code} for {self.name}"))

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def tftp_get(port: int, name: str, options: dict[str, str], source: str,
                   tries: int = 8) -> bytes:
    """``source``: the node's own address. Silence: 2 s per try, 8 tries (16 s); iPXE's retry
    timer doubles from 1/4 s to its 10 s limit (~16 s, src/include/ipxe/retry.h)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: TftpGet(name, options), local_addr=(source, 0))
    proto.transport = transport
    try:
        rrq = struct.pack("!H", 1) + b"".join(
            s.encode() + b"\0" for s in [name, "octet", *sum(options.items(), ())])
        proto.asked = time.monotonic()
        proto.send(rrq, (bc.LOOPBACK, port))
        silent = 0
        while True:
            heard = proto.heard
            try:
                return await asyncio.wait_for(asyncio.shield(proto.done), 2.0)
            except TimeoutError:
                if proto.heard == heard:
                    silent += 1
                    if silent >= tries:
                        raise TimeoutError(f"TFTP {name}: no answer") from None
                    assert proto.last is not None
                    if proto.tid is None:
                        TFTP_SEEN["rrq_repeats"] += 1  # type: ignore[operator]
                    proto.send(*proto.last)  # the RRQ, or our last ACK
                else:
                    silent = 0
    finally:
        transport.close()


async def http(port: int, method: str, path: str, source: str, body: bytes = b""
               ) -> tuple[int, bytes, int]:
    """(status, body if small else b'', body length); the body is read fully either way.
    ``source``: the node's own address.

    Raw socket + recv_into one reused buffer: the client copies each byte once, so that the
    clients' CPU (they share the 2 cores with serve) goes as far as it can.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await loop.sock_connect(sock, (bc.LOOPBACK, port))
        head = (f"{method} {path} HTTP/1.1\r\nHost: {bc.LOOPBACK}\r\nConnection: close\r\n"
                f"Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        await loop.sock_sendall(sock, head.encode() + body)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        got = bytearray()
        while b"\r\n\r\n" not in got:
            n = await loop.sock_recv_into(sock, view)
            if not n:
                raise ConnectionError(f"{path}: connection closed in the headers")
            got += view[:n]
        header, _, first = bytes(got).partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                       if k.lower() == "content-length"), None)
        kept, total = bytearray(first[:1 << 16]), len(first)
        while n := await loop.sock_recv_into(sock, view):
            if total < 1 << 16:
                kept += view[:n]
            total += n
        if length is not None and total != length:
            raise ConnectionError(f"{path}: {total} of {length} bytes")
        return status, bytes(kept[:total]), total
    except OSError as exc:  # say which request: the step is not in the exception
        raise type(exc)(exc.errno, f"{method} {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()


async def boot_node(node: dict, a: dict, timings: dict[str, list[float]]) -> str | None:
    """One node's boot; None if it all went right, else what went wrong."""
    tport, hport, ip = a["tftp_port"], a["http_port"], node["ip"]
    mac = node["mac"]
    hyphen = mac.replace(":", "-")
    t = time.monotonic()

    def step(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        timings[name].append(now - t)
        t = now

    def local(url: str) -> str:
        return urlsplit(url).path  # the rendered URLs name the provisioning address

    try:
        if a["chain"] == "ipxe":
            loader = await tftp_get(tport, "undionly.kpxe", {"blksize": "1432", "tsize": "0"}, ip)
            assert len(loader) == a["sizes"]["undionly.kpxe"], "loader size"
            step("loader")
            status, main, _ = await http(hport, "GET", "/boot.ipxe", ip)
            assert status == 200 and main.startswith(b"#!ipxe"), "boot.ipxe"
            status, script, _ = await http(hport, "GET", f"/ipxe/{hyphen}.ipxe", ip)
            assert status == 200, f"ipxe script {status}"
            text = script.decode()
            kernel_url = re.search(r"^kernel (\S+)", text, re.M).group(1)  # type: ignore[union-attr]
            initrd_url = re.search(r"^initrd --name \S+ (\S+)", text, re.M).group(1)  # type: ignore[union-attr]
            step("config")
            status, _, n = await http(hport, "GET", local(kernel_url), ip)
            assert status == 200 and n == a["sizes"]["kernel"], "kernel"
            step("kernel")
            status, _, n = await http(hport, "GET", local(initrd_url), ip)
            assert status == 200 and n == a["sizes"]["initrd"], "initrd"
            step("initrd")
        else:
            opts = {"tsize": "0", "blksize": "1408"}
            for name in ("pxelinux.0", "ldlinux.c32"):
                got = await tftp_get(tport, name, opts, ip)
                assert len(got) == a["sizes"][name], f"{name}: {len(got)} of {a['sizes'][name]} bytes"
            step("loader")
            try:
                await tftp_get(tport, f"pxelinux.cfg/{node['uuid']}", opts, ip)
                return "the UUID config name should not exist"
            except FileNotFoundError:
                pass
            text = (await tftp_get(tport, f"pxelinux.cfg/01-{hyphen}", opts, ip)).decode()
            kernel = re.search(r"KERNEL (\S+)", text).group(1)  # type: ignore[union-attr]
            initrd = re.search(r"INITRD (\S+)", text).group(1)  # type: ignore[union-attr]
            step("config")
            got = await tftp_get(tport, kernel, opts, ip)
            assert len(got) == a["sizes"]["kernel"], "kernel"
            step("kernel")
            got = await tftp_get(tport, initrd, opts, ip)
            assert len(got) == a["sizes"]["initrd"], "initrd"
            step("initrd")
            text = f"{text}"
        token = re.search(r"dynprov\.token=(\S+)", text).group(1)  # type: ignore[union-attr]
        for kind in ("booting", "ready"):
            body = f"node={node['name']}&token={token}&kind={kind}".encode()
            status, answer, _ = await http(hport, "POST", "/report", ip, body)
            assert (status, answer) == (200, b"ok"), f"report {kind}: {status} {answer!r}"
        step("report")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


async def client_main(spec: dict) -> dict:
    timings: dict[str, list[float]] = {s: [] for s in STEPS}
    start = time.monotonic()
    results = await asyncio.gather(*(boot_node(n, spec, timings) for n in spec["nodes"]))
    failures = [f"{n['name']}: {r}" for n, r in zip(spec["nodes"], results, strict=True) if r]
    return {"seconds": time.monotonic() - start, "failures": failures, "timings": timings,
            "tftp": TFTP_SEEN}


# -- the bench (server side) -------------------------------------------------------------------------
def build_site(work: Path, args: argparse.Namespace, ports: dict[str, int]) -> tuple[Path, dict]:
    from pxe import config
    from pxe.images import Catalog
    from pxe.inventory import Inventory, build
    from pxe.setboot import render_all, set_boot

    cfg_path = bc.make_site(work / "site", {
        "tftp_address": bc.LOOPBACK, "tftp_port": ports["tftp"], "http_address": bc.LOOPBACK,
        "http_port": ports["http"], "max_transfers": max(512, args.nodes * 2)})
    cfg = config.load(cfg_path)
    inv = Inventory(cfg)
    # Each node its own address (127.1.0.0/16 on lo), as each real node has its own IP: the
    # server's per-client HTTP cap counts addresses, and a UDP port a node's socket frees is
    # reused by that node only. With all nodes on 127.0.0.1 (before), 500 nodes were one
    # client over the cap (503, or a RST before deadlines.refuse()), and a late answer of a
    # repeated RRQ reached another node's new socket on the freed port (that node took the
    # wrong file: `AssertionError: pxelinux.0`).
    nodes = [{"name": f"n{i:04d}", "mac": f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
              f"{i & 255:02x}", "uuid": f"{i:08x}-0000-4000-8000-{i:012x}",
              "ip": f"127.{1 + (i >> 16)}.{i >> 8 & 255}.{i & 255}"}
             for i in range(1, args.nodes + 1)]
    inv.add([build(cfg, {"name": n["name"], "mac": n["mac"]}) for n in nodes])
    kernel = work / "vmlinuz"
    head = bytearray(0x400)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    kernel.write_bytes(bytes(head) + os.urandom((args.kernel_mb << 20) - len(head)))
    initrd = work / "initrd.img"
    initrd.write_bytes(os.urandom(args.initrd_mb << 20))
    Catalog(cfg, inv.conn).add("bench", kernel, initrd)
    set_boot(cfg, [n["name"] for n in nodes], "bench", inv)
    render_all(cfg, reload=False)
    tftp = cfg.paths.tftp_root
    if not (tftp / "undionly.kpxe").exists():  # iPXE's PXE loader: a stand-in of its size
        (tftp / "undionly.kpxe").write_bytes(os.urandom(70_000))
        (tftp / "undionly.kpxe").chmod(0o644)
    for name in ("pxelinux.0", "ldlinux.c32"):
        if not (tftp / name).exists():
            (tftp / name).write_bytes(os.urandom(60_000))
            (tftp / name).chmod(0o644)
    sizes = {name: (tftp / name).stat().st_size
             for name in ("undionly.kpxe", "pxelinux.0", "ldlinux.c32")}
    sizes |= {"kernel": kernel.stat().st_size, "initrd": initrd.stat().st_size}
    return cfg_path, {"nodes": nodes, "sizes": sizes}


def main() -> int:
    if "--lab" in sys.argv[1:]:  # real QEMU nodes instead of simulated ones
        import bench_boot_lab

        return bench_boot_lab.main([a for a in sys.argv[1:] if a != "--lab"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--chain", choices=("both", "ipxe", "pxelinux"), default="both")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per chain")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    ap.add_argument("--kernel-mb", type=int, default=8)
    ap.add_argument("--initrd-mb", type=int, default=16)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (serve.log) for a look")
    ap.add_argument("--client", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:  # one client process: read the spec, boot its nodes, print JSON
        spec = json.loads(Path(args.client).read_text())
        print(json.dumps(asyncio.run(client_main(spec))))
        return 0

    return bc.run_in_workdir("bench-boot-", _bench, args, keep=args.keep)


def _bench(work: Path, args: argparse.Namespace) -> int:
    from pxe import config
    from pxe.setboot import set_boot

    ports = {"tftp": bc.free_port(), "http": bc.free_port()}
    print(f"building a site with {args.nodes} nodes ...", file=sys.stderr)
    cfg_path, setup = build_site(work, args, ports)
    nodes = setup["nodes"]
    chains = ("ipxe", "pxelinux") if args.chain == "both" else (args.chain,)
    specs: dict[str, list[Path]] = {}
    for chain in chains:
        for i in range(args.client_procs):
            spec = {"nodes": nodes[i::args.client_procs], "chain": chain,
                    "sizes": setup["sizes"], "tftp_port": ports["tftp"],
                    "http_port": ports["http"]}
            path = work / f"client-{chain}-{i}.json"
            path.write_text(json.dumps(spec))
            specs.setdefault(chain, []).append(path)
    walls: dict[str, list[float]] = {c: [] for c in chains}
    failures: dict[str, list[str]] = {c: [] for c in chains}
    timings: dict[str, dict[str, list[float]]] = {c: {s: [] for s in STEPS} for c in chains}
    seen: dict[str, dict] = {c: {"first_answer": [], "rrq_repeats": 0, "strangers": 0}
                             for c in chains}
    cfg = config.load(cfg_path)
    with bc.server(bc.serve_argv(cfg_path), work / "serve.log"):
        bc.wait_until(lambda: bc.curl_ok(f"http://{bc.LOOPBACK}:{ports['http']}/healthz"),
                      "serve")
        for r in range(args.rounds):
            for chain in (chains if r % 2 == 0 else chains[::-1]):
                # a new one-time token per boot, as a real switch issues (one transaction)
                set_boot(cfg, [n["name"] for n in nodes], "bench")
                print(f"round {r + 1}/{args.rounds}: booting {args.nodes} nodes ({chain} "
                      f"chain) ...", file=sys.stderr)
                seconds, outs = bc.parallel([[sys.executable, __file__, "--client", str(p)]
                                             for p in specs[chain]], timeout=3600)
                walls[chain].append(seconds)
                for out in outs:
                    if out.startswith("FAILED"):
                        failures[chain].append(out)
                        continue
                    result = json.loads(out)
                    failures[chain] += result["failures"]
                    for s in STEPS:
                        timings[chain][s] += result["timings"][s]
                    for key, value in result["tftp"].items():
                        seen[chain][key] += value
        metrics = subprocess.run(["curl", "-s", f"http://{bc.LOOPBACK}:{ports['http']}/metrics"],
                                 capture_output=True, text=True, timeout=30).stdout
    print(f"{args.nodes} simulated PXE nodes, kernel {args.kernel_mb} MiB + initrd "
          f"{args.initrd_mb} MiB each, {args.client_procs} client processes, serve with "
          f"defaults, {args.rounds} interleaved rounds ({bc.load_note()})")
    rows = []
    for chain in chains:
        w = walls[chain]
        rows.append([chain, "HTTP (iPXE)" if chain == "ipxe" else "TFTP only",
                     f"{statistics.median(w):.2f}", bc.spread(w),
                     f"{statistics.median(w) / args.nodes * 100:.1f}", len(failures[chain])])
    print(bc.table(["chain", "kernel+initrd by", "wall s (median)", "spread s",
                    "s per 100 nodes", "failed"], rows))
    for chain in chains:
        print(f"{chain} steps:")
        print(bc.table(["step", "median s", "max s"],
                       [[s, f"{statistics.median(v):.2f}", f"{max(v):.2f}"]
                        for s, v in timings[chain].items() if v]))
    print("TFTP as the nodes saw it (every read; first answer = first RRQ to first reply):")
    print(bc.table(["chain", "reads", "first answer median s", "p90 s", "max s", "RRQs repeated",
                    "answers from a 2nd port"],
                   [[c, len(v["first_answer"]), *(f"{x:.3f}" for x in _quantiles(
                       v["first_answer"])), v["rrq_repeats"], v["strangers"]]
                    for c, v in seen.items() if v["first_answer"]]))
    wanted = ("dynprov_tftp_transfers_total", "dynprov_tftp_retransmits_total",
              "dynprov_tftp_requests_total{result=\"busy\"}",
              "dynprov_tftp_requests_total{result=\"duplicate\"}",
              "dynprov_tftp_requests_total{result=\"started\"}",
              "dynprov_reports_total{kind=\"ready\"")
    for line in metrics.splitlines():
        if line.startswith(wanted) and not line.endswith(" 0"):
            print(f"  {line}")
    aborted = _aborted_by_reason(work / "serve.log")
    if aborted:
        print("serve's log, aborted TFTP transfers by reason: " + ", ".join(
            f"{n} {why!r}" for why, n in aborted.most_common()))
    every = [f for c in chains for f in failures[c]]
    for f in every[:20]:
        print(f"FAILED {f}")
    fields: dict[str, object] = {"nodes": args.nodes, "rounds": args.rounds,
                                 "failed": len(every)}
    for chain in chains:
        fields[f"{chain}_s"] = statistics.median(walls[chain])
    answers = [x for v in seen.values() for x in v["first_answer"]]
    if answers:
        fields["tftp_first_answer_s"] = statistics.median(answers)
        fields["tftp_strangers"] = sum(v["strangers"] for v in seen.values())
    if len(chains) == 2:
        h, t = walls["ipxe"], walls["pxelinux"]
        fields["http_vs_tftp"] = statistics.median(h) / statistics.median(t)
        fields["http_vs_tftp_spread"] = f"{min(h) / max(t):.2f}-{max(h) / min(t):.2f}"
        print(f"HTTP / TFTP wall time = {fields['http_vs_tftp']:.2f} (goal <= 0.6)")
    bc.result(fields, args.json)
    return 1 if every else 0


def _aborted_by_reason(log: Path) -> Counter[str]:
    """serve's 'TFTP <peer>: <file> aborted after i of n blocks: <why>' lines, by why."""
    reasons: Counter[str] = Counter()
    with contextlib.suppress(OSError), open(log, errors="replace") as fh:
        for line in fh:
            head, found, why = line.partition(" blocks: ")
            if found and " aborted after " in head:
                reasons[why.strip().split(" '")[0]] += 1
    return reasons


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, 90th percentile, max)."""
    ordered = sorted(values)
    return (statistics.median(ordered), ordered[min(len(ordered) - 1, len(ordered) * 9 // 10)],
            ordered[-1])


if __name__ == "__main__":
    sys.exit(main())
