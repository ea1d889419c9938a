"""`pxe-stage serve`: bind the sockets, fork the workers, keep them running, stop them cleanly.

Process model (2 cores here, more on a real server):
- the supervisor (this process) binds the TFTP (UDP) and HTTP (TCP) sockets first, so a port
  that is taken is one clear error before anything starts, and a client that arrives while the
  workers start simply waits in the socket's queue;
- `tftp_workers` processes, each with its own epoll loop and its own TFTP socket on the one
  port (SO_REUSEPORT: the kernel sends each client's datagrams to one worker, pxe.serve.tftp);
- `http_workers` processes run uvicorn on the shared HTTP socket (boot files answered by
  pxe.serve.fastpath before the framework);
- counters live in shared memory (pxe.serve.metrics), the transfer cap is a shared semaphore.
A worker that dies is started again (its transfer slots are given back); more than
MAX_RESTARTS deaths in RESTART_WINDOW seconds stop the daemon with exit status 1. SIGTERM or
SIGINT stops every worker (by PID) and exits 0. Workers get SIGTERM if the supervisor dies.
With console logging on (`--console-log`, ``[console] log``), the supervisor also keeps one
console logger process per IPMI node (pxe.console_fleet), started and stopped with the workers.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pxe import segments
from pxe.config import Config
from pxe.console_fleet import ConsoleFleet
from pxe.console_settings import ConsoleSettings
from pxe.errors import DynprovError
from pxe.segments import SegmentSettings
from pxe.serve import metrics, tftp
from pxe.serve.heartbeat import Heartbeat
from pxe.serve.settings import ServeSettings

log = logging.getLogger("dynprov.serve")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
STOP_GRACE = 10.0
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_ctx = multiprocessing.get_context("fork")


@dataclass
class Worker:
    name: str
    row: int
    target: Callable[[int], None]
    process: Any = None


def _child_setup(parent: int, name: str) -> None:
    """In a child: named for ps/top, and SIGTERM when the supervisor dies (now, if it has)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def listen_tcp(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say TCP;
    # with Nagle on, a keep-alive response written as header + body waits ~40 ms for the
    # client's delayed ACK (every small boot file, every iPXE script).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def _sd_notify(text: str) -> None:
    """Tell systemd (Type=notify) that we are ready; nothing if not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(text.encode(), path)
    except OSError as exc:
        log.debug("sd_notify: %s", exc)


class Daemon:
    def __init__(self, cfg: Config, settings: ServeSettings,
                 consoles: ConsoleSettings | None = None,
                 segment: SegmentSettings | None = None):
        self.cfg = cfg
        self.s = settings
        self.fleet = ConsoleFleet(cfg, consoles) if consoles is not None and consoles.log \
            else None
        self.segment = segment or segments.load(cfg)
        self.beat = Heartbeat(cfg, self.segment)
        self.parent = os.getpid()
        self.tftp_socks: list[socket.socket] = []  # one per TFTP worker, by row
        self.http_sock: socket.socket | None = None
        n_tftp = settings.tftp_workers if settings.tftp else 0
        n_http = settings.http_workers if settings.http else 0
        self.counters = metrics.Counters(n_tftp + n_http)
        self.slots = _ctx.Semaphore(settings.max_transfers)
        self.tftp_rows = tuple(range(n_tftp))
        self.workers = [Worker(f"tftp-{i}", i, self._tftp_child) for i in range(n_tftp)]
        self.workers += [Worker(f"http-{j}", n_tftp + j, self._http_child) for j in range(n_http)]
        self.stop = threading.Event()
        self.deaths: deque[float] = deque()

    # -- children ---------------------------------------------------------------------------
    def _tftp_child(self, row: int) -> None:
        if self.http_sock is not None:
            self.http_sock.close()  # not ours to serve
        for r, sock in enumerate(self.tftp_socks):
            if r != row:
                sock.close()  # the other workers' clients
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

        from pxe.serve.bootconfigs import BootConfigs

        worker = tftp.Worker(self.tftp_socks[row], str(self.cfg.paths.tftp_root), self.s,
                             self.slots, self.counters.row(row), configs=BootConfigs(self.cfg))
        worker.run(stop)

    def _http_child(self, row: int) -> None:
        from collections import Counter

        import uvicorn

        from pxe.serve.app import create_app
        from pxe.serve.deadlines import guarded
        from pxe.serve.fastpath import BootFiles, fast_protocol
        from pxe.serve.http import ZeroCopyH11Protocol

        for sock in self.tftp_socks:
            sock.close()  # not ours to serve
        app = create_app(self.cfg, self.s, self.counters, row, self.tftp_rows)
        s = self.s
        open_per_client: Counter[str] = Counter()  # one cap over both protocols
        framework = guarded(ZeroCopyH11Protocol, s.http_timeout, s.http_timeout,
                            s.http_max_per_client, open_per_client)
        # Boot files by pxe.serve.fastpath; every other request goes on to uvicorn + Starlette.
        protocol = fast_protocol(framework, BootFiles(app), s.http_timeout,
                                 s.http_max_per_client, open_per_client, s.access_log)
        config = uvicorn.Config(
            app, http=protocol, ws="none", lifespan="off", loop="asyncio",
            log_config=None, access_log=self.s.access_log, server_header=False,
            timeout_keep_alive=max(1, round(self.s.http_timeout)),
            timeout_graceful_shutdown=max(1, round(STOP_GRACE / 2)))
        assert self.http_sock is not None
        uvicorn.Server(config).run(sockets=[self.http_sock])

    def _start(self, w: Worker) -> None:
        def main() -> None:
            _child_setup(self.parent, f"dynprov-{w.name}")
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            w.target(w.row)

        self.counters.row(w.row).restart()
        w.process = _ctx.Process(target=main, name=f"dynprov-{w.name}", daemon=False)
        w.process.start()

    def _reap(self, w: Worker) -> None:
        """A worker died: give back the transfer slots it held."""
        row = self.counters.row(w.row)
        if w.row in self.tftp_rows:
            held = row.load()[metrics.slot("dynprov_tftp_active_transfers")]
            for _ in range(max(0, held)):
                self.slots.release()
        row.restart()

    # -- supervisor -----------------------------------------------------------------------
    def bind(self) -> None:
        s = self.s
        what, address, port = "TFTP", s.tftp_address, s.tftp_port
        try:
            if s.tftp:
                self.tftp_socks = tftp.bind_workers(s.tftp_address, s.tftp_port,
                                                    len(self.tftp_rows))
            what, address, port = "HTTP", s.http_address, s.http_port
            if s.http:
                self.http_sock = listen_tcp(s.http_address, s.http_port)
        except OSError as exc:
            self.close()
            raise DynprovError(f"cannot listen for {what} on {address}:{port}: "
                               f"{exc.strerror or exc}") from None

    def close(self) -> None:
        for sock in (*self.tftp_socks, self.http_sock):
            if sock is not None:
                sock.close()

    def run(self) -> int:
        for root in (self.cfg.paths.tftp_root, self.cfg.paths.http_root):
            root.mkdir(parents=True, exist_ok=True)
        self.bind()
        handlers = {sig: signal.signal(sig, lambda *_: self.stop.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for w in self.workers:
                self._start(w)
            parts = []
            if self.s.tftp:
                parts.append(f"TFTP on {self.s.tftp_address}:{self.s.tftp_port} "
                             f"({self.s.tftp_workers} workers, root {self.cfg.paths.tftp_root})")
            if self.s.http:
                parts.append(f"HTTP on {self.s.http_address}:{self.s.http_port} "
                             f"({self.s.http_workers} workers, root {self.cfg.paths.http_root})")
            if self.segment.name:
                parts.append(f"segment {self.segment.name}")
            log.info("serving %s", "; ".join(parts))
            if self.fleet is not None:
                self.fleet.start()
            _sd_notify("READY=1")
            return self._supervise()
        finally:
            self._stop_all()
            self.beat.stop()
            for sig, old in handlers.items():
                signal.signal(sig, old)
            self.close()

    def _supervise(self) -> int:
        while not self.stop.is_set():
            self.beat.maybe()  # heartbeat, the watch over other segments (pxe.serve.heartbeat)
            sentinels = [w.process.sentinel for w in self.workers]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            if self.fleet is not None and not self.stop.is_set():
                self.fleet.tick()
            for w in self.workers:
                if w.process.is_alive() or self.stop.is_set():
                    continue
                code = w.process.exitcode
                w.process.join()
                self._reap(w)
                now = time.monotonic()
                self.deaths.append(now)
                while self.deaths and now - self.deaths[0] > RESTART_WINDOW:
                    self.deaths.popleft()
                if len(self.deaths) > MAX_RESTARTS:
                    log.error("worker %s died (exit %s); %d deaths in %.0f s: giving up",
                              w.name, code, len(self.deaths), RESTART_WINDOW)
                    return 1
                log.error("worker %s died (exit %s); starting it again", w.name, code)
                self._start(w)
        log.info("stopping")
        return 0

    def _stop_all(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        live = [w.process for w in self.workers if w.process is not None]
        for p in live:
            if p.is_alive():
                p.terminate()  # SIGTERM to that PID
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in live:
            if p.is_alive():
                log.warning("worker %s did not stop; killing it", p.name)
                p.kill()
                p.join(5)


def run(cfg: Config, settings: ServeSettings, consoles: ConsoleSettings | None = None,
        segment: SegmentSettings | None = None) -> int:
    return Daemon(cfg, settings, consoles, segment).run()
