"""`serve --console-log` / ``[console] log = true``: one console logger per IPMI node.

Each logger is its own small process, ``pxe-stage console NODE --log`` (pyghmi's SOL client is
single-threaded, see pxe.console_sol), started and stopped with serve and started again (after
5 s, doubling to 5 min) when it exits. The child reads the BMC password from the secrets file
itself: no password passes through argv, environment or serve's log. At most
``console.max_sessions`` nodes are logged; the others are named in serve's log. Every
``console.rescan_seconds`` the inventory is read again: a node added gets its logger, a node
removed (or no longer IPMI) loses it, a node whose BMC settings changed gets a new one.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pxe.config import Config
from pxe.console_settings import ConsoleSettings

log = logging.getLogger("dynprov.serve.console")

FIRST_RETRY = 5.0
MAX_RETRY = 300.0
STABLE = 60.0  # a logger that ran this long starts again after FIRST_RETRY
STOP_GRACE = 5.0
PR_SET_PDEATHSIG = 1


@dataclass
class Logger:
    node: str
    bmc: tuple = ()  # the BMC settings it was started with (address, port, user, secret key)
    process: subprocess.Popen | None = None
    started: float = 0.0
    next_start: float = 0.0
    retry: float = FIRST_RETRY


def eligible(cfg: Config) -> tuple[dict[str, tuple], list[str]]:
    """({node: its BMC settings} for the consoles that can be logged, [nodes that cannot: no
    IPMI BMC or a bad address])."""
    from pxe.inventory import Inventory
    from pxe.power.base import bmc_address_problems

    yes: dict[str, tuple] = {}
    no: list[str] = []
    for node in Inventory(cfg).all():
        if node.bmc_type == "ipmi" and not bmc_address_problems(node):
            yes[node.name] = (node.bmc_address, node.bmc_port, node.bmc_user, node.bmc_secret)
        else:
            no.append(node.name)
    return yes, no


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class ConsoleFleet:
    def __init__(self, cfg: Config, settings: ConsoleSettings):
        self.cfg = cfg
        self.settings = settings
        self.loggers: dict[str, Logger] = {}
        self.next_scan = 0.0
        self.last_count = 0

    def argv(self, node: str) -> list[str]:
        return [sys.executable, "-m", "pxe.cli.main", "--config", str(self.cfg.path),
                "console", node, "--log"]

    def start(self) -> list[str]:
        """Start a logger per eligible node (up to max_sessions); returns their names."""
        names = self.scan(first=True)
        log.info("console logging: %d node(s) to %s/console/", len(names),
                 self.cfg.paths.state_dir)
        return names

    def scan(self, first: bool = False) -> list[str]:
        """Match the loggers to the inventory: start, stop or restart them as nodes changed."""
        from pxe.nodeset import fold

        self.next_scan = time.monotonic() + self.settings.rescan_seconds
        try:
            nodes, skipped = eligible(self.cfg)
        except Exception as exc:  # a locked or broken database: keep what runs, try later
            log.error("console logging: inventory not read: %s", exc)
            return list(self.loggers)
        cap = self.settings.max_sessions
        names = list(nodes)
        if len(names) > cap and (first or len(names) != self.last_count):
            log.warning("console logging: %d IPMI nodes, console.max_sessions is %d: %s not "
                        "logged", len(names), cap, fold(names[cap:]))
        self.last_count = len(names)
        if skipped and first:
            log.info("console logging: no IPMI BMC (or no valid address): %s", fold(skipped))
        wanted = {n: nodes[n] for n in names[:cap]}
        for name in [n for n, lg in self.loggers.items() if wanted.get(n) != lg.bmc]:
            self._retire(self.loggers.pop(name))
            if not first:
                log.info("console logging: %s %s", name,
                         "changed its BMC: logger restarted" if name in wanted else "stopped")
        for name, bmc in wanted.items():
            if name not in self.loggers:
                self.loggers[name] = Logger(name, bmc)
                self._spawn(self.loggers[name])
                if not first:
                    log.info("console logging: %s started", name)
        return list(self.loggers)

    def _retire(self, lg: Logger) -> None:
        if lg.process is not None and lg.process.poll() is None:
            lg.process.terminate()
            try:
                lg.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                lg.process.kill()
                lg.process.wait(5)

    def _spawn(self, lg: Logger) -> None:
        try:
            lg.process = subprocess.Popen(self.argv(lg.node), stdin=subprocess.DEVNULL,
                                          preexec_fn=_die_with_parent)
        except OSError as exc:
            log.error("console logger for %s did not start: %s", lg.node, exc.strerror)
            lg.process = None
        lg.started = time.monotonic()

    def tick(self) -> None:
        """Start again the loggers that exited, each after its own backoff; rescan when due."""
        now = time.monotonic()
        if now >= self.next_scan:
            self.scan()
        for lg in self.loggers.values():
            if lg.process is not None and lg.process.poll() is None:
                continue
            if lg.process is not None:  # it just exited: schedule the restart
                code = lg.process.returncode
                lg.process = None
                lg.retry = FIRST_RETRY if now - lg.started >= STABLE else \
                    min(lg.retry * 2, MAX_RETRY)
                lg.next_start = now + lg.retry
                log.warning("console logger for %s exited (%s); again in %.0f s", lg.node,
                            code, lg.retry)
            elif now >= lg.next_start:
                self._spawn(lg)

    def running(self) -> dict[str, int]:
        return {n: lg.process.pid for n, lg in self.loggers.items()
                if lg.process is not None and lg.process.poll() is None}

    def stop(self) -> None:
        """SIGTERM to each logger (by PID), then SIGKILL what is left after STOP_GRACE."""
        live = [lg.process for lg in self.loggers.values()
                if lg.process is not None and lg.process.poll() is None]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.loggers.clear()
