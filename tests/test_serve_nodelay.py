"""serve's HTTP sockets have Nagle off: a keep-alive response written as header + body must not
wait for the client's delayed ACK (~40 ms per iPXE script or small boot file)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pxe.serve import daemon

pytestmark = pytest.mark.unit


def test_accepted_http_connections_have_tcp_nodelay():
    listener = daemon.listen_tcp("127.0.0.1", 0)

    async def main() -> int:
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            got.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) != 0
