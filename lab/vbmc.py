"""A virtual IPMI BMC: real IPMI 2.0 / RMCP+ over UDP, driving a ``Machine``.

Built on pyghmi's server-side ``Bmc`` with two faults of pyghmi 1.6.19 fixed (see
``../shared/facts.md``):

1. Cipher suites. pyghmi's *client* first proposes suite 17 (SHA-256); the stock server says yes
   but signs with SHA-1, and the client dies in RAKP2 (``struct.error``). ``_Session`` answers any
   proposal it does not implement (by default: anything but suite 3, HMAC-SHA1 / HMAC-SHA1-96 /
   AES-CBC-128) with RMCP+ status 0x11 ("no cipher suite match"); pyghmi's client then retries
   with SHA-1 by itself, and ipmitool asks for a suite Get Channel Cipher Suites lists.
2. A packet for a session that was just replaced reached ``ServerSession.sessionless_data``
   (which does not exist), raised AttributeError and ended the server loop. ``_Session`` hands
   such packets to its Bmc.
3. A resent Open Session Request got a new session id, so the client's RAKP2 check failed with
   the right password under load ("wrong password (RAKP2 check)"); see
   ``create_open_session_response``.
4. Each BMC socket's blocking mode was flipped per call by two threads, which left the I/O
   thread blocked on one socket and the whole process deaf; see ``quiet_io``.

Also, beyond stock pyghmi: RAKP is done here for suite 3 and, when asked for
(``cipher_suites=(3, 17)``), suite 17 (HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128), so clients can
be tested on both; an unknown user name gets RAKP2 status 0x0D (unauthorized name) instead
of silence; the boot-flags parameter (5) is parsed in full (valid, persistent and EFI bits are kept
and reported back by Get System Boot Options); a closed session is forgotten; ``drop_first`` makes
the BMC ignore its first N datagrams (a BMC that is slow to wake up) and ``Faults`` adds others
(crossed logins, lost chassis-control answers, SOL sessions closed by the BMC); every change is
appended to a JSON-lines journal so a test can see what the BMC side observed.

Serial over LAN: the node's serial output (a Machine's ``serial_path``: QEMU's serial log in the
lab, ``--serial-dir DIR/NAME.log`` for simulated nodes) is followed into the SOL session while one
is attached (``tick``, between packets of the event loop), live from the moment of attaching as on
real BMCs; SOL can be attached while the node is off (to watch it power on); Get Payload Instance
Info (0x4B, which pyghmi's client sends as its keepalive) is answered; and SOL packets carry at
most 255 bytes (pyghmi's client acks the count in one byte and fails on 256).

Several BMCs share one process and one pyghmi event loop (one UDP port each); ``main()`` (the
``python3 -m lab.vbmc`` launcher) can also fork several such processes for a load target. ``VbmcProcess``
starts the launcher as a child process for tests and tools. The password is read from a file and
is never on a command line.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.machine import Machine, SimulatedMachine

# Cipher suites: (authentication, integrity, confidentiality) algorithm numbers, and the record
# Get Channel Cipher Suites lists for each (IPMI 2.0 table 22-19).
SUITE_OF = {(1, 1, 1): 3, (3, 4, 1): 17}
SUITE_RECORDS = {3: b"\xc0\x03\x01\x41\x81", 17: b"\xc0\x11\x03\x44\x81"}
# IPMI boot-flags parameter (5), data byte 1 and the device selector in byte 2 (bits 5:2).
FLAG_VALID, FLAG_PERSISTENT, FLAG_EFI = 0x80, 0x40, 0x20
DEVICE_CODES = {1: "network", 2: "disk"}  # 0001b force PXE, 0010b force default hard disk
CC_NOT_IN_STATE = 0xD5  # "command not supported in present state" (cycle/reset while off)
CROSS_PAUSE = 0.5  # s a crossed login waits before answering (clients resend meanwhile)
SERIAL_CHUNK = 2048  # serial bytes put into SOL per tick (pyghmi sends 256-byte packets, each acked)
TICK = 0.1  # s between ticks of the event loop (serial into SOL)


def _size(path: Path | None) -> int:
    try:
        return os.stat(path).st_size if path is not None else 0
    except OSError:
        return 0


def tick_all(bmcs: Sequence[Any]) -> None:
    """One tick of every BMC of the loop (serial into SOL, SOL faults); never raises."""
    for bmc in bmcs:
        try:
            bmc.tick()
        except Exception:
            traceback.print_exc(limit=3)


@dataclass(frozen=True)
class Faults:
    """Faults a BMC shows on purpose, for the client's tests (each BMC counts its own).

    ``cross_logins``: the first N logins are answered late (CROSS_PAUSE) and then handled as
    stock pyghmi did - every resent Open Session Request gets a new session id - so the client
    meets a RAKP2 signed for another session id (its "wrong password" under load).
    ``lose_control_answers``: the first N chassis controls are carried out, their answers lost.
    ``sol_close_after``: every SOL session is closed by the BMC this many seconds after it opened
    (a BMC reset, another admin taking the console): the client must notice and reconnect.
    """

    cross_logins: int = 0
    lose_control_answers: int = 0
    sol_close_after: float = 0.0  # > 0: the BMC closes every SOL session after this many seconds


class Journal:
    """Appends one JSON object per line; one write(2) per line, so processes may share a file."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if path else None

    def write(self, **record: Any) -> None:
        if self._fd is None:
            return
        line = json.dumps({"t": round(time.time(), 6), **record}, sort_keys=True) + "\n"
        os.write(self._fd, line.encode())


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _io_sendto(sock: Any, packet: bytes, sockaddr: Any) -> None:
    """pyghmi's ``_io_sendto`` without its ``setblocking(1)``: see ``quiet_io``."""
    sock = getattr(sock, "fd", sock)
    for _ in range(50):  # bounded: a full send buffer on loopback drains in microseconds
        try:
            sock.sendto(packet, socket.MSG_DONTWAIT, sockaddr)
            return
        except BlockingIOError:
            select.select([], [sock], [], 0.01)
        except OSError:
            return  # as pyghmi: a send error is a lost datagram, never a dead server loop


def _io_recvfrom(sock: Any, size: int) -> tuple[bytes, Any] | None:
    """pyghmi's ``_io_recvfrom`` without its ``setblocking(0)``: see ``quiet_io``."""
    try:
        return sock.recvfrom(size, socket.MSG_DONTWAIT)
    except OSError:
        return None


def quiet_io() -> None:
    """Stop pyghmi's server I/O from going deaf (a whole vbmc process, >15 s).

    pyghmi shares each BMC's UDP socket between two threads and flips its blocking mode per call:
    the main thread's ``_io_sendto`` does ``setblocking(1)`` before each answer, the I/O thread's
    ``_io_recvfrom`` does ``setblocking(0)`` before each read and drains every socket until a read
    fails. When the flip to blocking lands between the I/O thread's ``setblocking(0)`` and its
    ``recvfrom``, that last "until empty" read blocks until a datagram arrives for *that one* BMC
    - which, once its node is done, may be never - and every other BMC of the process is deaf
    meanwhile. Reproduced with 256 BMCs in 2 processes (one process lost 44 nodes at once).
    Here no call changes a socket's mode: each call says non-blocking itself (MSG_DONTWAIT)."""
    import pyghmi.ipmi.private.session as ipmisession

    ipmisession._io_sendto = _io_sendto
    ipmisession._io_recvfrom = _io_recvfrom


def _build_classes() -> tuple[type, type]:
    """Import pyghmi lazily (and only here): the classes need its server modules."""
    import pyghmi.ipmi.bmc as pbmc
    import pyghmi.ipmi.private.serversession as serversession
    import pyghmi.ipmi.private.session as ipmisession

    class _Session(serversession.ServerSession):
        """pyghmi's server session with its RAKP done here, for suite 3 and (optionally) 17."""

        bmc: Any  # the VirtualBmc below
        kg: bytes | None
        crossed = False  # behave as stock pyghmi at login (VirtualBmc.cross_logins)
        open_request: bytes | None = None
        open_answer = bytearray()

        def create_open_session_response(self, request: bytearray) -> bytearray:
            # Fix 1: answer only what we implement; anything else gets 0x11 ("no cipher suite
            # match") instead of a yes followed by SHA-1 signatures, and the client falls back.
            # Fix 3 (the "wrong password (RAKP2 check)" under load): pyghmi gave every Open
            # Session Request a new managed session id, a retransmitted one too, and keeps one
            # session per client address. A client that resent its request while the BMC was
            # slow took the first answer's id into RAKP1, but the BMC had since switched to the
            # last id and signed RAKP2 with that: the client's check failed although the
            # password was right. A repeated request now gets the same answer (the same id), and
            # RAKP1 must name this session's id (below). ``crossed`` keeps pyghmi's behaviour
            # for the tests of the client's retry.
            request = bytearray(request)
            if bytes(request) == self.open_request and not self.crossed:
                return bytearray(self.open_answer)
            self.open_request = bytes(request)
            proposal = (request[12] & 0x3F, request[20] & 0x3F, request[28] & 0x3F)
            suite = SUITE_OF.get(proposal)
            self.clientsessionid = request[4:8]
            self.managedsessionid = os.urandom(4)
            self.Rc = None
            if suite not in self.bmc.cipher_suites:
                self.open_answer = bytearray([request[0], 0x11, 0, 0]) + request[4:8]
                return bytearray(self.open_answer)
            self.currhashlib = hashlib.sha1 if suite == 3 else hashlib.sha256
            self.currhashlen = 12 if suite == 3 else 16  # HMAC-SHA1-96 / HMAC-SHA256-128
            self.privlevel = 4
            auth, integrity, conf = proposal
            self.open_answer = (bytearray([request[0], 0, self.privlevel, 0])
                                + self.clientsessionid + self.managedsessionid
                                + bytearray([0, 0, 0, 8, auth, 0, 0, 0, 1, 0, 0, 8, integrity,
                                             0, 0, 0, 2, 0, 0, 8, conf, 0, 0, 0]))
            return bytearray(self.open_answer)

        def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
            # Fix 2: a packet routed to a replaced session belongs to the BMC's session-less path.
            self.bmc.sessionless_data(data, sockaddr)

        def _handle_ipmi_packet(self, data: bytearray, sockaddr: Any = None,
                                qent: Any = None) -> Any:
            if self.bmc.should_drop():
                return None
            return super()._handle_ipmi_packet(data, sockaddr=sockaddr, qent=qent)

        def _mac(self, key: bytes, data: bytes) -> bytes:
            return hmac.new(key, data, self.currhashlib).digest()

        def _got_rakp1(self, data: bytearray) -> None:
            # As pyghmi's, with the suite's hash; an unknown user gets RAKP2 status 0x0D
            # (unauthorized name), as real BMCs answer, instead of silence. A RAKP1 for another
            # session id gets 0x02 (invalid session id); a resent RAKP1 (same random number)
            # gets the same RAKP2, so RAKP3 matches whichever copy the client used.
            if bytes(data[4:8]) != bytes(self.managedsessionid) and not self.crossed:
                reply = bytearray([data[0], 0x02, 0, 0]) + self.clientsessionid
                self.send_payload(reply, 0x13, retry=False)
                return
            resent = bytes(data[8:24]) == getattr(self, "Rm", None) and self.Rc is not None
            self.Rm = bytes(data[8:24])
            self.rolem = data[24]
            self.maxpriv = self.rolem & 0b111
            self.username = bytes(data[28:28 + data[27]])
            password = self.authdata.get(self.username.decode("utf-8", "replace"))
            if not data[27] or password is None:
                self.bmc.journal.write(bmc=self.bmc.name, event="login-refused")
                reply = bytearray([data[0], 0x0D, 0, 0]) + self.clientsessionid
                self.send_payload(reply, 0x13, retry=False)
                return
            self.uuiddata = self.uuid.bytes
            if not resent or self.crossed:
                self.Rc = os.urandom(16)
            self.kuid = password.encode("utf-8")
            if self.kg is None:
                self.kg = self.kuid
            code = self._mac(self.kuid, bytes(self.clientsessionid + self.managedsessionid)
                             + self.Rm + self.Rc + self.uuiddata
                             + bytes([self.rolem, len(self.username)]) + self.username)
            reply = (bytearray([data[0], 0, 0, 0]) + self.clientsessionid + self.Rc
                     + self.uuiddata + code)
            self.send_payload(reply, 0x13, retry=False)

        def _got_rakp3(self, data: bytearray) -> None:
            if self.kg is None or getattr(self, "kuid", None) is None:
                return  # no good RAKP1 yet: nothing to check against
            who = bytes([self.rolem, len(self.username)]) + self.username
            self.sik = self._mac(self.kg, self.Rm + self.Rc + who)
            self.k1 = self._mac(self.sik, b"\x01" * 20)  # 20-byte constants for every suite
            self.k2 = self._mac(self.sik, b"\x02" * 20)
            self.aeskey = self.k2[:16]
            expect = self._mac(self.kuid, self.Rc + bytes(self.clientsessionid) + who)
            if data[1] != 0 or not hmac.compare_digest(expect, bytes(data[8:])):
                return  # as pyghmi: a bad RAKP3 is dropped and the client times out
            self.localsid = struct.unpack("<I", bytes(self.managedsessionid))[0]
            self.ipmicallback = self.handle_client_request
            self._send_rakp4(data[0], 0)

        def _send_rakp4(self, tagvalue: int, statuscode: int) -> None:
            icv = self._mac(self.sik, self.Rm + bytes(self.managedsessionid) + self.uuiddata)
            payload = (bytearray([tagvalue, statuscode, 0, 0]) + self.clientsessionid
                       + icv[:self.currhashlen])
            self.send_payload(payload, 0x15, retry=False)
            self.confalgo = "aes"
            self.integrityalgo = "sha1" if self.currhashlib is hashlib.sha1 else "sha256"
            self.sequencenumber = 1
            self.sessionid = struct.unpack("<I", bytes(self.clientsessionid))[0]

        def close_server_session(self) -> None:
            handlers = ipmisession.Session.bmc_handlers.get(self.sockaddr)
            if handlers is not None:
                handlers.pop(self.bmc.port, None)
                if not handlers:
                    ipmisession.Session.bmc_handlers.pop(self.sockaddr, None)

    class VirtualBmc(VirtualBmcBase, pbmc.Bmc):
        def __init__(self, name: str, machine: Machine, user: str, password: str, port: int,
                     address: str = "127.0.0.1", drop_first: int = 0,
                     journal: Journal | None = None, cipher_suites: Sequence[int] = (3,),
                     faults: Faults | None = None):
            VirtualBmcBase.__init__(self, name, machine, drop_first, journal or Journal(None))
            pbmc.Bmc.__init__(self, {user: password}, port=port, address=address)
            self.cipher_suites = tuple(cipher_suites)
            faults = faults or Faults()
            self.cross_logins = faults.cross_logins
            self.lose_control_answers = faults.lose_control_answers
            self.sol_close_after = faults.sol_close_after
            self.sol_owner = 0  # the session id that activated SOL (Get Payload Instance Info)
            self.sol_opened = 0.0
            self.serial_offset = 0

        def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
            if request["netfn"] == 6 and request["command"] == 0x54:  # inside a session too
                records = b"".join(SUITE_RECORDS[n] for n in self.cipher_suites)
                session.send_ipmi_response(data=list(b"\x01" + records))
                return
            if request["netfn"] == 6 and request["command"] == 0x4B:
                self.get_payload_instance_info(session)
                return
            super().handle_raw_request(request, session)

        def send_cipher_suites(self, myaddr: int, mylun: int, clientaddr: int, clientlun: int,
                               clientseq: int, data: Any, sockaddr: Any) -> None:
            """Get Channel Cipher Suites: the records of the suites this BMC speaks."""
            records = b"".join(SUITE_RECORDS[n] for n in self.cipher_suites)
            head = bytes([clientaddr, clientlun | (7 << 2)])
            body = bytes([myaddr, mylun | clientseq << 2, 0x54, 0x00, 0x01]) + records
            msg = head + bytes([_checksum(head)]) + body + bytes([_checksum(body)])
            packet = (b"\x06\x00\xff\x07\x06\x00" + b"\x00" * 8 + struct.pack("<H", len(msg))
                      + msg)
            ipmisession._io_sendto(self.serversocket, packet, sockaddr)

        def activate_payload(self, request: dict[str, Any], session: Any) -> None:
            had = self.sol
            # Where the serial file ends before the client hears "activated": what the node
            # writes after that answer must reach SOL (the answer can go out well before this
            # process runs again on a busy machine).
            live_from = _size(self.serial_path())
            super().activate_payload(request, session)
            if self.sol is not None and self.sol is not had:
                # pyghmi's server sends up to 256 bytes a packet; its client acks the count in
                # one byte (bytearray((0, seq, count, 0))) and dies on 256: 255 at most.
                self.sol.maxoutcount = 255
                self.sol_owner = session.localsid
                self.sol_opened = time.monotonic()
                self.serial_offset = live_from  # live from the activation, as real SOL
                self._event("console-attached")
                self.sol.send_data(f"[{self.name} serial console]\r\n")

        def deactivate_payload(self, request: dict[str, Any], session: Any) -> None:
            super().deactivate_payload(request, session)
            if self.sol is None:
                self.sol_owner = 0

        def serial_path(self) -> Path | None:
            return getattr(self.machine, "serial_path", None)

        def tick(self) -> None:
            """Called by the event loop between packets: the node's serial output into SOL
            (at most SERIAL_CHUNK bytes a call, one SOL packet in flight), and the SOL fault."""
            if self.sol is None or not self.activated:
                return
            if self.sol_close_after and time.monotonic() - self.sol_opened >= self.sol_close_after:
                self.sol, self.activated, self.sol_owner = None, False, 0
                self._event("console-closed", reason="fault: sol_close_after")
                return
            path = self.serial_path()
            if path is None or self.sol.awaitingack:
                return
            size = _size(path)
            if size < self.serial_offset:  # the file was replaced
                self.serial_offset = 0
            if size == self.serial_offset:
                return
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.serial_offset)
                    data = fh.read(SERIAL_CHUNK)
            except OSError:
                return
            self.serial_offset += len(data)
            self.sol.send_data(data)

        def get_payload_instance_info(self, session: Any) -> None:
            """NetFn 6 cmd 0x4B: who owns SOL instance 1 (0 = nobody); pyghmi's client asks it
            at its keepalive, and stock pyghmi's server did not answer it (0xC1)."""
            owner = self.sol_owner if self.activated and self.sol is not None else 0
            session.send_ipmi_response(data=list(struct.pack("<I", owner)) + [0] * 8)

        def iohandler(self, data: Any) -> None:
            """Serial over LAN: what the admin types. A running simulated node echoes it."""
            text = data.decode("utf-8", "replace") if isinstance(data, bytes | bytearray) \
                else str(data)
            self.journal.write(bmc=self.name, event="console-input", data=text)
            if self.sol is not None:
                self.sol.send_data(text)

        def is_active(self) -> bool:
            return True  # a BMC's SOL works while the host is off: the admin sees it power on

        def control_chassis(self, request: dict[str, Any], session: Any) -> None:
            if self.lose_control_answers <= 0:
                super().control_chassis(request, session)
                return
            # Act, then lose the answer (as a datagram lost on the way back).
            self.lose_control_answers -= 1
            session.send_ipmi_response = lambda *args, **kwargs: None
            try:
                super().control_chassis(request, session)
            finally:
                del session.send_ipmi_response
            self.journal.write(bmc=self.name, event="answer-lost", command="chassis-control")

        def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
            if self.should_drop():
                return
            if len(data) >= 22 and data[0] == 6 and data[4] == 6 and data[5] == 16:
                # A new RMCP+ session: same as pyghmi, with the fixed session class.
                handlers = ipmisession.Session.bmc_handlers.get(sockaddr) or {}
                known = handlers.get(self.port)
                if (isinstance(known, _Session) and not known.crossed
                        and known.open_request == bytes(data[16:])):
                    # The request was resent before the first copy was answered (both waited
                    # in the queue): the same session answers again, with the same id.
                    known.send_payload(bytearray(known.open_answer), 0x11, retry=False)
                    return
                # A crossed login: slow to answer, so the client resends; then, like stock
                # pyghmi, a new session (id) for every copy of the request.
                crossed = isinstance(known, _Session) and known.crossed
                if self.cross_logins > 0 and not crossed:
                    self.cross_logins -= 1
                    self.journal.write(bmc=self.name, event="login-crossed")
                    time.sleep(CROSS_PAUSE)
                    crossed = True
                session = _Session(self.authdata, self.kg, sockaddr, self.serversocket,
                                   bytearray(data)[16:], self.uuid, bmc=self)
                session.crossed = crossed
                return
            super().sessionless_data(data, sockaddr)

    return VirtualBmc, _Session


class VirtualBmcBase:
    """The Machine-facing half of the virtual BMC (pyghmi-free, so it is easy to read)."""

    port: int

    def __init__(self, name: str, machine: Machine, drop_first: int, journal: Journal):
        self.name = name
        self.machine = machine
        self.journal = journal
        self.to_drop = drop_first
        self.boot_flags = 0  # byte 1 of the last boot-flags parameter set (valid/persistent/EFI)

    def should_drop(self) -> bool:
        if self.to_drop > 0:
            self.to_drop -= 1
            self.journal.write(bmc=self.name, event="dropped")
            return True
        return False

    def _event(self, event: str, **details: Any) -> None:
        self.journal.write(bmc=self.name, event=event, power=self.machine.power_state(),
                           **details)

    # -- the pyghmi Bmc hooks ---------------------------------------------------------------
    def get_power_state(self) -> str:
        return self.machine.power_state()

    def power_on(self) -> int:
        self.machine.power_on()
        self._event("power-on")
        return 0

    def power_off(self) -> int:
        self.machine.power_off()
        self._event("power-off")
        return 0

    def power_cycle(self) -> int:
        if self.machine.power_state() == "off":
            return CC_NOT_IN_STATE
        self.machine.power_off()
        self.machine.power_on()
        self._event("power-cycle")
        return 0

    def power_reset(self) -> int:
        if self.machine.power_state() == "off":
            return CC_NOT_IN_STATE
        self.machine.reset()
        self._event("reset")
        return 0

    def power_shutdown(self) -> int:
        getattr(self.machine, "shutdown", self.machine.power_off)()
        self._event("soft-off")
        return 0

    def get_system_boot_options(self, request: dict[str, Any], session: Any) -> None:
        if request["data"][0] & 0x7F != 5:
            session.send_ipmi_response(code=0x80)  # parameter not supported
            return
        device, pending_once = self.machine.boot_device()[0], not self.machine.boot_device()[1]
        flags = self.boot_flags
        if not flags & FLAG_PERSISTENT and not pending_once:
            flags = 0  # the one-time override was used by a boot: the valid bit clears
        code = {v: k for k, v in DEVICE_CODES.items()}[device] if flags & FLAG_VALID else 0
        session.send_ipmi_response(data=[1, 5, flags, code << 2, 0, 0, 0])

    def set_system_boot_options(self, request: dict[str, Any], session: Any) -> None:
        data = list(request["data"])
        param = data[0] & 0x7F
        if param in (0, 3, 4):  # set-in-progress, valid-bit clearing, boot-info ack
            self._event("boot-param", param=param, data=data[1:])
            session.send_ipmi_response()
            return
        if param != 5 or len(data) < 3:
            session.send_ipmi_response(code=0x80)
            return
        flags, selector = data[1], (data[2] >> 2) & 0x0F
        device = DEVICE_CODES.get(selector)
        if flags & FLAG_VALID and selector and device is None:
            session.send_ipmi_response(code=0xCC)  # a device this machine does not have
            return
        self.boot_flags = flags
        if flags & FLAG_VALID and device:
            self.machine.set_boot_device(device, persistent=bool(flags & FLAG_PERSISTENT))  # type: ignore[arg-type]
        self._event("set-boot", device=device, valid=bool(flags & FLAG_VALID),
                    persistent=bool(flags & FLAG_PERSISTENT), efi=bool(flags & FLAG_EFI),
                    raw=data[1:6])
        session.send_ipmi_response()


@dataclass(frozen=True)
class BmcSpec:
    name: str
    port: int


def specs_for(nodeset: str, base_port: int) -> list[BmcSpec]:
    from pxe.nodeset import expand

    return [BmcSpec(name, base_port + i) for i, name in enumerate(expand(nodeset))]


def serve(specs: Sequence[BmcSpec], user: str, password: str, *, address: str = "127.0.0.1",
          drop_first: int = 0, power_on: bool = False, journal: Journal | None = None,
          lifetime: float = 3600.0, ready: Callable[[], None] | None = None,
          stop: threading.Event | None = None, parent: int | None = None,
          cipher_suites: Sequence[int] = (3,), faults: Faults | None = None,
          serial_dir: Path | None = None) -> None:
    """Run one pyghmi event loop serving a BMC per spec, for at most ``lifetime`` seconds.
    ``serial_dir``: each node's serial output is ``serial_dir/NAME.log`` (followed into SOL)."""
    import pyghmi.ipmi.private.session as ipmisession

    quiet_io()
    bmc_class, _ = _build_classes()
    journal = journal or Journal(None)
    bmcs = []
    for spec in specs:
        machine = SimulatedMachine(spec.name, state="on" if power_on else "off",
                                   serial_path=serial_dir / f"{spec.name}.log" if serial_dir
                                   else None)
        bmcs.append(bmc_class(spec.name, machine, user, password, spec.port, address=address,
                              drop_first=drop_first, journal=journal,
                              cipher_suites=cipher_suites, faults=faults))
    if ready:
        ready()
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        try:
            ipmisession.Session.wait_for_rsp(TICK)
        except Exception:  # one odd packet must not take every BMC of the process down
            traceback.print_exc(limit=3)
        tick_all(bmcs)
        if parent is not None and os.getppid() != parent:
            break  # the launcher is gone: do not outlive it


# -- the launcher (python3 -m lab.vbmc) ----------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vbmc", description="Virtual IPMI BMCs on UDP ports (one per node) for tests and the "
                                 "demo. Prints 'ready N' on stdout once every port is bound.")
    p.add_argument("--nodes", required=True, help="node set, e.g. n[001-200]")
    p.add_argument("--base-port", type=int, required=True, help="port of the first node's BMC")
    p.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--user", default="admin")
    p.add_argument("--password-file", required=True, type=Path,
                   help="file holding the BMC password (first line)")
    p.add_argument("--processes", type=int, default=1, help="spread the BMCs over N processes")
    p.add_argument("--drop-first", type=int, default=0, metavar="N",
                   help="each BMC ignores its first N datagrams")
    p.add_argument("--power-on", action="store_true", help="machines start powered on")
    p.add_argument("--cross-logins", type=int, default=0, metavar="N",
                   help="fault: each BMC answers its first N logins late and gives every resent "
                        "Open Session Request a new session id (stock pyghmi)")
    p.add_argument("--lose-control-answers", type=int, default=0, metavar="N",
                   help="fault: each BMC carries out its first N chassis controls and loses "
                        "their answers")
    p.add_argument("--sol-close-after", type=float, default=0.0, metavar="S",
                   help="fault: the BMC closes every SOL session S seconds after it opened")
    p.add_argument("--serial-dir", type=Path, metavar="DIR",
                   help="each node's serial output is DIR/NAME.log: what is appended there is "
                        "sent over SOL (the QEMU lab follows the VM's serial log the same way)")
    p.add_argument("--journal", type=Path, help="append BMC-side events (JSON lines) here")
    p.add_argument("--lifetime", type=float, default=3600.0, help="exit after S seconds")
    p.add_argument("--cipher-suites", default="3", metavar="LIST",
                   help="suites to accept: 3 (HMAC-SHA1, AES; default) and/or 17 (HMAC-SHA256)")
    args = p.parse_args(argv)
    try:
        suites = tuple(int(x) for x in args.cipher_suites.split(","))
    except ValueError:
        suites = ()
    if not suites or set(suites) - set(SUITE_RECORDS):
        p.error("--cipher-suites: a comma-separated list of 3 and 17")
    password = args.password_file.read_text().splitlines()[0] if args.password_file.exists() \
        else ""
    if not password:
        p.error(f"{args.password_file}: no password in the file")
    specs = specs_for(args.nodes, args.base_port)
    nproc = max(1, min(args.processes, len(specs)))
    kwargs = dict(address=args.address, drop_first=args.drop_first, power_on=args.power_on,
                  journal=Journal(args.journal), lifetime=args.lifetime, cipher_suites=suites,
                  faults=Faults(args.cross_logins, args.lose_control_answers,
                                args.sol_close_after), serial_dir=args.serial_dir)
    if nproc == 1:
        serve(specs, args.user, password, ready=lambda: print(f"ready {len(specs)}", flush=True),
              **kwargs)  # type: ignore[arg-type]
        return 0
    # Fork before pyghmi starts its I/O thread; each child serves a slice of the ports.
    launcher = os.getpid()
    children: list[int] = []
    readers: list[int] = []
    for i in range(nproc):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            code = 1
            try:
                def ready(w: int = wfd) -> None:
                    os.write(w, b"1")
                    os.close(w)

                serve(specs[i::nproc], args.user, password, parent=launcher, ready=ready,
                      **kwargs)  # type: ignore[arg-type]
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        children.append(pid)
        readers.append(rfd)

    def stop_children(*_: Any) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def on_term(*_: Any) -> None:
        stop_children()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    for rfd in readers:
        if os.read(rfd, 1) != b"1":
            stop_children()
            print("vbmc: a BMC process failed to start", file=sys.stderr)
            return 1
        os.close(rfd)
    print(f"ready {len(specs)}", flush=True)
    status = 0
    for pid in children:
        _, code = os.waitpid(pid, 0)
        status = status or (1 if code else 0)
    return status


class VbmcProcess:
    """``python3 -m lab.vbmc`` as a child process: started here, waited for, killed by its own PID."""

    def __init__(self, nodes: str, base_port: int, password_file: Path, *, user: str = "admin",
                 processes: int = 1, drop_first: int = 0, power_on: bool = False,
                 journal: Path | None = None, lifetime: float = 600.0,
                 start_timeout: float = 60.0, cipher_suites: Sequence[int] = (3,),
                 faults: Faults | None = None, serial_dir: Path | None = None):
        self.argv = [sys.executable, "-m", "lab.vbmc", "--nodes", nodes, "--base-port",
                     str(base_port), "--user", user, "--password-file", str(password_file),
                     "--processes", str(processes), "--drop-first", str(drop_first),
                     "--lifetime", str(lifetime),
                     "--cipher-suites", ",".join(str(n) for n in cipher_suites)]
        faults = faults or Faults()
        self.argv += ["--cross-logins", str(faults.cross_logins),
                      "--lose-control-answers", str(faults.lose_control_answers),
                      "--sol-close-after", str(faults.sol_close_after)]
        if serial_dir:
            self.argv += ["--serial-dir", str(serial_dir)]
        if power_on:
            self.argv.append("--power-on")
        if journal:
            self.argv += ["--journal", str(journal)]
        self.base_port = base_port
        self.journal = journal
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> VbmcProcess:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ok = bool(sel.select(self.start_timeout))
        sel.close()
        line = self.proc.stdout.readline() if ok else ""
        if not line.startswith("ready"):
            self.close()
            raise RuntimeError(f"vbmc did not start: {line!r}")
        return self

    def events(self) -> list[dict[str, Any]]:
        return read_journal(self.journal) if self.journal else []

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream:
                    stream.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
