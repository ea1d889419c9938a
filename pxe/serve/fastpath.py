"""Boot files without the framework: GET/HEAD of the HTTP root answered by a small protocol.

Measured (tools/bench_http.py, 1,000 keep-alive GETs of a 1 KiB file): uvicorn's h11 parser,
Starlette's routing and the ASGI messages cost 0.3-0.5 ms of CPU per request against nginx's
0.03 ms (httptools instead of h11 saved only 0.05 ms), so under load a storm's first bytes came
later than nginx's. This protocol answers the requests a booting node makes (GET/HEAD of a file,
the loader configs rendered from the database) itself and hands every other request, with its
connection, to uvicorn's protocol (the REST API, call-home, agent, metrics, healthz, anything it
does not fully understand: a body, `Expect`, a malformed line, a missing blob a service node
fetches): same answers, one parse of a few header lines, one write per small answer, the body of
a large one by sendfile(2) straight from the file, corked (TCP_CORK, as nginx's tcp_nopush) so
the head leaves with the first body bytes and no sendfile turn ends in a short segment: uncorked
(asyncio sets TCP_NODELAY) each 512 KiB turn cost 117 us of kernel time against 70 us corked,
the workers 0.60 s of CPU per round of tools/bench_http.py against 0.43 s (nginx 0.45 s).

The same rules as the framework path, shared with it: names through pxe.serve.files (root
confinement, symlinks, FIFOs, hidden and private files), Range/If-Range/If-None-Match through
pxe.serve.http.FileAnswer, loader configs through pxe.serve.http.rendered; the counters of
pxe.serve.metrics; the deadlines of pxe.serve.deadlines (request headers due within the timeout,
a client that stops reading a body is closed after the timeout without progress) and its
per-client connection cap, counted in one table with the protocol it hands off to.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from starlette.routing import Route

from pxe.serve import deadlines, files, metrics
from pxe.serve import http as serve_http

log = logging.getLogger("dynprov.serve.http")
access_log = logging.getLogger("uvicorn.access")

MAX_HEAD = 16 << 10  # request line + headers (h11's limit too); longer: 431 and closed
# At most this much per sendfile(2) call, then the next connection's turn (nginx:
# sendfile_max_chunk). Measured in tools/bench_http.py (32 x 64 MiB, load 5-12, median ratios
# of 4-5 runs): no cap 0.88-0.90x nginx (one call filled a whole socket buffer, up to 4 MiB,
# while 15 other clients of the worker waited), 2 MiB 0.87-1.04x, 1 MiB 1.03-1.32x,
# 512 KiB 1.11-1.26x, 256 KiB 1.02-1.16x. Corked, 2 MiB (nginx's default sendfile_max_chunk)
# still cost more worker CPU than 512 KiB: 0.46 s a round against 0.38-0.42 s.
SENDFILE_CHUNK = 512 << 10
MAX_PENDING = 64 << 10  # pipelined bytes read ahead while an answer is going out
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")  # origin-form, visible ASCII (else h11 judges)
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HANDED_OFF_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"expect", b"upgrade"))
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_NOT_FOUND = b"not found\n"
_FORBIDDEN = b"forbidden\n"
_TEXT = serve_http.TEXT_TYPE.encode()
_SMALL = serve_http.SMALL_BODY


class BootFiles:
    """What the fast path serves, taken from the app create_app built (one per worker)."""

    def __init__(self, app: Any):
        starlette = app
        while not hasattr(starlette, "state") and hasattr(starlette, "app"):
            starlette = starlette.app  # CountResponses -> Starlette
        state = starlette.state
        self.root: str = state.http_root
        self.configs = state.boot_configs
        self.fill_missing = state.fill_missing
        row = state.metrics_row
        self.row: metrics.Row | None = row
        self.codes = {int(c): metrics.slot("dynprov_http_requests_total", c)
                      for c in metrics.HTTP_CODES if c.isdigit()}
        self.other_code = metrics.slot("dynprov_http_requests_total", "other")
        self.bytes_slot = metrics.slot("dynprov_http_bytes_total")
        # Routes other than the file catch-all take their requests to the framework; per method,
        # the patterns of the routes that accept it (a route without methods accepts all).
        others = [r for r in starlette.routes
                  if getattr(r, "endpoint", None) is not serve_http.boot_file]
        self.routes: dict[str, tuple[Callable[[str], Any], ...]] = {
            method: tuple(r.path_regex.match for r in others
                          if not (isinstance(r, Route) and r.methods)
                          or method in r.methods)
            for method in ("GET", "HEAD")}

    def routed(self, method: str, path: str) -> bool:
        """Would the app route this request to something else than the boot files?"""
        for match in self.routes[method]:
            if match(path):
                return True
        return False

    def count(self, status: int, nbytes: int) -> None:
        if self.row is not None:
            self.row.add(self.codes.get(status, self.other_code))
            if nbytes:
                self.row.add(self.bytes_slot, nbytes)


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    line = b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.line = b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return cls.line


class _Sending:
    """A large body going out by sendfile(2): the file, where we are, how much is left."""

    __slots__ = ("fd", "offset", "left", "writer")

    def __init__(self, fd: int, offset: int, left: int):
        self.fd, self.offset, self.left = fd, offset, left
        self.writer = False  # registered with the loop for "socket writable"


def fast_protocol(base: type, boot: BootFiles, timeout: float, max_per_client: int,
                  open_per_client: Counter[str], log_access: bool = False) -> type:
    """The protocol class for uvicorn's ``http=``: boot files here, the rest to ``base``.

    ``base`` is the uvicorn protocol (pxe.serve.deadlines.guarded of ZeroCopyH11Protocol) built
    with the same ``open_per_client`` table, so the cap counts every connection once.
    """

    class FastBoot(asyncio.Protocol):
        def __init__(self, config: Any, server_state: Any, app_state: Any,
                     _loop: asyncio.AbstractEventLoop | None = None):
            self.config, self.server_state, self.app_state = config, server_state, app_state
            self.loop = _loop or asyncio.get_event_loop()
            self.transport: Any = None
            self.buf = bytearray()
            self.peer: str | None = None
            self.paused = False  # the transport holds unsent bytes (write limits 0/0)
            self.reading = True
            self.sending: _Sending | None = None
            self.closing = False  # close after the current answer (Connection: close, stop)
            self.handed_off = False
            self.in_next = False  # _next is on the stack: do not enter it again
            self.eof = False  # the client will send nothing more
            self.successor: asyncio.Protocol | None = None  # uvicorn's, after a hand-off
            self.waiting_since = self.progress = time.monotonic()
            self.backlog = -1
            self.timer: asyncio.TimerHandle | None = None
            self.sock_fd = -1
            self.sock: Any = None
            self.corked = False  # TCP_CORK set for the large answer going out
            self.refused = False  # over the per-client cap: deadlines.refuse() answers

        # -- connection ------------------------------------------------------------------
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            peername = transport.get_extra_info("peername")
            peer = peername[0] if isinstance(peername, tuple) else "?"
            if open_per_client[peer] >= max_per_client:
                log.warning("HTTP %s: refused: more than %d connections", peer, max_per_client)
                self.refused = True
                deadlines.refuse(transport, self.loop, timeout)
                return
            self.peer = peer
            open_per_client[peer] += 1
            self.server_state.connections.add(self)
            sock = transport.get_extra_info("socket")
            self.sock = sock
            self.sock_fd = sock.fileno() if sock is not None else -1
            transport.set_write_buffer_limits(high=0, low=0)  # pause_writing = not all sent
            self.timer = self.loop.call_later(timeout, self._check)

        def connection_lost(self, exc: Exception | None) -> None:
            self._release()
            self._stop_sending()

        def _release(self) -> None:
            self.server_state.connections.discard(self)
            if self.peer is not None:
                open_per_client[self.peer] -= 1
                if open_per_client[self.peer] <= 0:
                    del open_per_client[self.peer]
                self.peer = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def shutdown(self) -> None:
            """uvicorn's server is stopping: close now if idle, else after this answer."""
            self.closing = True
            if self.sending is None and not self.paused:
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return  # read and dropped: see deadlines.refuse()
            self.buf += data
            if self.sending is not None or self.paused:
                if len(self.buf) > MAX_PENDING and self.reading:
                    self.reading = False
                    self.transport.pause_reading()
                return
            self._next()

        def eof_received(self) -> bool | None:
            """The client shut its side (it may do so right after its requests): answer what
            it asked for, then close."""
            if self.refused:
                return False
            self.eof = True
            if self.sending is None and not self.paused:
                self._next()
            if self.successor is not None:  # handed over just now: as uvicorn would
                return self.successor.eof_received()
            return self.sending is not None or self.paused

        def pause_writing(self) -> None:
            self.paused = True

        def resume_writing(self) -> None:
            self.paused = False
            self.progress = time.monotonic()
            if self.sending is not None:
                self._write_body()
            elif self.closing:
                self.transport.close()
            else:
                self._next()

        # -- deadlines ---------------------------------------------------------------------
        def _check(self) -> None:
            self.timer = None
            if self.peer is None or self.transport.is_closing():
                return
            now = time.monotonic()
            if self.sending is not None or self.paused:  # an answer going out: progress?
                if self.paused:  # the transport is writing what it holds, as the client reads
                    backlog = self.transport.get_write_buffer_size()
                    if backlog != self.backlog:
                        self.backlog, self.progress = backlog, now
                left = timeout - (now - self.progress)
                what = "the client stopped reading"
            else:
                left = timeout - (now - self.waiting_since)
                what = "request headers not received in time"
            if left > 0:
                self.timer = self.loop.call_later(max(0.05, left), self._check)
                return
            log.info("HTTP %s: closed: %s", self.peer, what)
            self.transport.abort()

        # -- requests ----------------------------------------------------------------------
        def _next(self) -> None:
            """Answer the complete requests in the buffer, in order, while the socket takes them."""
            while not (self.sending is not None or self.paused or self.handed_off
                       or self.closing or self.transport.is_closing()):
                buf = self.buf
                while buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
                    del buf[:2]
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if self.eof:
                        self.transport.close()  # nothing more to answer
                    elif len(buf) > MAX_HEAD:
                        self._too_large()
                    elif buf.find(b"\n\n") >= 0:
                        self._hand_off()  # bare-LF request: h11's to judge
                    elif not self.reading:
                        self.reading = True
                        self.transport.resume_reading()
                    return
                if end > MAX_HEAD:
                    self._too_large()
                    return
                head = bytes(buf[:end])
                del buf[:end + 4]
                self.in_next = True
                try:
                    ours = self._answer(head)
                except Exception:  # a bug or a broken disk: this connection, not the worker
                    log.exception("HTTP %s: answering %r failed", self.peer, head[:200])
                    self._stop_sending()
                    self.transport.abort()
                    return
                finally:
                    self.in_next = False
                if not ours:
                    buf[0:0] = head + b"\r\n\r\n"
                    self._hand_off()
                    return
                self.waiting_since = time.monotonic()

        def _answer(self, head: bytes) -> bool:
            """Answer one request (its head without the blank line); False: not ours."""
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                return False
            method_b, target, version = parts
            if method_b not in (b"GET", b"HEAD") or version not in (b"HTTP/1.1", b"HTTP/1.0") \
                    or not _TARGET.match(target):
                return False
            wanted: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep or not _TOKEN.match(name):
                    return False  # obs-fold, a space before ':', junk: h11 answers it
                name = name.lower()
                if name in _HANDED_OFF_HEADERS:
                    return False
                if name in wanted:
                    if name == b"host":
                        return False  # h11: 400
                    continue  # like Starlette's headers.get(): the first one counts
                wanted[name] = value.strip(b" \t")
            if version == b"HTTP/1.1" and b"host" not in wanted:
                return False
            raw_path = target.split(b"?", 1)[0]
            path = unquote(raw_path.decode("ascii"))
            method = method_b.decode()
            if boot.routed(method, path):
                return False
            close = version == b"HTTP/1.0" or b"close" in wanted.get(b"connection", b"").lower()
            if close:
                self.closing = True
            status = self._serve(method, path, wanted, close)
            if status is None:
                self.closing = False
                return False
            self.server_state.total_requests += 1
            if log_access:
                access_log.info('%s - "%s %s HTTP/%s" %d', self.peer, method,
                                target.decode("ascii"), version[5:].decode(), status)
            return True

        def _serve(self, method: str, path: str, req: dict[bytes, bytes], close: bool
                   ) -> int | None:
            """Write the answer (or start it); its status, or None: the framework's to answer."""
            head_only = method == "HEAD"
            name = path[1:]
            try:
                text = serve_http.rendered(boot.configs, name)
                if text is not None:
                    self._write(200, [(b"content-type", _TEXT)], text, head_only, close)
                    return 200
                fd, st, rel = files.open_file(boot.root, name)
            except files.Missing:
                if boot.fill_missing is not None:
                    return None  # a service node fetches the blob (in a thread): the framework
                self._write(404, [(b"content-type", _TEXT)], _NOT_FOUND, head_only, close)
                return 404
            except files.Refused as exc:
                log.warning("HTTP %s: %r refused: %s", self.peer, name, exc)
                self._write(403, [(b"content-type", _TEXT)], _FORBIDDEN, head_only, close)
                return 403
            try:
                answer = serve_http.FileAnswer(
                    st, rel, _text(req.get(b"if-none-match")), _text(req.get(b"range")),
                    _text(req.get(b"if-range")))
            except BaseException:
                os.close(fd)
                raise
            head = _head(answer.status, [(k.encode(), v.encode())
                                         for k, v in answer.headers.items()], close)
            count = 0 if head_only else answer.count
            if count <= _SMALL:
                try:
                    body = os.pread(fd, count, answer.offset) if count else b""
                finally:
                    os.close(fd)
                if len(body) != count:  # the file shrank: no valid answer left
                    self.transport.abort()
                    return answer.status
                self.transport.write(head + body)
                boot.count(answer.status, count)
                if close:
                    self.transport.close()  # after what it holds is out
                return answer.status
            boot.count(answer.status, count)
            self._cork(True)  # the head goes out with the first body bytes, segments stay full
            self.transport.write(head)
            self.sending = _Sending(fd, answer.offset, count)
            self.progress = time.monotonic()
            if not self.paused:
                self._write_body()
            return answer.status

        def _write(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                   head_only: bool, close: bool) -> None:
            headers.append((b"content-length", str(len(body)).encode()))
            self.transport.write(_head(status, headers, close) + (b"" if head_only else body))
            boot.count(status, 0 if head_only else len(body))
            if close:
                self.transport.close()  # after what it holds is out

        def _too_large(self) -> None:
            """431 and close: request line + headers over MAX_HEAD (bounded memory)."""
            self.buf.clear()
            self.closing = True
            self._write(431, [(b"content-type", _TEXT)], b"request header too large\n", False,
                        True)

        # -- the body of a large answer -------------------------------------------------------
        def _write_body(self) -> None:
            """One sendfile(2) per wake-up (fair to the other connections of this worker)."""
            s = self.sending
            if s is None or self.transport.is_closing():
                self._stop_sending()
                return
            try:
                sent = os.sendfile(self.sock_fd, s.fd, s.offset, min(s.left, SENDFILE_CHUNK))
            except (BlockingIOError, InterruptedError):
                sent = -1
            except OSError as exc:
                log.debug("HTTP %s: sendfile stopped: %s", self.peer, exc)
                self._stop_sending()
                self.transport.abort()
                return
            if sent == 0:  # the file shrank: the promised length cannot be kept
                log.warning("HTTP %s: file shrank while being sent", self.peer)
                self._stop_sending()
                self.transport.abort()
                return
            if sent > 0:
                s.offset += sent
                s.left -= sent
                self.progress = time.monotonic()
            if s.left > 0:
                if not s.writer:  # registered once per body, not once per turn
                    s.writer = True
                    # (the public add_writer refuses an fd that belongs to a transport)
                    self.loop._add_writer(self.sock_fd, self._write_body)  # type: ignore[attr-defined]
                return
            self._stop_sending()
            self.waiting_since = time.monotonic()
            if self.closing:
                self.transport.close()
            elif not self.in_next:  # (else _next's loop goes on by itself)
                self._next()

        def _stop_sending(self) -> None:
            s, self.sending = self.sending, None
            if s is None:
                return
            if s.writer:
                self.loop._remove_writer(self.sock_fd)  # type: ignore[attr-defined]
            os.close(s.fd)
            self._cork(False)

        def _cork(self, on: bool) -> None:
            """TCP_CORK while a large body goes out (nginx's tcp_nopush): without it every
            sendfile turn ended in a short segment (asyncio sets TCP_NODELAY), the head in one
            of its own; uncorking pushes out the rest."""
            if on == self.corked or self.sock is None or self.transport.is_closing():
                return
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
            except OSError:  # the connection is gone: nothing to push
                return
            self.corked = on

        # -- everything else: the framework ----------------------------------------------------
        def _hand_off(self) -> None:
            """Give this connection, and what it sent, to uvicorn's protocol (for good)."""
            self.handed_off = True
            data = bytes(self.buf)
            self.buf.clear()
            self._release()
            transport = self.transport
            transport.set_write_buffer_limits()  # uvicorn's flow control expects the defaults
            if not self.reading:
                self.reading = True
                transport.resume_reading()
            proto = base(config=self.config, server_state=self.server_state,
                         app_state=self.app_state, _loop=self.loop)
            self.successor = proto
            transport.set_protocol(proto)
            proto.connection_made(transport)
            if data and not transport.is_closing():
                proto.data_received(data)

    return FastBoot


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _head(status: int, headers: list[tuple[bytes, bytes]], close: bool) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")), _Date.header()]
    parts += [k + b": " + v + b"\r\n" for k, v in headers]
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
