"""A lean IPMI 2.0 (RMCP+, "lanplus") client: hundreds of BMC sessions at once in one thread.

Why not pyghmi's client (measured here, see ``../shared/facts.md`` and ``tools/bench_power.py``):
in one process it loses logins under concurrent threads, stalls after a few hundred sessions, and
cannot log in again to a BMC it logged out of (TypeError). Power control needs only a handful of
commands, so this module speaks them itself, the way FreeIPMI's ``ipmipower`` does: one non-blocking
UDP socket per session, every session a small state machine, one ``selectors`` loop and a timer
heap for all of them. pyghmi stays the tool for the interactive console (``ipmi.py``).

Session set-up (IPMI 2.0 section 13): Get Channel Authentication Capabilities -> RMCP+ Open Session
-> RAKP 1/2 (the BMC proves it knows the password) -> RAKP 3/4 (we prove it) -> commands, each
HMAC-authenticated and AES-CBC-128 encrypted -> Close Session. Cipher suite 3 (HMAC-SHA1,
HMAC-SHA1-96, AES-CBC-128) or 17 (HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128).

An action is a generator (see ``ipmi.py``): it yields ``Request``s and receives ``Response``s, so
"read the power state, then cycle or power on" is plain Python. Timeouts and retries:
- within an attempt, a lost packet is sent again after ``retransmit`` s (doubling, at most 1 s);
- an attempt that does not finish within ``timeout`` s, or that the network refuses (ICMP
  unreachable on the connected socket), is retried from scratch on a new socket, ``retries`` times;
- a wrong password, an unknown user or a refused command is final at once - except a RAKP2
  that fails its check after we resent Open Session or RAKP1 (or says "invalid session ID"):
  that can be a BMC that answered another copy of our request, so it gets one fresh session;
- a chassis control (``Request.resend`` False) is never retransmitted: a second copy can cycle
  a node twice. Its attempt waits out the timeout, and the action reads the state first in the
  next attempt (``ipmi.py``). Nothing that changes a node is sent once ``cancelled`` is set.
The password is only ever used as an HMAC key in this process; it is never logged.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import heapq
import hmac
import itertools
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

RMCP = b"\x06\x00\xff\x07"
PT_IPMI, PT_OPEN_RQ, PT_OPEN_RS, PT_RAKP1, PT_RAKP2, PT_RAKP3, PT_RAKP4 = (
    0x00, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15)
BMC_ADDR, CONSOLE_SWID = 0x20, 0x81
PRIV_USER, PRIV_OPERATOR, PRIV_ADMIN = 2, 3, 4
NAME_ONLY_LOOKUP = 0x10

# RMCP+ / RAKP status codes (IPMI 2.0 table 13-15) a user may meet.
RMCPP_STATUS = {
    0x01: "insufficient resources to create a session", 0x02: "invalid session ID",
    0x04: "invalid authentication algorithm", 0x05: "invalid integrity algorithm",
    0x09: "unauthorized role or privilege level requested", 0x0D: "unauthorized user name",
    0x11: "no cipher suite matches the proposed security algorithms",
    0x12: "illegal or unrecognized parameter",
}
# Completion codes (IPMI 2.0 table 5-2).
COMPLETION = {
    0xC0: "node busy", 0xC1: "invalid command", 0xC3: "timeout while processing",
    0xC9: "parameter out of range", 0xCC: "invalid data field",
    0xD4: "insufficient privilege", 0xD5: "not supported in the present state",
    0x80: "parameter not supported", 0xFF: "unspecified error",
}


@dataclass(frozen=True)
class Suite:
    number: int
    algorithms: tuple[int, int, int]  # authentication, integrity, confidentiality
    hash: Callable[..., Any]
    icv_len: int  # integrity check value length (RAKP4 and every session packet)

    def mac(self, key: bytes, data: bytes) -> bytes:
        """HMAC in one C call (hmac.new + digest costs 3 Python objects a packet)."""
        return hmac.digest(key, data, self.hash)


SUITES = {
    3: Suite(3, (1, 1, 1), hashlib.sha1, 12),      # RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128
    17: Suite(17, (3, 4, 1), hashlib.sha256, 16),  # RAKP-HMAC-SHA256, HMAC-SHA256-128, AES
}


@dataclass(frozen=True)
class Request:
    """One IPMI request of an action. ``changes``: it changes the node (boot flags, power), so
    it is never sent once the call is cancelled. ``resend``: a lost answer may be asked for by
    sending it again; False for chassis control, where a second copy can cycle a node twice -
    the attempt then waits out its timeout and the action reads the state before deciding."""

    netfn: int
    command: int
    data: bytes = b""
    changes: bool = False
    resend: bool = True


@dataclass(frozen=True)
class Response:
    code: int  # completion code, 0 = success
    data: bytes


class IpmiFailure(Exception):
    """A final, classified failure: ``kind`` is one of PowerResult's kinds."""

    def __init__(self, kind: str, message: str, retryable: bool = False,
                 fresh_once: bool = False):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.fresh_once = fresh_once  # may be an artefact of a lost packet: one fresh session


def describe_code(code: int) -> str:
    return f"completion code 0x{code:02x} ({COMPLETION.get(code, 'unknown')})"


def check(resp: Response, what: str) -> Response:
    """Raise for a non-zero completion code, with a kind a user can act on."""
    if resp.code == 0:
        return resp
    kind = {0xC1: "unsupported", 0x80: "unsupported", 0xD4: "auth"}.get(resp.code, "error")
    raise IpmiFailure(kind, f"{what}: BMC answered {describe_code(resp.code)}")


Action = Generator[Request, Response, str]


@dataclass
class Target:
    """One BMC to act on. ``action`` builds a fresh generator for every attempt."""

    key: str
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    action: Callable[[], Action]
    privilege: int = PRIV_OPERATOR


@dataclass(frozen=True)
class Outcome:
    key: str
    ok: bool
    value: str | None = None
    kind: str | None = None
    error: str | None = None


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def ipmi_message(netfn: int, command: int, seq: int, data: bytes = b"") -> bytes:
    head = bytes([BMC_ADDR, netfn << 2])
    body = bytes([CONSOLE_SWID, (seq & 0x3F) << 2, command]) + data
    return head + bytes([_checksum(head)]) + body + bytes([_checksum(body)])


def parse_ipmi_response(msg: bytes) -> tuple[int, int, int, Response] | None:
    """(netfn, seq, command, response) of a BMC reply, or None if it is not well formed."""
    if len(msg) < 8 or _checksum(msg[:2]) != msg[2] or _checksum(msg[3:-1]) != msg[-1]:
        return None
    netfn = msg[1] >> 2
    seq = msg[4] >> 2
    return netfn, seq, msg[5], Response(msg[6], bytes(msg[7:-1]))


def auth_capabilities_request(seq: int) -> bytes:
    # IPMI 1.5 session-less wrapper; 0x8E = channel "this one", ask for IPMI 2.0 data; 0x04 admin.
    msg = ipmi_message(0x06, 0x38, seq, b"\x8e\x04")
    return RMCP + b"\x00" + b"\x00" * 8 + bytes([len(msg)]) + msg


class _Aes:
    """AES-CBC-128 with the IPMI pad (1, 2, 3, ... n, n). cryptography is imported on first use.

    CBC is chained here over one AES block context per direction, made once a session: building
    a CBC cipher object for every packet (its IV is new each time) cost about 40 us of checks a
    packet, most of a node's client CPU in a fan-out of 1,000 (os_switch-power-profile.txt).
    Each block is one AES call either way; c[i] = E(p[i] ^ c[i-1]), p[i] = D(c[i]) ^ c[i-1]."""

    _mod: Any = None

    def __init__(self, key: bytes):
        if _Aes._mod is None:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

            _Aes._mod = (Cipher, algorithms, modes)
        cipher, algorithms, modes = _Aes._mod
        block = cipher(algorithms.AES(key), modes.ECB())
        self.encryptor = block.encryptor()  # whole blocks in, whole blocks out: reusable
        self.decryptor = block.decryptor()

    def encrypt(self, plain: bytes) -> bytes:
        pad = (16 - (len(plain) + 1) % 16) % 16
        data = plain + bytes(range(1, pad + 1)) + bytes([pad])
        iv = os.urandom(16)
        out = [iv]
        prev = int.from_bytes(iv, "big")
        for i in range(0, len(data), 16):
            block = self.encryptor.update(
                (int.from_bytes(data[i:i + 16], "big") ^ prev).to_bytes(16, "big"))
            out.append(block)
            prev = int.from_bytes(block, "big")
        return b"".join(out)

    def decrypt(self, blob: bytes) -> bytes | None:
        if len(blob) < 32 or len(blob) % 16:
            return None
        n = len(blob) - 16
        # All blocks through AES at once, then each XORed with the block before it (the IV first).
        mixed = int.from_bytes(self.decryptor.update(blob[16:]), "big") ^ int.from_bytes(
            blob[:-16], "big")
        plain = mixed.to_bytes(n, "big")
        pad = plain[-1]
        if pad + 1 > len(plain):
            return None
        return plain[:-(pad + 1)]


class Session:
    """One attempt's state machine for one target (owned and driven by ``Engine``)."""

    def __init__(self, engine: Engine, target: Target, attempt: int):
        self.engine = engine
        self.t = target
        self.attempt = attempt
        self.suite = engine.suite
        self.sock: socket.socket | None = None
        self.state = "new"
        self.heard = False  # any valid packet from the BMC in this attempt
        self.login_resent = False  # Open Session or RAKP1 went out more than once
        self.token = 0  # invalidates older timer-heap entries
        self.resend: Callable[[], None] | None = None
        self.retx = engine.retransmit
        self.deadline = 0.0
        self.sidm = os.urandom(4)  # our session id (the BMC puts it in its packets)
        self.sidc = b"\x00" * 4  # the BMC's session id
        self.tag = 0
        self.seq_out = 0
        self.rq_seq = 0
        self.rm = b""
        self.rc = b""
        self.guid = b""
        self.role = 0
        self.k1 = b""
        self.aes: _Aes | None = None
        self.gen: Action | None = None
        self.pending: Request | None = None
        self.internal = False  # the pending request is ours (privilege, close), not the action's
        self.sik = b""
        self.value: str | None = None
        self.reported = False

    # -- sending ------------------------------------------------------------------------------
    def _send(self, packet: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.send(packet)
        except OSError as exc:
            self.engine.network_error(self, exc)

    def _presession(self, ptype: int, payload: bytes) -> bytes:
        return (RMCP + bytes([0x06, ptype]) + b"\x00" * 8 + struct.pack("<H", len(payload))
                + payload)

    def _secure(self, payload: bytes) -> bytes:
        assert self.aes is not None
        self.seq_out = (self.seq_out + 1) & 0xFFFFFFFF or 1
        enc = self.aes.encrypt(payload)
        body = (bytes([0x06, 0xC0 | PT_IPMI]) + self.sidc + struct.pack("<I", self.seq_out)
                + struct.pack("<H", len(enc)) + enc)
        pad = (4 - (len(body) + 2) % 4) % 4
        body += b"\xff" * pad + bytes([pad, 0x07])
        icv = self.suite.mac(self.k1, body)[:self.suite.icv_len]
        return RMCP + body + icv

    def _transmit(self, build: Callable[[], bytes]) -> None:
        """Send now, and again on every retransmit timer until the state moves on."""

        def send() -> None:
            self.engine.counts["sent"] += 1
            self._send(build())

        self.resend = send
        self.retx = self.engine.retransmit
        send()
        self.engine.arm(self, min(self.deadline, time.monotonic() + self.retx))

    # -- the protocol, in order -----------------------------------------------------------------
    def start(self) -> None:
        self.deadline = time.monotonic() + self.engine.timeout
        family = socket.AF_INET6 if ":" in self.t.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        try:
            self.sock.connect((self.t.host, self.t.port))  # connected: ICMP errors come back
        except OSError as exc:
            self.engine.network_error(self, exc)
            return
        self.engine.register(self)
        self.state = "caps"
        self._transmit(lambda: auth_capabilities_request(self.engine.next_seq()))

    def _open_session(self) -> None:
        self.state = "open"
        self.tag = (self.tag + 1) & 0xFF
        auth, integrity, conf = self.suite.algorithms
        payload = (bytes([self.tag, 0, 0, 0]) + self.sidm
                   + bytes([0, 0, 0, 8, auth, 0, 0, 0, 1, 0, 0, 8, integrity, 0, 0, 0,
                            2, 0, 0, 8, conf, 0, 0, 0]))
        self._transmit(lambda: self._presession(PT_OPEN_RQ, payload))

    def _rakp1(self) -> None:
        self.state = "rakp2"
        self.tag = (self.tag + 1) & 0xFF
        self.rm = os.urandom(16)
        self.role = self.t.privilege | NAME_ONLY_LOOKUP
        user = self.t.user.encode()
        payload = (bytes([self.tag, 0, 0, 0]) + self.sidc + self.rm
                   + bytes([self.role, 0, 0, len(user)]) + user)
        self._transmit(lambda: self._presession(PT_RAKP1, payload))

    def _got_rakp2(self, p: bytes) -> None:
        hlen = self.suite.hash().digest_size
        if len(p) < 8 or p[0] != self.tag or p[4:8] != self.sidm:
            return
        if p[1] != 0:
            if self.state == "rakp4":
                return  # a late answer to a resent RAKP1; the one we used was good
            raise IpmiFailure("auth", f"login refused: {RMCPP_STATUS.get(p[1], 'RAKP status')} "
                                      f"(0x{p[1]:02x})", fresh_once=p[1] == 0x02)
        if len(p) < 40 + hlen:
            return
        rc, guid, code = p[8:24], p[24:40], p[40:40 + hlen]
        user = self.t.user.encode()
        kuid = self.t.password.encode()
        expect = self.suite.mac(kuid, self.sidm + self.sidc + self.rm + rc + guid
                                + bytes([self.role, len(user)]) + user)
        if not hmac.compare_digest(expect, code):
            if self.state == "rakp4":
                return  # a stray late RAKP2; the one we already checked stands
            # After a resend, a BMC may have signed this RAKP2 for another session id or random
            # number than the ones we hold (a slow BMC that opened a session per copy of our
            # request): that is a lost-packet artefact, not a wrong password. One fresh session
            # tells the two apart; a second mismatch is final.
            raise IpmiFailure("auth", "authentication failed: wrong password for user "
                                      f"{self.t.user!r} (RAKP2 check)",
                              fresh_once=self.login_resent)
        self.rc, self.guid, self.heard = rc, guid, True
        sik = self.suite.mac(kuid, self.rm + rc + bytes([self.role, len(user)]) + user)
        self.sik = sik
        # K1, K2: the constants are 20 bytes for every suite (ipmitool, FreeIPMI, OpenBMC).
        self.k1 = self.suite.mac(sik, b"\x01" * 20)
        self.aes = _Aes(self.suite.mac(sik, b"\x02" * 20)[:16])
        code3 = self.suite.mac(kuid, rc + self.sidm + bytes([self.role, len(user)]) + user)
        payload = bytes([self.tag, 0, 0, 0]) + self.sidc + code3
        self.state = "rakp4"  # a late RAKP2 (our RAKP1 was sent twice) is accepted again here
        self._transmit(lambda: self._presession(PT_RAKP3, payload))

    def _got_rakp4(self, p: bytes) -> None:
        if len(p) < 8 + self.suite.icv_len or p[0] != self.tag or p[4:8] != self.sidm:
            return
        if p[1] != 0:
            raise IpmiFailure("auth", f"login refused at RAKP4: "
                                      f"{RMCPP_STATUS.get(p[1], 'RAKP status')} (0x{p[1]:02x})")
        icv = self.suite.mac(self.sik, self.rm + self.sidc + self.guid)[:self.suite.icv_len]
        if not hmac.compare_digest(icv, p[8:8 + self.suite.icv_len]):
            # After a resent RAKP1 this RAKP4 may answer the RAKP3 of the other RAKP2 (another
            # random number, other keys): one fresh session, as for RAKP2 above.
            raise IpmiFailure("auth", "authentication failed: the BMC's RAKP4 check is wrong "
                                      "(a BMC key, Kg, is set?)", fresh_once=self.login_resent)
        self.state = "session"
        if self.t.privilege > PRIV_USER:
            self._command(Request(0x06, 0x3B, bytes([self.t.privilege])), internal=True)
        else:
            self._step(None)

    def _command(self, req: Request, internal: bool = False) -> None:
        if req.changes and self.engine.cancelled.is_set():
            raise IpmiFailure("timeout", "cancelled: the call's time limit was reached before "
                                         "this node was changed; nothing was sent")
        self.pending = req
        self.internal = internal
        self.rq_seq = (self.rq_seq + 1) & 0x3F
        seq = self.rq_seq
        self._transmit(lambda: self._secure(ipmi_message(req.netfn, req.command, seq, req.data)))

    def _step(self, resp: Response | None) -> None:
        """Feed the action generator; on its return, report and close the session."""
        try:
            if self.gen is None:
                self.gen = self.t.action()
                req = next(self.gen)
            else:
                assert resp is not None
                req = self.gen.send(resp)
        except StopIteration as stop:
            self.value = stop.value
            self.engine.report(self, Outcome(self.t.key, True, value=stop.value))
            self._close_session()
            return
        self._command(req)

    def _close_session(self) -> None:
        self.state = "closing"
        self.deadline = min(self.deadline, time.monotonic() + self.engine.close_timeout)
        self._command(Request(0x06, 0x3C, self.sidc), internal=True)

    # -- receiving -------------------------------------------------------------------------------
    def receive(self, pkt: bytes) -> None:
        if len(pkt) < 14 or pkt[:4] != RMCP:
            return
        if pkt[4] == 0x00:  # IPMI 1.5 wrapper: only the session-less capabilities answer
            if self.state == "caps" and len(pkt) > 14:
                parsed = parse_ipmi_response(pkt[14:14 + pkt[13]])
                if parsed and parsed[2] == 0x38:
                    self.heard = True
                    self._open_session()
            return
        if pkt[4] != 0x06 or len(pkt) < 16:
            return
        ptype = pkt[5] & 0x3F
        length = struct.unpack("<H", pkt[14:16])[0]
        payload = pkt[16:16 + length]
        if ptype == PT_OPEN_RS and self.state == "open":
            self._got_open(payload)
        elif ptype == PT_RAKP2 and self.state in ("rakp2", "rakp4"):
            self._got_rakp2(payload)
        elif ptype == PT_RAKP4 and self.state == "rakp4":
            self._got_rakp4(payload)
        elif ptype == PT_IPMI and self.state in ("session", "closing"):
            self._got_message(pkt)

    def _got_open(self, p: bytes) -> None:
        if len(p) < 8 or p[0] != self.tag or p[4:8] != self.sidm:
            return
        if p[1] != 0:
            self.heard = True
            kind = "auth" if p[1] in (0x09, 0x0D) else "unsupported"
            raise IpmiFailure(kind, f"BMC refused the session (cipher suite {self.suite.number}):"
                                    f" {RMCPP_STATUS.get(p[1], 'RMCP+ status')} (0x{p[1]:02x})")
        if len(p) < 12:
            return
        self.sidc = p[8:12]
        self.heard = True
        self._rakp1()

    def _got_message(self, pkt: bytes) -> None:
        if not pkt[5] & 0x40 or self.aes is None:  # unauthenticated: not from our session
            return
        n = self.suite.icv_len
        body, icv = pkt[4:-n], pkt[-n:]
        if not hmac.compare_digest(self.suite.mac(self.k1, body)[:n], icv):
            return
        if pkt[6:10] != self.sidm:
            return
        length = struct.unpack("<H", pkt[14:16])[0]
        payload = pkt[16:16 + length]
        msg = self.aes.decrypt(payload) if pkt[5] & 0x80 else payload
        parsed = parse_ipmi_response(msg) if msg else None
        req = self.pending
        if parsed is None or req is None:
            return
        netfn, seq, command, resp = parsed
        if seq != self.rq_seq or command != req.command or netfn != req.netfn + 1:
            return  # a late answer to an earlier request
        self.pending = None
        if self.state == "closing":
            self.engine.finish(self)
        elif self.internal:  # the privilege level is set: start the action
            if resp.code in (0x80, 0x81, 0x82, 0x83):
                raise IpmiFailure("auth", f"user {self.t.user!r} may not act at operator "
                                          f"level on this BMC ({describe_code(resp.code)})")
            check(resp, "set session privilege level")
            self._step(None)
        else:
            self._step(resp)

    def timer(self, now: float) -> None:
        if now >= self.deadline:
            if self.state == "closing":
                self.engine.finish(self)  # the answer is known; an unanswered close is no failure
                return
            what = "no answer" if not self.heard else f"no answer in state {self.state}"
            raise IpmiFailure("timeout", f"{what} from BMC {self.t.host}:{self.t.port} within "
                                         f"{self.engine.timeout:g} s", retryable=True)
        if self.pending is not None and not self.pending.resend:
            self.engine.arm(self, self.deadline)  # wait for the answer; never send it twice
            return
        if self.resend is not None:
            self.login_resent = self.login_resent or self.state in ("open", "rakp2")
            self.engine.counts["resent"] += 1
            self.resend()
            self.retx = min(self.retx * 2, 1.0)
            self.engine.arm(self, min(self.deadline, now + self.retx))

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
        if self.sock is not None:
            self.engine.unregister(self)
            self.sock.close()
            self.sock = None


def _socket_budget(wanted: int) -> int:
    """How many sockets we may open at once: raise the soft fd limit if needed, keep a margin."""
    import resource

    margin = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + margin:
        target = wanted + margin if hard == resource.RLIM_INFINITY else min(hard, wanted + margin)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - margin))


class Engine:
    """Runs Targets concurrently (at most ``window`` sessions in flight) until each has an outcome.

    ``done(outcome)`` is called once per target, in this thread, as soon as its answer is known.
    """

    def __init__(self, *, timeout: float, retries: int, window: int,
                 done: Callable[[Outcome], None], suite: int = 3,
                 cancelled: threading.Event | None = None):
        self.timeout = timeout
        self.retries = retries
        self.window = max(1, window)
        self.done = done
        self.suite = SUITES[suite]
        self.cancelled = cancelled or threading.Event()  # set: send nothing that changes a node
        self.retransmit = min(max(timeout / 8, 0.05), 1.0)
        self.close_timeout = min(timeout, 1.0)
        self.backoff = min(max(timeout / 4, 0.05), 1.0)
        self.sel = selectors.DefaultSelector()
        self.heap: list[tuple[float, int, int, Session]] = []
        self.counter = itertools.count()
        self._seq = 0
        self.active: set[Session] = set()
        self.waiting: list[tuple[float, Target, int]] = []  # (not before, target, attempt)
        self.refreshed: set[str] = set()  # targets that had their one fresh-session retry
        # What the run cost on the wire (tools/profile_power_cycle.py): datagrams sent (resends
        # included), resends, datagrams received, sessions started (attempts).
        self.counts = {"sent": 0, "resent": 0, "received": 0, "sessions": 0}

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x3F
        return self._seq

    def arm(self, s: Session, when: float) -> None:
        s.token += 1
        heapq.heappush(self.heap, (when, next(self.counter), s.token, s))

    def register(self, s: Session) -> None:
        assert s.sock is not None
        self.sel.register(s.sock, selectors.EVENT_READ, s)

    def unregister(self, s: Session) -> None:
        assert s.sock is not None
        try:
            self.sel.unregister(s.sock)
        except (KeyError, ValueError):
            pass

    def report(self, s: Session, outcome: Outcome) -> None:
        if not s.reported:
            s.reported = True
            self.done(outcome)

    def finish(self, s: Session) -> None:
        s.token += 1  # no more timers
        s.close()
        self.active.discard(s)

    def network_error(self, s: Session, exc: OSError) -> None:
        reason = {errno.ECONNREFUSED: "nothing listens there (ICMP port unreachable)",
                  errno.EHOSTUNREACH: "no route to the host", errno.ENETUNREACH:
                  "network unreachable"}.get(exc.errno or 0, exc.strerror or str(exc))
        if s.state == "closing":
            self.finish(s)
            return
        raise IpmiFailure("unreachable", f"BMC {s.t.host}:{s.t.port} unreachable: {reason}",
                          retryable=True)

    def _fail(self, s: Session, failure: IpmiFailure) -> None:
        self.finish(s)
        if s.reported:
            return
        if failure.retryable and s.attempt < self.retries:
            self.waiting.append((time.monotonic() + self.backoff, s.t, s.attempt + 1))
            return
        if failure.fresh_once and s.t.key not in self.refreshed:
            self.refreshed.add(s.t.key)
            self.waiting.append((time.monotonic() + self.backoff, s.t, s.attempt + 1))
            return
        tries = f" ({s.attempt + 1} attempts)" if s.attempt else ""
        self.report(s, Outcome(s.t.key, False, kind=failure.kind, error=str(failure) + tries))

    def _guard(self, s: Session, fn: Callable[[], None]) -> None:
        try:
            fn()
        except IpmiFailure as failure:
            self._fail(s, failure)
        except Exception as exc:  # a bug or a malformed packet must not stop the other nodes
            self._fail(s, IpmiFailure("error", f"{type(exc).__name__}: {exc}"))

    def _launch(self, target: Target, attempt: int) -> None:
        self.counts["sessions"] += 1
        s = Session(self, target, attempt)
        self.active.add(s)
        self._guard(s, s.start)

    def run(self, targets: Iterable[Target]) -> None:
        queue = list(targets)
        queue.reverse()
        total = len(queue)
        if not total:
            return
        self.window = min(self.window, _socket_budget(min(self.window, total)))
        # The whole call is bounded: every target has at most (retries + 1) attempts of
        # ``timeout`` plus back-off, and at most ``window`` run at once.
        rounds = -(-total // self.window)
        # (retries + 2): one more for a login that may have met a lost packet (``fresh_once``).
        limit = time.monotonic() + rounds * (self.retries + 2) * (self.timeout + self.backoff) + 5
        for _ in range(100 * total * (self.retries + 2) + 10_000):
            now = time.monotonic()
            if now > limit or self.cancelled.is_set():
                break
            ready = [w for w in self.waiting if w[0] <= now]
            if ready:
                self.waiting = [w for w in self.waiting if w[0] > now]
                for _, target, attempt in ready:
                    self._launch(target, attempt)
            while queue and len(self.active) + len(self.waiting) < self.window:
                self._launch(queue.pop(), 0)
            if not self.active and not self.waiting and not queue:
                break
            wake = [w[0] for w in self.waiting]
            if self.heap:
                wake.append(self.heap[0][0])
            wait = max(0.0, min(wake) - now) if wake else 0.05
            for key, _ in self.sel.select(min(wait, 1.0)):
                s = key.data
                self._drain(s)
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                _, _, token, s = heapq.heappop(self.heap)
                if token == s.token and s in self.active:
                    self._guard(s, functools.partial(s.timer, now))
        for s in list(self.active):  # only reached if the time limit hit: report, never hang
            self._fail(s, IpmiFailure("timeout", "gave up: the call's time limit was reached"))
        for target in [w[1] for w in self.waiting] + queue:
            self.done(Outcome(target.key, False, kind="timeout", error="gave up: the call's time "
                                                                       "limit was reached"))
        self.sel.close()

    def _drain(self, s: Session) -> None:
        """One datagram per readiness event. The selector is level-triggered (it reports the
        socket again while more is queued) and a session has one request in flight, so reading
        on until EAGAIN cost a system call and an exception per packet, and a flood from one
        peer cannot starve the others."""
        if s.sock is None:
            return
        try:
            pkt = s.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._guard(s, functools.partial(self.network_error, s, exc))
            return
        self.counts["received"] += 1
        self._guard(s, functools.partial(s.receive, pkt))
