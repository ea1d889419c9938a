"""serve's TFTP workers as `pxe-stage serve` runs them (several processes, real UDP on
127.0.0.1): a client's repeated request reaches the worker serving it, whichever worker that is,
so it never starts a second transfer; a second port of the same address is a second client."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from test_serve_support import LOOPBACK, RawClient, put, serve_process, serve_section, wait_for

pytestmark = pytest.mark.integration

WORKERS = 4
REPEATS = 6  # with one worker busy and three idle, the code before took every repeat elsewhere
STARTED = 'dynprov_tftp_requests_total{result="started"}'
DUPLICATE = 'dynprov_tftp_requests_total{result="duplicate"}'
COMPLETE = 'dynprov_tftp_transfers_total{result="complete"}'


def _rest(c: RawClient, acked: int) -> bytes:
    """Lock-step to the end from block ``acked`` + 1 (blksize 512); every packet must come from
    the transfer's port. A late OACK or a block sent again (the server's timeout on a busy
    machine) is skipped, as a real client would."""
    tid = c.tid
    rest = bytearray()
    expect = acked + 1
    c.ack(acked)
    for _ in range(20_000):
        opcode, payload = c.recv()
        assert c.tid == tid, f"a packet from a second transfer port {c.tid} (first {tid})"
        if opcode == 6:
            continue
        assert opcode == 3, f"opcode {opcode}"
        block = struct.unpack("!H", payload[:2])[0]
        if block != expect:
            continue
        rest += payload[2:]
        c.ack(block)
        if len(payload) - 2 < 512:
            return bytes(rest)
        expect += 1
    raise AssertionError("transfer did not end")


def test_repeated_request_is_one_transfer_across_workers(site):
    data = os.urandom(100_000)
    put(site.cfg.paths.tftp_root, "pxelinux.0", data)
    with serve_process(site, tftp_workers=WORKERS, http_workers=1) as srv, \
            RawClient(srv.tftp_port) as c, RawClient(srv.tftp_port) as second:
        c.request("pxelinux.0", tsize=0)
        assert c.recv()[0] == 6
        tid = c.tid
        for _ in range(REPEATS):  # our OACK came late: the client asks again, same port
            c.request("pxelinux.0", tsize=0)
            opcode, rest = c.recv()
            assert (opcode, c.tid) == (6, tid), "the repeat was answered by a second transfer"
            assert rest == f"tsize\0{len(data)}\0".encode()
        c.ack(0)
        opcode, payload = c.recv()
        assert opcode == 3 and c.tid == tid
        for _ in range(REPEATS):  # a repeat still queued when the data flows: ignored
            c.request("pxelinux.0", tsize=0)
        got = payload[2:] + _rest(c, 1)  # nothing from a second port
        assert got == data
        m = wait_for(lambda: (m := srv.metrics())[COMPLETE] == 1
                     and m[DUPLICATE] == 2 * REPEATS and m, "the transfer ends, repeats counted")
        assert m[STARTED] == 1

        # the same address from another port: another client (RFC 1350 TID), another transfer
        second.request("pxelinux.0", tsize=0)
        assert second.recv()[0] == 6 and second.tid != tid
        assert _rest(second, 0) == data
        m = wait_for(lambda: (m := srv.metrics())[COMPLETE] == 2 and m, "the second ends")
        assert m[STARTED] == 2


def test_many_clients_each_get_one_transfer(site):
    """32 clients, each repeating its request 3 times before it answers: 32 transfers, each
    whole, however the kernel spreads the clients over the workers."""
    data = os.urandom(20_000)
    put(site.cfg.paths.tftp_root, "ldlinux.c32", data)
    with serve_process(site, tftp_workers=WORKERS, http_workers=1) as srv:
        clients = [RawClient(srv.tftp_port) for _ in range(32)]
        try:
            for _ in range(3):
                for c in clients:
                    c.request("ldlinux.c32", tsize=0)
            for c in clients:
                assert c.recv()[0] == 6
                tid = c.tid
                for _ in range(2):  # the answers to the repeats: the same OACK, same port
                    assert c.recv()[0] == 6 and c.tid == tid
                assert _rest(c, 0) == data
        finally:
            for c in clients:
                c.close()
        m = wait_for(lambda: (m := srv.metrics())[COMPLETE] == 32 and m[DUPLICATE] == 64
                     and m, "all transfers end, repeats counted")
        assert m[STARTED] == 32


def test_a_port_shared_with_another_program_is_refused(site):
    """The workers' sockets share their port (SO_REUSEPORT): a program of the same user that
    holds it the same way would silently get part of the requests, so serve refuses to start."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        serve_section(site, tftp_address=LOOPBACK, tftp_port=port, http=False)
        proc = site.run("serve")
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen for TFTP on 127.0.0.1:{port}" in proc.stderr
    assert "already in use" in proc.stderr
