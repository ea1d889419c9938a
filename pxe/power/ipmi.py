"""IPMI over LAN (lanplus): power, next boot device, and the serial console.

Power and boot device go through ``rmcp.py`` (our own RMCP+ client: every node of a fan-out in
one event loop, see why there). The serial console (``pxe-stage console``) goes through pyghmi's
SOL client: one session, interactive, where pyghmi is at its best. pyghmi is imported only there.

Hardware knowledge that bit other tools, kept here:
- Boot flags (Set System Boot Options, parameter 5), data byte 1: bit 7 "valid", bit 6
  "persistent" (0 = next boot only), bit 5 "EFI boot". Forgetting bit 5 makes a UEFI node boot its
  legacy (CSM) path or ignore the override: "works in legacy, fails in UEFI".
- Many BMCs clear the boot flags 60 s after they are set unless a chassis control follows;
  parameter 3 = 0x08 turns that timer off (Ironic sends the same bytes) - a node may be powered on
  minutes later by someone else. Some BMCs reject parameter 3: that is not an error. ``netboot``
  does not send it: its chassis control follows in the same session, milliseconds later (the timer
  only runs until a chassis control starts the restart), and one round trip less a node is what
  a fan-out of 1,000 costs (docs/bench/os_switch-power-profile.txt).
- Chassis control "cycle" (and "reset") on a node that is off is refused (0xD5) by most BMCs, so
  cycle and netboot read the power state first and power on instead.
- A chassis control is never sent twice blindly: a second copy of "cycle" cycles the node again
  (nothing in IPMI makes a BMC drop a duplicate). Its request is not retransmitted; when its
  answer is lost the attempt times out, and the next attempt reads the power state first: "on" /
  "off" already reached is success; a "cycle" or "reset" whose answer was lost is not repeated
  (at most once: the node's power state cannot tell whether it happened, and a node that did not
  boot is caught by the run's watch), see ``after_lost_answer``.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pxe.config import Config
from pxe.errors import InputError
from pxe.inventory import Node
from pxe.power import rmcp
from pxe.power.base import Job, PowerError, PowerResult, bmc_address_problems, boot_action
from pxe.power.rmcp import Action, Request, Response, check
from pxe.power.settings import Settings

DEFAULT_PORT = 623
BOOT_SELECTOR = {"network": 0x1, "disk": 0x2}  # "force PXE", "force default hard disk"
CONTROL = {"off": 0x0, "on": 0x1, "cycle": 0x2, "reset": 0x3, "soft-off": 0x5}


# -- actions: generators that yield IPMI requests and get the responses back ----------------------
def status() -> Action:
    resp = check((yield Request(0x00, 0x01)), "get chassis status")
    if not resp.data:
        raise rmcp.IpmiFailure("error", "get chassis status: empty answer")
    return "on" if resp.data[0] & 0x01 else "off"


@dataclass
class Unanswered:
    """The chassis control an earlier attempt sent whose answer never came (shared by the
    attempts of one node in one call)."""

    command: str | None = None


def after_lost_answer(command: str, power: str) -> str | None:
    """What an unanswered ``command`` achieved, judged by the power state read now; None: it
    did not happen, send it again."""
    if command in ("on", "off") and power == command:
        return command
    if command == "soft-off" and power == "off":
        return "soft-off sent"
    if command in ("cycle", "reset"):  # never twice: see the module's notes
        done = "cycled" if command == "cycle" else "reset"
        return f"{done} (its answer was lost; not sent twice)"
    return None


def chassis(command: str, sent: Unanswered) -> Action:
    sent.command = command
    resp = yield Request(0x00, 0x02, bytes([CONTROL[command]]), changes=True, resend=False)
    sent.command = None
    check(resp, f"chassis control {command}")
    return {"cycle": "cycled", "soft-off": "soft-off sent", "on": "on", "off": "off",
            "reset": "reset"}[command]


def control(state: str, sent: Unanswered | None = None) -> Action:
    sent = sent if sent is not None else Unanswered()
    current = None
    if sent.command is not None:  # an earlier attempt's chassis control lost its answer
        current = yield from status()
        done = after_lost_answer(sent.command, current)
        if done is not None:
            lost, sent.command = sent.command, None
            return "on (was off)" if lost == "on" and state == "cycle" else done
    if state in ("cycle", "reset"):
        if current is None:
            current = yield from status()
        if current == "off":
            if state == "reset":
                raise rmcp.IpmiFailure("error", "reset: the node is off (reset needs a running "
                                                "node; use 'on')")
            yield from chassis("on", sent)
            return "on (was off)"
    return (yield from chassis(state, sent))


def set_boot(device: str, persistent: bool, uefi: bool, keep: bool = True) -> Action:
    """``keep``: switch the BMC's 60 s expiry of the flags off first (see above); False when a
    chassis control follows at once (netboot)."""
    if keep:
        resp: Response = yield Request(0x00, 0x08, b"\x03\x08", changes=True)
        if resp.code not in (0x00, 0x80, 0xC1, 0xCC):
            check(resp, "set boot flag valid-bit clearing")
    flags = 0x80 | (0x40 if persistent else 0) | (0x20 if uefi else 0)
    data = bytes([0x05, flags, BOOT_SELECTOR[device] << 2, 0, 0, 0])
    check((yield Request(0x00, 0x08, data, changes=True)), f"set boot device {device}")
    mode = " (UEFI)" if uefi else ""
    return f"{device}{mode}, {'persistent' if persistent else 'next boot only'}"


def netboot(uefi: bool, sent: Unanswered | None = None) -> Action:
    sent = sent if sent is not None else Unanswered()
    if sent.command is None:  # the flags were set by the attempt that sent the control
        yield from set_boot("network", False, uefi, keep=False)  # the control follows at once
    done = yield from control("cycle", sent)
    return f"next boot network; {done}"


def action_for(action: str, node: Node) -> tuple[Callable[[], Action], int]:
    """The generator factory and the privilege level an action needs."""
    uefi = node.firmware == "uefi"
    sent = Unanswered()  # one per node and call: what a timed-out attempt may have done
    if action == "status":
        return status, rmcp.PRIV_USER
    if action in CONTROL:
        return (lambda: control(action, sent)), rmcp.PRIV_OPERATOR
    if action == "netboot":
        return (lambda: netboot(uefi, sent)), rmcp.PRIV_OPERATOR
    boot = boot_action(action)
    if boot:
        device, persistent = boot
        return (lambda: set_boot(device, persistent, uefi)), rmcp.PRIV_OPERATOR
    raise InputError(f"IPMI: unknown action {action!r}")


class IpmiDriver:
    name = "ipmi"

    def validate(self, node: Node, settings: Settings) -> list[str]:
        problems = bmc_address_problems(node)
        if len((node.bmc_user or "").encode()) > 16:
            problems.append("bmc_user longer than 16 bytes (IPMI limit)")
        return problems

    def run_many(self, jobs: Sequence[Job], action: str, settings: Settings,
                 done: Callable[[PowerResult], None],
                 cancelled: threading.Event | None = None) -> None:
        if cancelled is None and jobs:
            cancelled = jobs[0].cancelled
        targets = []
        for job in jobs:
            if len((job.secret or "").encode()) > 20:
                done(PowerResult(job.node.name, False, kind="auth",
                                 error="the BMC password is longer than 20 bytes (IPMI 2.0 limit)"))
                continue
            factory, privilege = action_for(action, job.node)
            targets.append(rmcp.Target(
                key=job.node.name, host=job.node.bmc_address or "",
                port=job.node.bmc_port or DEFAULT_PORT, user=job.node.bmc_user or "",
                password=job.secret or "", action=factory, privilege=privilege))

        def finished(o: rmcp.Outcome) -> None:
            done(PowerResult(o.key, o.ok, value=o.value, error=o.error, kind=o.kind))

        rmcp.Engine(timeout=settings.timeout, retries=settings.retries,
                    window=settings.ipmi_sessions, suite=settings.ipmi_cipher_suite,
                    done=finished, cancelled=cancelled).run(targets)

    # -- per-node forms of the same (PowerInterface / BootInterface) ----------------------------
    def _one(self, job: Job, action: str, settings: Settings) -> str:
        out: list[PowerResult] = []
        self.run_many([job], action, settings, out.append)
        result = out[0]
        if not result.ok:
            raise PowerError(result.kind or "error", result.error or "failed")
        return result.value or ""

    def get_power_state(self, job: Job, settings: Settings) -> str:
        return self._one(job, "status", settings)

    def set_power_state(self, job: Job, state: str, settings: Settings) -> str:
        return self._one(job, state, settings)

    def netboot(self, job: Job, settings: Settings) -> str:
        return self._one(job, "netboot", settings)

    def set_next_boot(self, job: Job, device: str, persistent: bool, settings: Settings) -> str:
        suffix = "-persistent" if persistent else ""
        return self._one(job, f"boot-{device}{suffix}", settings)

    # -- ConsoleInterface: serial over LAN through pyghmi -----------------------------------------
    def attach(self, job: Job, settings: Settings, *, seconds: float | None = None) -> int:
        """Serial-over-LAN on this terminal until '~.' at the start of a line, or ``seconds``."""
        from pyghmi.ipmi import console as pconsole
        from pyghmi.ipmi.private import session as psession

        node = job.node
        errors: list[str] = []
        out = sys.stdout.buffer

        def show(data: object) -> None:
            if isinstance(data, dict):  # pyghmi reports errors as {'error': ...}
                errors.append(str(data.get("error", data)))
                return
            out.write(data.encode() if isinstance(data, str) else bytes(data))  # type: ignore
            out.flush()

        con = pconsole.Console(bmc=node.bmc_address, userid=node.bmc_user or "",
                               password=job.secret or "", iohandler=show,
                               port=node.bmc_port or DEFAULT_PORT, force=True)
        restore = _raw_terminal()
        fd = sys.stdin.fileno()
        print(f"[console {node.name}: '~.' at the start of a line quits]\r", file=sys.stderr)
        end = time.monotonic() + seconds if seconds else None
        line_start, tilde, stdin_open = True, False, True
        try:
            for _ in range(10 ** 9):  # bounded; ends on '~.', end of input plus seconds, or error
                psession.Session.wait_for_rsp(0.05)
                if errors:
                    raise PowerError("error", f"console {node.name}: {errors[0]}")
                if end is not None and time.monotonic() >= end:
                    break
                if not stdin_open or not select.select([fd], [], [], 0)[0]:
                    continue
                data = os.read(fd, 1024)
                if not data:
                    stdin_open = False
                    if end is None:
                        break
                    continue
                send = bytearray()
                quit_now = False
                for byte in data:
                    if tilde:
                        tilde = False
                        if byte == ord("."):
                            quit_now = True
                            break
                        send.append(ord("~"))
                    if line_start and byte == ord("~"):
                        tilde = True
                        continue
                    send.append(byte)
                    line_start = byte in (10, 13)
                if send:
                    con.send_data(bytes(send))
                if quit_now:
                    break
        finally:
            restore()
            con.close()
        return 0


def keep_console_log(cfg: Config, job: Job, *, seconds: float | None = None,
                     attempts: int | None = None) -> int:
    """`pxe-stage console NODE --log`: the node's SOL session into its console log until
    ``seconds``, ``attempts`` or SIGTERM/SIGINT (see pxe.console_sol). Exit status: 0 when a
    session was open at some point and we stopped on time or on a signal, else 1."""
    import signal

    from pxe import console_log, console_settings, console_sol

    node = job.node
    settings = console_settings.load(cfg)
    path = console_log.log_path(cfg.paths.state_dir, node.name)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    target = console_sol.SolTarget(node.name, node.bmc_address or "",
                                   node.bmc_port or DEFAULT_PORT, node.bmc_user or "",
                                   job.secret or "")
    try:
        with console_log.ConsoleLog(path, max_bytes=settings.max_bytes,
                                    rotations=settings.rotations) as log:
            print(f"console {node.name}: logging to {path}", file=sys.stderr, flush=True)
            result = console_sol.keep(target, log, seconds=seconds, attempts=attempts,
                                      backoff_max=settings.backoff_max, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = (f"console {node.name}: {result.sessions} SOL session(s) in "
               f"{result.attempts} attempt(s)")
    given_up = attempts is not None and result.attempts >= attempts and not stop.is_set()
    if result.sessions == 0 or given_up:
        raise PowerError("error", f"{summary}; last: {result.last_error or 'no session'}")
    print(summary, file=sys.stderr)
    return 0


def _raw_terminal() -> Callable[[], None]:
    """Put a terminal stdin in raw mode (keys go to the node); returns the undo."""
    if not sys.stdin.isatty():
        return lambda: None
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)
