"""TFTP for boot loaders: read-only, confined to the TFTP root, built on tftpy's packet codec.

Protocol: RFC 1350 reads, options blksize/tsize/timeout (RFC 2347-2349) and windowsize
(RFC 7440; OVMF asks for 4). Write requests get "access violation". Each transfer has its own
UDP port (the RFC's transfer ID), a retransmission timeout (server default, or the client's
`timeout` option) and a bounded number of retries; a client that vanishes frees its slot after
timeout x (retries + 1). Duplicate and stale ACKs are ignored (no Sorcerer's Apprentice), an
ACK inside the window restarts the window after it (RFC 7440). Block numbers roll over to 0.

tftpy's packet factory and classes parse the requests (with a split-based, tolerant decode) and
build OACK and ERROR packets. The DATA/ACK loop is our own: stock tftpy's server (one select()
over all sessions, packet objects and debug logging per block, lock-step only) reaches about
0.6x tftpd-hpa in a 128-client boot storm. Here each worker process runs an epoll loop over its
transfers with a short path for the lock-step ACK, sends a whole window per ACK, and keeps the
files it served in memory (an LRU, filled by the first request's one read: every node of a
storm asks for the same loader).

Each worker has its own listening socket on the one port (SO_REUSEPORT, bound by the
supervisor before the workers fork: see bind_workers). The kernel picks the socket by a hash of
the client's address and port, so a client's repeated request reaches the worker that serves
it, which sends its first answer again (or, once the client has answered it, ignores the
repeat): one transfer per client (address, port) and request, never a second one that the
client would abort as a stranger's (wrong TID). With one shared socket and the least busy
worker taking each request, a 500-node storm started 2,000-6,200 such doomed transfers per
9,000, and iPXE's loader waited 3.4 s (median) for its first answer, against 0.05 s and none
with a socket per worker (docs/bench/boot-500-*s26.txt).
A request that finds every slot taken (max_transfers, counted across workers) is dropped: the
client sends it again after its own timeout, so a storm queues instead of failing.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sqlite3
import struct
import threading
import time
from array import array
from collections import OrderedDict
from typing import Protocol

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketERR, TftpPacketOACK, TftpPacketRRQ, TftpPacketWRQ
from tftpy.TftpShared import TftpErrors, TftpException

from pxe.serve import bootconfigs, files, metrics
from pxe.serve.settings import ServeSettings

log = logging.getLogger("dynprov.serve.tftp")
logging.getLogger("tftpy").setLevel(logging.WARNING)  # its codec logs every field at debug

IP_PKTINFO = 8  # <linux/in.h>; not exported by Python's socket module
_PKTINFO_SPACE = socket.CMSG_SPACE(12)
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"  # ::ffff:a.b.c.d
MAX_REQUEST = 2048
RECV_SIZE = 1024  # ACK/ERROR from a client; anything longer is not ours anyway
NETASCII_MAX = 64 << 20
CHUNK = 256 << 10  # read size for files not kept in the cache

_HDR = [b"\x00\x03" + n.to_bytes(2, "big") for n in range(65536)]  # DATA header per block
_ACK = [b"\x00\x04" + n.to_bytes(2, "big") for n in range(65536)]  # ACK of each block number


class _Request:
    """RRQ/WRQ decoding, stricter on framing and tolerant of empty option values.

    tftpy's own decoder walks the packet byte by byte and rejects an empty value, which RFC
    2090's `multicast` option has in every request that carries it.
    """

    buffer: bytes

    def decode(self) -> _Request:
        fields = self.buffer[2:].split(b"\0")
        if len(fields) < 3 or fields[-1] != b"" or not fields[0]:
            raise TftpException("malformed request")
        fields = fields[:-1]
        self.filename = fields[0].decode("ascii")
        self.mode = fields[1].decode("ascii").lower()
        pairs = fields[2:]
        self.options = {pairs[i].decode("ascii"): pairs[i + 1].decode("ascii")
                        for i in range(0, len(pairs) - 1, 2) if pairs[i]}
        return self


class _ReadRequest(_Request, TftpPacketRRQ):
    pass


class _WriteRequest(_Request, TftpPacketWRQ):
    pass


_FACTORY = TftpPacketFactory()
_FACTORY.classes.update({1: _ReadRequest, 2: _WriteRequest})

_REQ = {r: metrics.slot("dynprov_tftp_requests_total", r) for r in metrics.TFTP_REQUEST_RESULTS}
_END = {r: metrics.slot("dynprov_tftp_transfers_total", r) for r in metrics.TFTP_TRANSFER_RESULTS}
_BYTES = metrics.slot("dynprov_tftp_bytes_total")
_RETRANSMITS = metrics.slot("dynprov_tftp_retransmits_total")
_MALFORMED = metrics.slot("dynprov_tftp_malformed_packets_total")
_ACTIVE = metrics.slot("dynprov_tftp_active_transfers")


class Slots(Protocol):
    """The cap on concurrent transfers (a semaphore shared by the workers)."""

    def acquire(self, block: bool = ..., /) -> bool: ...

    def release(self) -> None: ...


class _ErrorPacket(TftpPacketERR):
    """tftpy's ERROR packet with our own message text."""

    def __init__(self, code: int, message: str):
        super().__init__()
        self.errorcode = code
        self.errmsgs = {**self.errmsgs, code: message.encode("ascii", "replace")[:200]}


def error_packet(code: int, message: str) -> bytes:
    return _ErrorPacket(code, message).encode().buffer


def oack_packet(options: dict[str, int]) -> bytes:
    pkt = TftpPacketOACK()
    pkt.options = {k: str(v) for k, v in options.items()}
    return pkt.encode().buffer


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def netascii(data: bytes) -> bytes:
    """RFC 764 line ends: CR -> CR NUL, LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class FileChanged(Exception):
    """The file got shorter while we read it (rewritten in place instead of renamed)."""


def _pread_all(fd: int, size: int) -> bytes:
    parts, off = [], 0
    while off < size:
        chunk = os.pread(fd, min(size - off, 1 << 24), off)
        if not chunk:
            raise FileChanged("file shrank while being read")
        parts.append(chunk)
        off += len(chunk)
    return b"".join(parts)


class FileCache:
    """Whole-file contents by (device, inode, size, mtime), per worker, LRU by bytes.

    A file small enough to keep is read whole by its first request, before its first block
    goes out: every transfer of a storm that starts after that shares the one copy (reading it
    in pieces as the first transfer went meant each transfer starting before the first ended
    read and held the file again: ~1 GiB across the workers for 128 x 8 MiB, and a slower
    cold storm). Bigger files are read in chunks as they go (ChunkReader). pxe.atomic replaces
    files by rename, so a new version is a new inode and a new key.
    """

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.used = 0
        self._items: OrderedDict[tuple[int, int, int, int], bytes] = OrderedDict()

    @staticmethod
    def key(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def reader(self, fd: int, st: os.stat_result) -> bytes | ChunkReader:
        """The contents (cached; the caller closes ``fd``), else a reader owning ``fd``."""
        key = self.key(st)
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
            return data
        if st.st_size > self.limit // 2:
            return ChunkReader(fd, st.st_size)
        data = _pread_all(fd, st.st_size)
        self.put(key, data)
        return data

    def put(self, key: tuple[int, int, int, int], data: bytes) -> None:
        if key in self._items:
            return
        self._items[key] = data
        self.used += len(data)
        while self.used > self.limit and self._items:
            _, old = self._items.popitem(last=False)
            self.used -= len(old)


class ChunkReader:
    """Reads a file in CHUNK pieces, keeping the current one; sliced like bytes."""

    __slots__ = ("fd", "start", "chunk", "size")

    def __init__(self, fd: int, size: int):
        self.fd, self.size, self.start, self.chunk = fd, size, 0, b""

    def __getitem__(self, sl: slice) -> bytes:
        lo, hi = sl.start, min(sl.stop, self.size)
        if lo >= hi:
            return b""
        if not (self.start <= lo and hi <= self.start + len(self.chunk)):
            chunk = os.pread(self.fd, max(CHUNK, hi - lo), lo)
            if len(chunk) < hi - lo:
                raise FileChanged("file shrank while being read")
            self.start, self.chunk = lo, chunk
        return self.chunk[lo - self.start:hi - self.start]

    def close(self) -> None:
        os.close(self.fd)


class Transfer:
    """One read transfer. Blocks are numbered from 1 (absolute); block 0 stands for the OACK."""

    __slots__ = ("sock", "recv", "send", "peer", "name", "request", "data", "size", "blksize",
                 "window", "last", "sent", "acked", "want", "deadline", "timeout", "tries", "oack",
                 "started")

    def __init__(self, sock: socket.socket, peer: tuple, name: str, request: bytes,
                 data: bytes | ChunkReader, size: int, blksize: int, window: int, timeout: float,
                 oack: bytes | None, now: float):
        self.sock, self.peer, self.name, self.data, self.size = sock, peer, name, data, size
        self.request = request  # the RRQ as received: a client repeating it is recognised
        self.recv, self.send = sock.recv, sock.send
        self.blksize, self.window, self.timeout, self.oack = blksize, window, timeout, oack
        self.last = size // blksize + 1  # a file of whole blocks ends with an empty block
        self.acked = -1 if oack else 0
        self.sent = 0
        # Lock-step: the exact ACK that moves the transfer on (the OACK's is ACK 0).
        self.want: bytes | None = _ACK[0] if oack and window == 1 else None
        self.tries = 0
        self.deadline = now + timeout
        self.started = now


class Worker:
    """One TFTP event loop on its own listening socket (one of bind_workers' group)."""

    def __init__(self, listen: socket.socket, root: str, settings: ServeSettings, slots: Slots,
                 row: metrics.Row | None = None,
                 configs: bootconfigs.BootConfigs | None = None):
        """``configs`` answers loader-config names from the database (before the file tree)."""
        self.listen = listen
        self.configs = configs
        self.root = files.root_of(root)
        self.s = settings
        self.slots = slots
        self.row = row
        self.counts = row.load() if row else array("q", bytes(8 * metrics.WIDTH))
        self.local_address = listen.getsockname()[0]
        self.wildcard = self.local_address == "0.0.0.0"
        self.cache = FileCache(settings.tftp_cache_mb << 20)
        self.transfers: dict[int, Transfer] = {}
        self.by_peer: dict[tuple, Transfer] = {}
        self.epoll: select.epoll | None = None

    # -- the loop --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        ep = self.epoll = select.epoll()
        lfd = self.listen.fileno()
        # Edge-triggered: the loop reads a bounded batch per turn and comes back for the rest
        # (``pending``), so a burst of requests cannot starve the running transfers.
        ep.register(lfd, select.EPOLLIN | select.EPOLLET)
        sweep_every = min(0.1, self.s.timeout / 2)
        next_sweep = next_flush = time.monotonic()
        transfers = self.transfers
        pending = True
        try:
            while not stop.is_set():
                wait = 0.0 if pending else max(0.0, next_sweep - time.monotonic())
                events = ep.poll(wait)
                now = time.monotonic()
                for fd, _ in events:
                    t = transfers.get(fd)
                    try:
                        if t is not None:
                            self._on_packet(t, now)
                        elif fd == lfd:
                            pending = True
                    except Exception:  # one bad packet must not end the worker
                        log.exception("TFTP: unexpected error")
                        if t is not None and t.sock.fileno() in transfers:
                            self._end(t, "error", "internal error", now)
                if pending:
                    pending = self._take_requests(now)
                if now >= next_sweep:
                    self._sweep(now)
                    pending = True  # a datagram the edge did not announce waits at most this
                    next_sweep = now + sweep_every
                    if now >= next_flush:
                        self.flush()
                        next_flush = now + 0.5
        finally:
            now = time.monotonic()
            for t in list(transfers.values()):
                self._end(t, "aborted", "server stopping", now)
            self.flush()
            ep.close()

    def flush(self) -> None:
        if self.row is not None:
            self.row.store(self.counts)

    # -- requests on the listening socket ----------------------------------------------------
    def _take_requests(self, now: float, limit: int = 32) -> bool:
        """Read up to ``limit`` requests; True if more may be waiting."""
        for _ in range(limit):
            try:
                if not self._on_request(now):
                    return False
            except Exception:
                log.exception("TFTP: unexpected error")
        return True

    def _on_request(self, now: float) -> bool:
        """Handle one datagram of the listening socket; False if there was none."""
        try:
            if self.wildcard:
                data, anc, _flags, peer = self.listen.recvmsg(MAX_REQUEST, _PKTINFO_SPACE)
                local = _destination(anc) or self.local_address
            else:
                data, peer = self.listen.recvfrom(MAX_REQUEST)
                local = self.local_address
        except (BlockingIOError, InterruptedError):
            return False  # nothing (left)
        except OSError:
            return True
        self._request(data, local, peer, now)
        return True

    def _request(self, data: bytes, local: str, peer: tuple, now: float) -> None:
        if len(data) < 4 or data[0] != 0 or data[1] not in (1, 2):
            self.counts[_MALFORMED] += 1
            return
        try:
            pkt = _FACTORY.parse(data)
            name, mode = pkt.filename, pkt.mode
            options = {str(k).lower(): str(v) for k, v in pkt.options.items()}
        except (TftpException, struct.error, UnicodeDecodeError, ValueError, IndexError):
            self.counts[_MALFORMED] += 1
            return
        where = f"{peer[0]}:{peer[1]}"
        if pkt.opcode == 2:
            self.counts[_REQ["write_refused"]] += 1
            log.warning("TFTP %s: write request for %r refused (read-only server)", where, name)
            self._reply(local, peer, error_packet(TftpErrors.AccessViolation,
                                                  "Read-only server: write requests are refused"))
            return
        if mode not in ("octet", "netascii"):
            self.counts[_REQ["bad_request"]] += 1
            self._reply(local, peer, error_packet(TftpErrors.IllegalTftpOp,
                                                  f"Unsupported mode {mode!r}"))
            return
        old = self.by_peer.get(peer)
        if old is not None and old.request == data:  # the client repeated its request
            self.counts[_REQ["duplicate"]] += 1
            if old.acked < (0 if old.oack else 1):
                self._send(old, self._resend(old), now)  # our first answer is late or lost
            # else: it has our answer (it acknowledged it); this repeat waited in the queue
            return
        try:
            rendered = self._rendered(name)
            if rendered is not None:
                self._start_rendered(rendered, files.clean_name(name), mode, options, local, peer,
                                     data, now)
                return
            fd, st, rel = files.open_file(self.root, name)
        except files.Missing:
            self.counts[_REQ["not_found"]] += 1
            log.info("TFTP %s: %s: not found", where, name)
            self._reply(local, peer, error_packet(TftpErrors.FileNotFound, "File not found"))
            return
        except files.Refused as exc:
            self.counts[_REQ["refused"]] += 1
            log.warning("TFTP %s: %r refused: %s", where, name, exc)
            self._reply(local, peer, error_packet(TftpErrors.AccessViolation, "Access violation"))
            return
        if not self.slots.acquire(False):
            os.close(fd)
            self.counts[_REQ["busy"]] += 1
            log.debug("TFTP %s: %s: every transfer slot is taken; dropped", where, rel)
            return
        try:
            self._start(fd, st, rel, mode, options, local, peer, data, now)
        except BaseException:
            self.slots.release()
            raise

    def _rendered(self, name: str) -> bytes | None:
        """A loader config rendered from the database, or None (a file of the root)."""
        if self.configs is None:
            return None
        rel = files.clean_name(name)
        if not self.configs.claims(rel):
            return None
        try:
            return self.configs.lookup(rel)
        except sqlite3.Error as exc:  # the file tree (if any) rather than no answer
            log.error("TFTP: %s: state database: %s", rel, exc)
            return None

    def _start_rendered(self, text: bytes, rel: str, mode: str, options: dict[str, str],
                        local: str, peer: tuple, request: bytes, now: float) -> None:
        if not self.slots.acquire(False):
            self.counts[_REQ["busy"]] += 1
            return
        try:
            data = netascii(text) if mode == "netascii" else text
            self._begin(data, len(data), rel, options, local, peer, request, now)
        except BaseException:
            self.slots.release()
            raise

    def _start(self, fd: int, st: os.stat_result, rel: str, mode: str, options: dict[str, str],
               local: str, peer: tuple, request: bytes, now: float) -> None:
        where = f"{peer[0]}:{peer[1]}"
        data: bytes | ChunkReader
        try:
            if mode == "netascii":
                if st.st_size > NETASCII_MAX:
                    raise FileChanged(f"too big for netascii ({st.st_size} bytes)")
                data = netascii(_pread_all(fd, st.st_size))
            else:
                data = self.cache.reader(fd, st)
        except (OSError, FileChanged) as exc:
            os.close(fd)
            self.slots.release()
            self.counts[_REQ["bad_request"]] += 1
            log.warning("TFTP %s: %s: %s", where, rel, exc)
            self._reply(local, peer, error_packet(TftpErrors.NotDefined, "Cannot read file"))
            return
        if not isinstance(data, ChunkReader):
            os.close(fd)
        size = len(data) if isinstance(data, bytes) else st.st_size
        self._begin(data, size, rel, options, local, peer, request, now)

    def _begin(self, data: bytes | ChunkReader, size: int, rel: str, options: dict[str, str],
               local: str, peer: tuple, request: bytes, now: float) -> None:
        """Negotiate the options, open the transfer's socket, send the first window."""
        where = f"{peer[0]}:{peer[1]}"
        accepted: dict[str, int] = {}
        blksize, window, timeout = 512, 1, self.s.timeout
        value = _number(options.get("blksize", ""))
        if value is not None and value >= 8:  # RFC 2348: 8..65464; bigger asks get our maximum
            blksize = accepted["blksize"] = min(value, self.s.max_blksize)
        value = _number(options.get("windowsize", ""))
        if value is not None and value >= 1:  # RFC 7440: 1..65535
            window = accepted["windowsize"] = min(value, self.s.max_windowsize)
        value = _number(options.get("timeout", ""))
        if value is not None and 1 <= value <= 255:  # RFC 2349
            accepted["timeout"] = value
            timeout = float(value)
        if _number(options.get("tsize", "")) is not None:
            accepted["tsize"] = size
        ignored = set(options) - {"blksize", "windowsize", "timeout", "tsize"}
        if ignored:
            log.debug("TFTP %s: ignoring unknown option(s) %s", where, ", ".join(sorted(ignored)))

        try:
            sock = self._socket(local, peer)
        except BaseException:
            if isinstance(data, ChunkReader):
                data.close()
            raise
        t = Transfer(sock, peer, rel, request, data, size, blksize, window, timeout,
                     oack_packet(accepted) if accepted else None, now)
        fd_sock = sock.fileno()
        self.transfers[fd_sock] = t
        self.by_peer[peer] = t
        assert self.epoll is not None
        self.epoll.register(fd_sock, select.EPOLLIN)
        self.counts[_REQ["started"]] += 1
        self._set_active()
        log.debug("TFTP %s: RRQ %s (%d bytes, options %s)", where, rel, size, accepted)
        self._send(t, self._resend(t), now)

    def _socket(self, local: str, peer: tuple) -> socket.socket:
        sock = socket.socket(self.listen.family, socket.SOCK_DGRAM)
        try:
            sock.bind((local, 0))
            sock.connect(peer)  # the kernel drops datagrams from anyone but this client
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _reply(self, local: str, peer: tuple, packet: bytes) -> None:
        """An ERROR answer to a request, from a fresh port like any transfer."""
        try:
            with self._socket(local, peer) as sock:
                sock.send(packet)
        except OSError as exc:
            log.debug("TFTP %s: cannot answer: %s", peer, exc)

    # -- the data path -------------------------------------------------------------------------
    def _send_from(self, t: Transfer, first: int) -> str | None:
        """Send a window of blocks starting at ``first``; a reason if the transfer must end."""
        end = first + t.window - 1
        if end > t.last:
            end = t.last
        bs, data, send = t.blksize, t.data, t.send
        off = (first - 1) * bs
        try:
            for n in range(first, end + 1):
                send(_HDR[n & 0xFFFF] + data[off:off + bs])
                off += bs
        except (BlockingIOError, InterruptedError):
            pass  # socket buffer full: the timeout sends it again
        except FileChanged as exc:
            return str(exc)
        except OSError as exc:
            return f"client unreachable ({exc.strerror})"
        t.sent = end
        if t.window == 1:
            t.want = _ACK[end & 0xFFFF]
        return None

    def _resend(self, t: Transfer) -> str | None:
        """Send again what the client has not acknowledged: the OACK, or the window."""
        if t.acked >= 0:
            return self._send_from(t, t.acked + 1)
        try:
            t.sock.send(t.oack)  # type: ignore[arg-type]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            return f"client unreachable ({exc.strerror})"
        return None

    def _send(self, t: Transfer, problem: str | None, now: float) -> None:
        """End the transfer if sending failed."""
        if problem is None:
            return
        if problem.startswith("client unreachable"):
            self._end(t, "aborted", problem, now)
        else:
            self._fail(t, problem, now)

    def _on_packet(self, t: Transfer, now: float) -> None:
        try:
            data = t.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ECONNREFUSED: the client's port is closed (ICMP)
            self._end(t, "aborted", f"client gone ({exc.strerror})", now)
            return
        if data == t.want:  # lock-step, the ACK of the block just sent: the hot path
            sent = t.sent
            t.acked = sent
            if sent >= t.last:
                self._end(t, "complete", "", now)
                return
            bs = t.blksize
            off = sent * bs
            sent += 1
            try:
                t.send(_HDR[sent & 0xFFFF] + t.data[off:off + bs])
            except (BlockingIOError, InterruptedError):
                pass  # lost like on the wire: the timeout sends it again
            except FileChanged as exc:
                self._fail(t, str(exc), now)
                return
            except OSError as exc:
                self._end(t, "aborted", f"client unreachable ({exc.strerror})", now)
                return
            t.sent = sent
            t.want = _ACK[sent & 0xFFFF]
            t.tries = 0
            t.deadline = now + t.timeout
            return
        if len(data) >= 4 and data[0] == 0:
            op = data[1]
            if op == 4:  # ACK
                sent = t.sent
                acked = sent - ((sent - ((data[2] << 8) | data[3])) & 0xFFFF)
                if acked <= t.acked:
                    return  # duplicate or stale: never answer it (Sorcerer's Apprentice)
                t.acked = acked
                if acked >= t.last:
                    self._end(t, "complete", "", now)
                    return
                t.tries = 0
                t.deadline = now + t.timeout
                problem = self._send_from(t, acked + 1)
                if problem is not None:
                    self._send(t, problem, now)
                return
            if op == 5:  # the client gave up (or rejected our OACK)
                code = (data[2] << 8) | data[3]
                text = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")
                self._end(t, "aborted", f"client error {code} {text!r}", now)
                return
            if op in (1, 2, 3, 6):
                self._fail(t, f"unexpected opcode {op} from the client", now,
                           TftpErrors.IllegalTftpOp, "Illegal TFTP operation")
                return
        self.counts[_MALFORMED] += 1

    def _fail(self, t: Transfer, why: str, now: float, code: int = TftpErrors.NotDefined,
              text: str = "Transfer failed") -> None:
        try:
            t.sock.send(error_packet(code, text))
        except OSError:
            pass
        self._end(t, "error", why, now)

    def _sweep(self, now: float) -> None:
        for t in [t for t in self.transfers.values() if now >= t.deadline]:
            if t.tries >= self.s.retries:
                self._end(t, "timeout", f"no answer after {t.tries + 1} tries", now)
                continue
            t.tries += 1
            t.deadline = now + t.timeout
            self.counts[_RETRANSMITS] += 1
            self._send(t, self._resend(t), now)

    def _end(self, t: Transfer, result: str, why: str, now: float) -> None:
        fd = t.sock.fileno()
        if self.transfers.pop(fd, None) is None:
            return
        if self.by_peer.get(t.peer) is t:
            del self.by_peer[t.peer]
        if self.epoll is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass
        t.sock.close()
        if isinstance(t.data, ChunkReader):
            t.data.close()
        self.slots.release()
        delivered = t.size if result == "complete" else max(0, min(t.size, t.acked * t.blksize))
        self.counts[_BYTES] += delivered
        self.counts[_END[result]] += 1
        self._set_active()
        seconds = now - t.started
        where = f"{t.peer[0]}:{t.peer[1]}"
        if result == "complete":
            log.info("TFTP %s: sent %s (%d bytes, blksize %d, window %d) in %.2f s",
                     where, t.name, t.size, t.blksize, t.window, seconds)
        else:
            log.warning("TFTP %s: %s %s after %d of %d blocks: %s", where, t.name, result,
                        max(t.acked, 0), t.last, why)

    def _set_active(self) -> None:
        self.counts[_ACTIVE] = len(self.transfers)
        if self.row is not None:
            self.row.store(self.counts)


def _destination(ancdata: list) -> str | None:
    """The address a datagram was sent to, from IP_PKTINFO (struct in_pktinfo)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntoa(data[8:12])
    return None


def bind(address: str, port: int) -> socket.socket:
    """One listening socket (a group of one: a worker in a thread, the tests)."""
    return bind_workers(address, port, 1)[0]


def bind_workers(address: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker on the one port (SO_REUSEPORT), made before the workers
    fork: a port that is taken is one clear error, and a worker that dies and starts again
    finds its socket, with the requests that came meanwhile, kept by the supervisor."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(_listener(address, port))
            port = socks[0].getsockname()[1]  # port 0: the others join the first one's
        foreign = _sharers(address, port, {os.fstat(s.fileno()).st_ino for s in socks})
        if foreign:  # a program of our user that bound it with SO_REUSEPORT too
            raise OSError(errno.EADDRINUSE, "")
    except OSError as exc:
        for s in socks:
            s.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"TFTP port {address}:{port} is already in use "
                                     "(tftpd-hpa, dnsmasq's TFTP or another pxe-stage serve "
                                     "running?)") from None
        raise
    return socks


def _listener(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # ride out request bursts
        if address == "0.0.0.0":
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _sharers(address: str, port: int, ours: set[int]) -> list[int]:
    """Inodes of unconnected UDP sockets not ours that receive datagrams for address:port
    (/proc/net/udp and udp6 of our network namespace)."""
    wanted = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    wildcard = not any(wanted)
    found = []
    for table, words in (("udp", 1), ("udp6", 4)):
        try:
            with open(f"/proc/net/{table}") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "07":  # 07: not connected (TCP_CLOSE)
                continue
            hexaddr, _, hexport = fields[1].partition(":")
            if int(hexport, 16) != port or int(fields[9]) in ours:
                continue
            raw = struct.pack(f"={words}I", *(int(hexaddr[8 * k:8 * k + 8], 16)
                                               for k in range(words)))
            if wildcard or not any(raw) or raw in (wanted, _V4_MAPPED + wanted):
                found.append(int(fields[9]))
    return found
