"""Boot files over HTTP: GET/HEAD with Range, exact Content-Length, zero-copy sendfile.

The HTTP stack is Starlette on uvicorn (the one server framework; the REST API of issue 12
builds on it too). Starlette streams files in 64 KiB reads through a thread pool; for kernels,
initrds and root images we want the kernel to copy file pages straight to the socket. So:

- `BootFileResponse` sends the body with the ASGI "http.response.zerocopysend" extension when
  the server offers it (and falls back to plain reads when it does not, e.g. in-process tests);
- `ZeroCopyH11Protocol` is uvicorn's h11 protocol offering that extension (and
  "http.response.pathsend", which Starlette's own FileResponse uses). The body goes through
  h11 as a placeholder object whose len() is the byte count (h11's documented sendfile
  support, `send_with_data_passthrough`), and out through `loop.sendfile()`, i.e. sendfile(2).
Bodies up to SMALL_BODY (loader configs, small loaders) are read and written in one message:
measured (tools/bench_http.py, CPU per small GET), that is cheaper than the sendfile round trip.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import os
import re
import sqlite3
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio.to_thread
import h11
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from pxe.serve import files

log = logging.getLogger("dynprov.serve.http")

ZEROCOPY = "http.response.zerocopysend"
PATHSEND = "http.response.pathsend"
FALLBACK_CHUNK = 1 << 20
# Up to this many bytes a body is read and written in one message: the sendfile machinery
# (a pause of reading, two futures, a writer registration) costs more than copying 64 KiB.
SMALL_BODY = 64 << 10
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

TEXT_SUFFIXES = (".ipxe", ".cfg", ".lst", ".txt")
TEXT_TYPE = "text/plain; charset=utf-8"


# -- the response ----------------------------------------------------------------------------
def _parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """One byte range -> (first, last); None = serve the whole file; "416" = unsatisfiable.

    Several ranges or a malformed header are ignored (RFC 9110 lets a server ignore Range).
    """
    m = _RANGE.match(header.replace(" ", ""))
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first_s, last_s = m.groups()
    if not first_s:  # suffix: the last N bytes
        n = int(last_s)
        if n == 0:
            return "416"
        return (max(0, size - n), size - 1) if size else "416"
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        return "416"
    return first, min(last, size - 1)


@functools.lru_cache(maxsize=4096)
def _http_date(mtime: float) -> str:
    """Last-Modified of a file (cached: the same few files are asked for again and again)."""
    return email.utils.formatdate(mtime, usegmt=True)


class FileAnswer:
    """Status, byte span and headers of one boot file's answer (shared with pxe.serve.fastpath).

    ``status`` 200 (whole), 206 (one range), 304 (If-None-Match matched), 416 (unsatisfiable
    range); ``offset``/``count`` is the span of the file to send (0 bytes for 304/416).
    """

    __slots__ = ("status", "offset", "count", "headers")

    def __init__(self, st: os.stat_result, name: str, if_none_match: str | None,
                 range_header: str | None, if_range: str | None):
        size = st.st_size
        self.status, self.offset, self.count = 200, 0, size
        etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
        last_modified = _http_date(st.st_mtime)
        headers = {"accept-ranges": "bytes", "etag": etag, "last-modified": last_modified}
        self.headers = headers
        if if_none_match and {etag, "*"} & {t.strip() for t in if_none_match.split(",")}:
            self.status, self.count = 304, 0
            return
        rng = range_header
        if rng and if_range not in (None, etag, last_modified):
            rng = None  # the file changed since the client's first part: send it whole
        span = _parse_range(rng, size) if rng else None
        if span == "416":
            self.status, self.count = 416, 0
            headers["content-range"] = f"bytes */{size}"
            headers["content-length"] = "0"
            return
        if isinstance(span, tuple):
            first, last = span
            self.status, self.offset, self.count = 206, first, last - first + 1
            headers["content-range"] = f"bytes {first}-{last}/{size}"
        headers["content-type"] = (TEXT_TYPE if name.endswith(TEXT_SUFFIXES)
                                   else "application/octet-stream")
        headers["content-length"] = str(self.count)


class BootFileResponse(Response):
    """One open file (fd owned by the response) with Range, ETag and zero-copy send."""

    def __init__(self, fd: int, st: os.stat_result, name: str, request: Request):
        self.fd = fd
        self.size = st.st_size
        self.background = None
        req = request.headers
        answer = FileAnswer(st, name, req.get("if-none-match"), req.get("range"),
                            req.get("if-range"))
        self.status_code, self.offset, self.count = answer.status, answer.offset, answer.count
        self.init_headers(answer.headers)

    def init_headers(self, headers: Any = None) -> None:
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1"))
                            for k, v in (headers or {}).items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            if scope["method"] == "HEAD" or self.count == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif self.count <= SMALL_BODY:
                body = os.pread(self.fd, self.count, self.offset)
                if len(body) != self.count:
                    raise files.Missing("file shrank while being sent")
                await send({"type": "http.response.body", "body": body, "more_body": False})
            elif ZEROCOPY in scope.get("extensions", {}):
                with os.fdopen(self.fd, "rb", closefd=False) as fh:
                    await send({"type": ZEROCOPY, "file": fh, "offset": self.offset,
                                "count": self.count, "more_body": False})
            else:
                await self._send_by_reading(send)
        finally:
            os.close(self.fd)

    async def _send_by_reading(self, send: Send) -> None:
        off, end = self.offset, self.offset + self.count
        while off < end:
            chunk = await anyio.to_thread.run_sync(os.pread, self.fd,
                                                   min(FALLBACK_CHUNK, end - off), off)
            if not chunk:
                raise files.Missing("file shrank while being sent")
            off += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": off < end})


async def boot_file(request: Request) -> Response:
    """GET/HEAD /<path>: a file of the HTTP root (iPXE scripts, kernels, initrds, images)."""
    root: str = request.app.state.http_root
    name = request.path_params.get("path", "")
    try:
        text = _rendered(request, name)
        if text is not None:
            return Response(text, media_type="text/plain; charset=utf-8")
        fd, st, rel = files.open_file(root, name)
    except files.Missing:
        fill = getattr(request.app.state, "fill_missing", None)  # a service node's blob cache
        opened = await anyio.to_thread.run_sync(fill, name) if fill is not None else None
        if opened is None:
            return PlainTextResponse("not found\n", status_code=404)
        fd, st, rel = opened
    except files.Refused as exc:
        client = request.client.host if request.client else "?"
        log.warning("HTTP %s: %r refused: %s", client, name, exc)
        return PlainTextResponse("forbidden\n", status_code=403)
    return BootFileResponse(fd, st, rel, request)


def _rendered(request: Request, name: str) -> bytes | None:
    """A loader config rendered from the database (pxe.serve.bootconfigs), or None."""
    return rendered(getattr(request.app.state, "boot_configs", None), name)


def rendered(configs: Any, name: str) -> bytes | None:
    """The loader config ``name`` from ``configs`` (a BootConfigs or None), or None.

    Raises files.Refused/Missing for a bad name or a config of an unknown MAC.
    """
    if configs is None:
        return None
    rel = files.clean_name(name)
    if not configs.claims(rel):
        return None
    try:
        return configs.lookup(rel)
    except sqlite3.Error as exc:  # the file tree (if any) rather than no answer
        log.error("HTTP: %s: state database: %s", rel, exc)
        return None


# -- the server side of the extension -----------------------------------------------------
class _Span:
    """Stands for `count` file bytes inside h11: its len() is what h11 counts."""

    __slots__ = ("count",)

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count


class ZeroCopyH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, offering zerocopysend/pathsend to the app (sendfile(2))."""

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        # A new request made a new cycle whose task has not run yet: extend it now.
        if self.cycle is not None and self.cycle is not before:
            _extend(self.cycle, self.loop)


def _extend(cycle: RequestResponseCycle, loop: asyncio.AbstractEventLoop) -> None:
    cycle.scope["extensions"] = {**cycle.scope.get("extensions", {}), ZEROCOPY: {}, PATHSEND: {}}
    plain_send = cycle.send

    async def send(message: Message) -> None:
        kind = message["type"]
        if kind == ZEROCOPY:
            await _zerocopy(cycle, loop, plain_send, message["file"], message.get("offset"),
                            message.get("count"), bool(message.get("more_body", False)))
        elif kind == PATHSEND:
            with open(message["path"], "rb") as fh:
                await _zerocopy(cycle, loop, plain_send, fh, 0, None, False)
        else:
            await plain_send(message)  # type: ignore[arg-type]

    cycle.send = send  # type: ignore[method-assign]


async def _zerocopy(cycle: RequestResponseCycle, loop: asyncio.AbstractEventLoop,
                    plain_send: Callable[..., Awaitable[None]], fh: Any, offset: int | None,
                    count: int | None, more_body: bool) -> None:
    if not cycle.response_started or cycle.response_complete:
        raise RuntimeError(f"{ZEROCOPY} before http.response.start or after the end")
    if offset is None:
        offset = fh.tell()
    if count is None:
        count = os.fstat(fh.fileno()).st_size - offset
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if count > 0 and cycle.scope["method"] != "HEAD" and not cycle.disconnected:
        span = _Span(count)
        pieces = cycle.conn.send_with_data_passthrough(h11.Data(data=span))  # type: ignore[arg-type]
        try:
            for piece in pieces or ():
                if piece is span:
                    sent = await loop.sendfile(cycle.transport, fh, offset, count)
                    if sent != count:
                        raise ConnectionError(f"file ended after {sent} of {count} bytes")
                else:
                    cycle.transport.write(piece)
        except (ConnectionError, OSError) as exc:
            log.debug("HTTP: sendfile stopped: %s", exc)
            cycle.disconnected = True
            cycle.transport.close()
            return
    # The body is out; let uvicorn end the message (h11 has counted the bytes).
    await plain_send({"type": "http.response.body", "body": b"", "more_body": more_body})
