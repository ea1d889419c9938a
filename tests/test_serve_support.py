"""Helpers for the serve tests (no tests here): a TFTP worker in a thread, `pxe-stage serve` as a
real process, a raw TFTP client on a UDP socket, metrics parsing. All traffic on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lab.ports import free_port
from pxe.serve import metrics, settings, tftp
from pxe.serve.bootconfigs import BootConfigs

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def serve_section(site: Any, **values: Any) -> None:
    """Append a [serve] section to the site's config."""
    lines = ["", "[serve]"]
    for key, value in values.items():
        text = (str(value).lower() if isinstance(value, bool)
                else f'"{value}"' if isinstance(value, str) else str(value))
        lines.append(f"{key} = {text}")
    with open(site.config_path, "a") as fh:
        fh.write("\n".join(lines) + "\n")


def put(root: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


# -- a TFTP worker in a thread -------------------------------------------------------------------
@dataclass
class ThreadServer:
    port: int
    worker: tftp.Worker
    counters: metrics.Counters

    def count(self, name: str, *labels: str) -> int:
        self.worker.flush()
        return self.counters.total(metrics.slot(name, *labels))

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no transfer is active (bounded)."""
        deadline = time.monotonic() + timeout
        while self.worker.transfers and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not self.worker.transfers, "transfers still active"


@contextlib.contextmanager
def tftp_thread(site: Any, **overrides: Any) -> Iterator[ThreadServer]:
    """One TFTP worker on 127.0.0.1:<ephemeral> serving the site's TFTP root, in a thread."""
    cfg = site.cfg
    cfg.paths.tftp_root.mkdir(parents=True, exist_ok=True)
    s = settings.load(cfg, tftp_address=LOOPBACK, **overrides)
    sock = tftp.bind(LOOPBACK, 0)
    counters = metrics.Counters(1)
    worker = tftp.Worker(sock, str(cfg.paths.tftp_root), s,
                         threading.BoundedSemaphore(s.max_transfers), counters.row(0),
                         configs=BootConfigs(cfg))  # as the daemon's workers
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield ThreadServer(sock.getsockname()[1], worker, counters)
    finally:
        stop.set()
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "TFTP worker did not stop"


# -- a raw TFTP client -------------------------------------------------------------------------
class RawClient:
    """TFTP spoken by hand on one UDP socket, to send what real clients never would."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.server = (LOOPBACK, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(timeout)
        self.tid: tuple[str, int] | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, name: str, opcode: int = 1, mode: str = "octet",
                **options: str | int) -> None:
        parts = [name.encode(), mode.encode()]
        for key, value in options.items():
            parts += [key.encode(), str(value).encode()]
        self.sock.sendto(struct.pack("!H", opcode) + b"".join(p + b"\0" for p in parts),
                         self.server)

    def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        """(opcode, rest) of the next packet; remembers the server's transfer port."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        data, addr = self.sock.recvfrom(70000)
        self.tid = addr
        return struct.unpack("!H", data[:2])[0], data[2:]

    def nothing_within(self, seconds: float) -> bool:
        """True if no packet arrives within ``seconds``."""
        try:
            self.recv(seconds)
        except TimeoutError:
            return True
        return False

    def ack(self, block: int) -> None:
        assert self.tid is not None
        self.sock.sendto(struct.pack("!HH", 4, block & 0xFFFF), self.tid)

    def finish(self, acked: int) -> bytes:
        """Lock-step from block ``acked`` + 1 to the end (blksize 512): the rest of the file."""
        rest = bytearray()
        self.ack(acked)
        for block in range(acked + 1, acked + 100_000):
            payload = self.recv()[1][2:]
            rest += payload
            self.ack(block)
            if len(payload) < 512:
                return bytes(rest)
        raise AssertionError("transfer did not end")

    def send_to_tid(self, data: bytes) -> None:
        assert self.tid is not None
        self.sock.sendto(data, self.tid)

    def download(self, name: str, **options: str | int) -> tuple[bytes, dict[str, str]]:
        """A whole read (lock-step or windowed): (content, options the server acknowledged)."""
        self.request(name, **options)
        blksize, window = 512, 1
        opcode, rest = self.recv()
        acked: dict[str, str] = {}
        if opcode == 6:
            parts = rest.split(b"\0")[:-1]
            acked = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}
            blksize = int(acked.get("blksize", 512))
            window = int(acked.get("windowsize", 1))
            self.ack(0)
            opcode, rest = self.recv()
        data = bytearray()
        expect = 1
        received_in_window = 0
        deadline = time.monotonic() + 300
        for _ in range(1_000_000):  # packets; the largest test file has ~70,000 blocks
            assert time.monotonic() < deadline, "transfer took too long"
            if opcode == 5:
                raise TftpError(struct.unpack("!H", rest[:2])[0], rest[2:].rstrip(b"\0").decode())
            assert opcode == 3, f"unexpected opcode {opcode}"
            block = struct.unpack("!H", rest[:2])[0]
            payload = rest[2:]
            if block == expect & 0xFFFF:
                data += payload
                expect += 1
                received_in_window += 1
                last = len(payload) < blksize
                if last or received_in_window == window:
                    self.ack(expect - 1)
                    received_in_window = 0
                if last:
                    return bytes(data), acked
            opcode, rest = self.recv()
        raise AssertionError("transfer did not end")


class TftpError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code


# -- real clients -------------------------------------------------------------------------------
def curl_tftp(port: int, name: str, out: Path, blksize: int | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    argv = ["curl", "-s", "-S", "--max-time", str(int(timeout)), "-o", str(out)]
    if blksize:
        argv += ["--tftp-blksize", str(blksize)]
    return subprocess.run([*argv, f"tftp://{LOOPBACK}:{port}/{name}"], capture_output=True,
                          text=True, timeout=timeout + 10)


# -- `pxe-stage serve` as a process --------------------------------------------------------------
@dataclass
class ServeProcess:
    proc: subprocess.Popen
    tftp_port: int
    http_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
    return out


def wait_for(check: Any, what: str, timeout: float = 30.0, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / every) + 1):
        with contextlib.suppress(Exception):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            break
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


@contextlib.contextmanager
def serve_process(site: Any, *extra: str, **config: Any) -> Iterator[ServeProcess]:
    """`pxe-stage serve` on 127.0.0.1 with fresh ports; stopped (SIGTERM, by PID) at the end."""
    tftp_port, http_port = free_port(), free_port()
    serve_section(site, tftp_address=LOOPBACK, tftp_port=tftp_port, http_address=LOOPBACK,
                  http_port=http_port, **config)
    log = site.root / f"serve-{tftp_port}.log"
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pxe.cli.main", "serve", *extra],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = ServeProcess(proc, tftp_port, http_port, log)
    try:
        if "--no-http" not in extra:
            wait_for(lambda: proc.poll() is None and httpx.get(
                f"{server.url}/healthz", timeout=2).status_code == 200, "serve /healthz")
        yield server
    finally:
        kids = children_of(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in kids:  # only if the supervisor failed to stop its own workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; checks the HELP/TYPE lines come first."""
    out: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        assert key.split("{")[0] in typed, f"{key} has no # TYPE line"
        out[key] = float(value)
    return out
