"""Request deadlines and a per-client connection cap for uvicorn's h11 protocol.

uvicorn times out only idle keep-alive connections *after* a response: a client that sends half
a request line, or headers and then half a body, holds its connection (and a slot of the
worker) forever. Found by a load run (issue 15): 50 half-sent requests were still open after
20 s with `http_timeout` 5 s. This protocol adds, per connection:

- a header deadline: the request line and headers must be complete within ``header_timeout``
  seconds of the connection (or of the previous response);
- a body idle deadline: while a request body is incomplete, no ``body_timeout`` seconds may pass
  without a byte arriving (an idle limit, not a total one: image uploads are GiBs). Time spent
  with reading paused by us (the app not consuming the body yet) does not count;
- a cap of ``max_per_client`` open connections per client address (per worker process); the
  next one gets `503` and is closed gracefully (refuse(): the answer, a FIN, and its request
  read and dropped until it closes; closing with the request unread made the kernel send a RST
  that destroyed the 503 in the client's receive queue: ECONNRESET for 500 simulated nodes
  booting at once, tests/test_serve_storm.py).
Used by `pxe-stage serve` (boot files) and the REST service (pxe/api/server.py), which also
bounds the TLS handshake by the same timeout (it happens before this protocol sees the
connection).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

log = logging.getLogger("dynprov.serve.http")

_REFUSAL_BODY = b"too many connections from this client\n"
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (len(_REFUSAL_BODY), _REFUSAL_BODY))


def refuse(transport: Any, loop: asyncio.AbstractEventLoop, linger: float) -> None:
    """Send the 503 and a FIN; the caller drops what the client sends. Closed when the client
    closes (eof_received) or after ``linger`` seconds, whichever comes first."""
    transport.write(REFUSAL)
    if transport.can_write_eof():
        transport.write_eof()
    loop.call_later(linger, transport.close)


def guarded(base: type, header_timeout: float, body_timeout: float, max_per_client: int,
            open_per_client: Counter[str] | None = None) -> type:
    """A subclass of uvicorn's ``base`` h11 protocol enforcing the deadlines and the cap.

    ``open_per_client``: the table of open connections per address, when shared with another
    protocol of this worker (pxe.serve.fastpath hands connections over).
    """
    if open_per_client is None:
        open_per_client = Counter()  # this worker process's connections per address

    class Guarded(base):  # type: ignore[misc, valid-type]
        _peer: str | None = None
        _timer: asyncio.TimerHandle | None = None
        _waiting_since = 0.0
        _last_data = 0.0
        _refused = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            peer = self.client[0] if self.client else "?"
            if open_per_client[peer] >= max_per_client:
                log.warning("HTTP %s: refused: more than %d connections", peer, max_per_client)
                self._refused = True
                refuse(transport, self.loop, header_timeout)
                return
            self._peer = peer
            open_per_client[peer] += 1
            self._waiting_since = self._last_data = time.monotonic()
            self._arm(header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._peer is not None:
                open_per_client[self._peer] -= 1
                if open_per_client[self._peer] <= 0:
                    del open_per_client[self._peer]
                self._peer = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # read and dropped: see refuse()
            self._last_data = time.monotonic()
            super().data_received(data)

        def eof_received(self) -> bool | None:
            if self._refused:
                return False  # the client read its 503 and closed: close our side too
            return super().eof_received()

        def on_response_complete(self) -> None:
            self._waiting_since = time.monotonic()  # the next request's headers are due
            super().on_response_complete()

        def _arm(self, delay: float) -> None:
            self._timer = self.loop.call_later(max(0.05, delay), self._check)

        def _check(self) -> None:
            self._timer = None
            if self._peer is None or self.transport.is_closing():
                return
            now = time.monotonic()
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # waiting for a request's headers
                left = header_timeout - (now - self._waiting_since)
                what = "request headers"
            elif cycle.more_body and not self.flow.read_paused:  # waiting for body bytes
                left = body_timeout - (now - self._last_data)
                what = "request body"
            else:  # the app is working or answering: not the client's fault
                self._last_data = now
                self._arm(min(header_timeout, body_timeout))
                return
            if left > 0:
                self._arm(left)
                return
            log.info("HTTP %s: closed: %s not received in time", self._peer, what)
            self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
