"""Keep one node's serial-over-LAN session open and write what it shows to its console log.

One node per process (`pxe-stage console NODE --log`; `serve` runs one such process per node):
pyghmi's SOL client keeps its state in class-wide tables and runs callbacks inside its own
event loop, which is safe in one thread and nowhere else.

A session that ends (the BMC closes it, the BMC restarts, the network drops, the node's BMC
is not up yet) is opened again after 1, 2, 4 ... s (at most ``backoff_max``; back to 1 s after a
session that lasted a minute). pyghmi notices a dead BMC only at its keepalive (29 s idle), and
a BMC that closed the SOL payload never at all unless we send; so every ``probe_every`` s we ask
the BMC who owns the SOL payload (Get Payload Instance Info, NetFn 6 cmd 0x4B): an error or
another owner ends the session here, and we reconnect.

The BMC password lives only in this process's memory (never in argv, logs or the console log).
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field

from pxe.console_log import ConsoleLog

LOGIN_LIMIT = 30.0   # s a login plus SOL activation may take before we try again
STABLE = 60.0        # a session that lasted this long resets the backoff


@dataclass(frozen=True)
class SolTarget:
    node: str
    host: str
    port: int
    user: str
    password: str = field(repr=False)


@dataclass
class KeepResult:
    sessions: int = 0     # SOL sessions opened
    attempts: int = 0     # connection attempts made
    last_error: str = ""  # why the last session ended or failed ("" when time ran out)


def keep(target: SolTarget, log: ConsoleLog, *, seconds: float | None = None,
         attempts: int | None = None, backoff_max: float = 10.0, probe_every: float = 5.0,
         stop: threading.Event | None = None) -> KeepResult:
    """Log the node's console until ``seconds`` pass, ``attempts`` failed, or ``stop`` is set."""
    stop = stop or threading.Event()
    end = time.monotonic() + seconds if seconds else None
    result = KeepResult()
    delay = 1.0

    def over() -> bool:
        return stop.is_set() or (end is not None and time.monotonic() >= end)

    for _ in range(10 ** 9):  # bounded by the conditions above (or SIGTERM)
        if over() or (attempts is not None and result.attempts >= attempts):
            break
        result.attempts += 1
        started = time.monotonic()
        error = _session(target, log, result, over, probe_every)
        if error is None:
            break
        result.last_error = error
        if time.monotonic() - started >= STABLE:
            delay = 1.0
        if attempts is not None and result.attempts >= attempts:
            log.note(f"SOL session ended: {error}; giving up after {result.attempts} attempt(s)")
            break
        log.note(f"SOL session ended: {error}; reconnecting in {delay:g} s")
        wait = delay if end is None else max(0.0, min(delay, end - time.monotonic()))
        stop.wait(wait)
        delay = min(delay * 2, backoff_max)
    else:
        result.last_error = "loop bound reached"
    return result


def _session(target: SolTarget, log: ConsoleLog, result: KeepResult, over, probe_every: float
             ) -> str | None:
    """One SOL session: None when time ran out or we were stopped, else why it ended."""
    from pyghmi.ipmi import console as pconsole
    from pyghmi.ipmi.private import session as psession

    errors: list[str] = []

    def show(data: object) -> None:
        if isinstance(data, dict):  # pyghmi reports errors as {'error': ...}
            errors.append(str(data.get("error", data)))
            return
        log.feed(data.encode() if isinstance(data, str) else bytes(data))  # type: ignore[arg-type]

    started = time.monotonic()
    try:
        con = pconsole.Console(bmc=target.host, userid=target.user, password=target.password,
                               iohandler=show, port=target.port, force=True)
    except Exception as exc:  # pyghmi raises what it meets (socket errors, IpmiException)
        return _plain(exc)
    opened = False
    next_probe = time.monotonic() + probe_every
    try:
        for _ in range(10 ** 9):  # bounded: ends on an error, over(), or LOGIN_LIMIT
            psession.Session.wait_for_rsp(0.2)
            if errors:
                return _plain(errors[0])
            if con.connected and not opened:
                opened = True
                result.sessions += 1
                log.note(f"SOL session open ({target.node}, BMC {target.host}:{target.port})")
            log.flush_partial()
            if over():
                return None
            now = time.monotonic()
            if not opened and now - started > LOGIN_LIMIT:
                return f"no SOL session within {LOGIN_LIMIT:g} s"
            if opened and now >= next_probe:
                problem = _probe(con)
                if problem:
                    return problem
                next_probe = time.monotonic() + probe_every
        return "loop bound reached"
    except Exception as exc:
        return _plain(exc)
    finally:
        _close(con)


def _probe(con) -> str | None:
    """Ask the BMC who owns the SOL payload; a reason when it is not us any more."""
    session = con.ipmi_session
    try:
        rsp = session.raw_command(netfn=6, command=0x4B, data=(1, 1))
    except Exception as exc:
        return f"the BMC does not answer ({_plain(exc)})"
    if "error" in rsp:
        return f"the BMC does not answer ({rsp['error']})"
    data = bytes(rsp.get("data") or b"")
    if len(data) < 4 or struct.unpack("<I", data[:4])[0] != session.sessionid:
        return "the BMC closed the SOL session"
    return None


def _close(con) -> None:
    """End the SOL payload and the IPMI session, and make pyghmi forget the session: it keeps
    a logged-out session in ``initting_sessions`` and hands that dead object to the next
    Console for the same BMC, which then waits for a login that never comes."""
    from pyghmi.ipmi.private import session as psession

    session = con.ipmi_session
    for step in (con.close, getattr(session, "logout", None)):
        try:
            if step is not None:
                step()
        except Exception:  # the session may be half dead: closing is best effort
            pass
    for key, value in list(psession.Session.initting_sessions.items()):
        if value is session:
            psession.Session.initting_sessions.pop(key, None)


def _plain(error: object) -> str:
    """pyghmi's error text on one line, never longer than 200 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]
