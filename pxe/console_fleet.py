"""`serve --console-log` / ``[console] log = true``: one console logger per IPMI node.

Each logger is its own small process, ``pxe-stage console NODE --log`` (pyghmi's SOL client is
single-threaded, see pxe.console_sol), started and stopped with serve and started again (after
5 s, doubling to 5 min) when it exits. The child reads the BMC password from the secrets file
itself: no password passes through argv, environment or serve's log. At most
``console.max_sessions`` nodes are logged; the others are named once in serve's log.
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
    process: subprocess.Popen | None = None
    started: float = 0.0
    next_start: float = 0.0
    retry: float = FIRST_RETRY


def eligible(cfg: Config) -> tuple[list[str], list[str]]:
    """(nodes whose console can be logged, nodes that cannot: no IPMI BMC or a bad address)."""
    from pxe.inventory import Inventory
    from pxe.power.base import bmc_address_problems

    yes, no = [], []
    for node in Inventory(cfg).all():
        ok = node.bmc_type == "ipmi" and not bmc_address_problems(node)
        (yes if ok else no).append(node.name)
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

    def argv(self, node: str) -> list[str]:
        return [sys.executable, "-m", "pxe.cli.main", "--config", str(self.cfg.path),
                "console", node, "--log"]

    def start(self) -> list[str]:
        """Start a logger per eligible node (up to max_sessions); returns their names."""
        from pxe.nodeset import fold

        nodes, skipped = eligible(self.cfg)
        cap = self.settings.max_sessions
        if len(nodes) > cap:
            log.warning("console logging: %d IPMI nodes, console.max_sessions is %d: %s not "
                        "logged", len(nodes), cap, fold(nodes[cap:]))
            nodes = nodes[:cap]
        if skipped:
            log.info("console logging: no IPMI BMC (or no valid address): %s", fold(skipped))
        log.info("console logging: %d node(s) to %s/console/", len(nodes),
                 self.cfg.paths.state_dir)
        for name in nodes:
            self.loggers[name] = Logger(name)
            self._spawn(self.loggers[name])
        return nodes

    def _spawn(self, lg: Logger) -> None:
        try:
            lg.process = subprocess.Popen(self.argv(lg.node), stdin=subprocess.DEVNULL,
                                          preexec_fn=_die_with_parent)
        except OSError as exc:
            log.error("console logger for %s did not start: %s", lg.node, exc.strerror)
            lg.process = None
        lg.started = time.monotonic()

    def tick(self) -> None:
        """Start again the loggers that exited, each after its own backoff."""
        now = time.monotonic()
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
