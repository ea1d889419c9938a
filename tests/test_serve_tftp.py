"""serve's TFTP: real transfers on 127.0.0.1 with real clients (curl tftp://, tftpy's client) and
a raw UDP client for everything a real client would never send."""

from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path

import pytest
import tftpy
from test_serve_support import (
    LOOPBACK,
    RawClient,
    TftpError,
    curl_tftp,
    put,
    tftp_thread,
    wait_for,
)

pytestmark = pytest.mark.integration

REQ = "dynprov_tftp_requests_total"
END = "dynprov_tftp_transfers_total"


@pytest.fixture
def root(site) -> Path:
    root = site.cfg.paths.tftp_root
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def blob(root: Path) -> bytes:
    data = os.urandom(300_000)
    put(root, "pxelinux.0", data)
    return data


@pytest.mark.parametrize("blksize", [None, 512, 1468, 65464])
def test_curl_downloads_at_each_blksize(site, root, blob, tmp_path, blksize):
    out = tmp_path / "out"
    with tftp_thread(site) as srv:
        proc = curl_tftp(srv.port, "pxelinux.0", out, blksize)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == blob
        srv.wait_idle()
        assert srv.count(END, "complete") == 1
        assert srv.count("dynprov_tftp_bytes_total") == len(blob)


def test_tftpy_client_with_tsize_and_blksize(site, root, blob, tmp_path):
    with tftp_thread(site) as srv:
        client = tftpy.TftpClient(LOOPBACK, srv.port, options={"blksize": 1408, "tsize": 0})
        client.download("pxelinux.0", str(tmp_path / "out"), timeout=5)
        assert (tmp_path / "out").read_bytes() == blob


def test_oack_carries_what_the_server_accepted(site, root, blob):
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        data, acked = c.download("pxelinux.0", blksize=1432, tsize=0, timeout=3)
        assert data == blob
        assert acked == {"blksize": "1432", "tsize": str(len(blob)), "timeout": "3"}


@pytest.mark.parametrize("window", [4, 16])
def test_windowsize_rfc7440(site, root, blob, window):
    """OVMF asks for windowsize 4: the server sends a window of blocks per ACK."""
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        c.request("pxelinux.0", blksize=1468, windowsize=window)
        opcode, rest = c.recv()
        assert opcode == 6 and b"windowsize\0" + str(window).encode() in rest
        c.ack(0)
        blocks = [struct.unpack("!H", c.recv()[1][:2])[0] for _ in range(window)]
        assert blocks == list(range(1, window + 1))  # all before any further ACK
        assert c.nothing_within(0.3)


def test_window_restarts_after_an_ack_inside_it(site, root, blob):
    """A client that lost block 3 of 1-4 ACKs 2: the next window starts at 3 (RFC 7440)."""
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        c.request("pxelinux.0", blksize=512, windowsize=4)
        assert c.recv()[0] == 6
        c.ack(0)
        for _ in range(4):
            c.recv()
        c.ack(2)
        blocks = [struct.unpack("!H", c.recv()[1][:2])[0] for _ in range(4)]
        assert blocks == [3, 4, 5, 6]


def test_block_numbers_roll_over(site, root):
    """More than 65535 blocks: block numbers wrap to 0 and the file still arrives whole."""
    data = os.urandom(70_000 * 8 + 3)
    put(root, "big.bin", data)
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        got, acked = c.download("big.bin", blksize=8, windowsize=64)
        assert acked["windowsize"] == "64"
        assert got == data


def test_netascii_converts_line_ends(site, root):
    put(root, "text.cfg", b"a\nb\rc\r\n")
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        got, _ = c.download("text.cfg", mode="netascii")
        assert got == b"a\r\nb\r\0c\r\0\r\n"


def test_write_request_is_refused(site, root):
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        c.request("upload.bin", opcode=2)
        opcode, rest = c.recv()
        assert opcode == 5 and struct.unpack("!H", rest[:2])[0] == 2  # access violation
        assert c.nothing_within(0.3)  # and no ACK 0: nothing will be written
        assert not (root / "upload.bin").exists()
        assert srv.count(REQ, "write_refused") == 1


@pytest.mark.parametrize("name", ["../secret", "pxelinux.cfg/../../secret", "..\\secret",
                                  "a/./../../secret"])
def test_dotdot_is_refused(site, root, name):
    (root.parent / "secret").write_text("do not serve")
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        with pytest.raises(TftpError) as err:
            c.download(name)
        assert err.value.code == 2
        assert srv.count(REQ, "refused") == 1


def test_absolute_paths_stay_inside_the_root(site, root, blob):
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        with pytest.raises(TftpError) as err:
            c.download("/etc/passwd")
        assert err.value.code == 1  # <root>/etc/passwd: not found
        data, _ = c.download("/pxelinux.0")  # GRUB asks with a leading '/'
        assert data == blob


def test_symlink_out_of_the_root_is_refused(site, root, blob, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    outside.chmod(0o644)
    (root / "escape").symlink_to(outside)
    (root / "dir").mkdir()
    (root / "dir" / "up").symlink_to(tmp_path)
    (root / "inside").symlink_to(root / "pxelinux.0")
    with tftp_thread(site) as srv:
        for name in ("escape", "dir/up/outside.txt"):
            with RawClient(srv.port) as c, pytest.raises(TftpError) as err:
                c.download(name)
            assert err.value.code == 2, name
        with RawClient(srv.port) as c:
            assert c.download("inside")[0] == blob  # a link that stays inside is fine


def test_only_world_readable_regular_files(site, root):
    put(root, "private.key", b"k", mode=0o600)
    (root / "adir").mkdir()
    with tftp_thread(site) as srv:
        for name, code in (("private.key", 2), ("adir", 1), (".hidden", 1), ("missing", 1)):
            with RawClient(srv.port) as c, pytest.raises(TftpError) as err:
                c.download(name)
            assert err.value.code == code, name


def test_unknown_option_is_ignored(site, root, blob):
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        data, acked = c.download("pxelinux.0", blksize=1024, multicast="", frobnicate=7)
        assert data == blob
        assert acked == {"blksize": "1024"}


@pytest.mark.parametrize("value,expect", [("99999999999999999999", "65464"), ("70000", "65464"),
                                          ("0", None), ("7", None), ("-5", None), ("lots", None)])
def test_absurd_blksize(site, root, blob, value, expect):
    """Too big: our maximum (RFC 2348 lets the server answer smaller); invalid: ignored."""
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        data, acked = c.download("pxelinux.0", blksize=value)
        assert data == blob
        assert acked.get("blksize") == expect


def test_unsupported_mode(site, root, blob):
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        with pytest.raises(TftpError) as err:
            c.download("pxelinux.0", mode="mail")
        assert err.value.code == 4


def test_duplicate_acks_are_not_answered(site, root, blob):
    """Sorcerer's Apprentice: a repeated ACK must not make the server send a block twice."""
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        c.request("pxelinux.0")
        assert c.recv()[1][:2] == b"\x00\x01"
        for _ in range(3):
            c.ack(1)
        assert c.recv()[1][:2] == b"\x00\x02"
        assert c.nothing_within(0.3)  # exactly one block 2
        assert srv.count("dynprov_tftp_retransmits_total") == 0


def test_out_of_order_acks_are_ignored(site, root, blob):
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        c.request("pxelinux.0")
        c.recv()
        c.ack(1)
        assert c.recv()[1][:2] == b"\x00\x02"
        c.ack(40)  # for a block never sent
        c.ack(0)  # long past
        assert c.nothing_within(0.3)
        c.ack(2)
        assert c.recv()[1][:2] == b"\x00\x03"


def test_unacknowledged_block_is_sent_again_then_dropped(site, root, blob):
    with tftp_thread(site, timeout=0.2, retries=2) as srv, RawClient(srv.port) as c:
        c.request("pxelinux.0")
        copies = 0
        for _ in range(10):
            if c.nothing_within(2.0):
                break
            copies += 1
        assert copies == 3  # first send + 2 retries, then the server gives up
        srv.wait_idle()
        assert srv.count(END, "timeout") == 1


def test_vanished_client_frees_its_slot(site, root, blob, tmp_path):
    """With one slot, a second client is turned away while a vanished first client holds it,
    and is served once that transfer has timed out."""
    with tftp_thread(site, max_transfers=1, timeout=1.0, retries=2) as srv:
        gone = RawClient(srv.port)
        gone.request("pxelinux.0")
        gone.recv()  # block 1; this client now says nothing more
        with RawClient(srv.port) as waiting:
            waiting.request("pxelinux.0")
            wait_for(lambda: srv.count(REQ, "busy") == 1, "second request dropped")
            assert srv.count(REQ, "started") == 1
        srv.wait_idle()
        gone.close()
        assert srv.count(END, "timeout") == 1
        proc = curl_tftp(srv.port, "pxelinux.0", tmp_path / "out")
        assert proc.returncode == 0 and (tmp_path / "out").read_bytes() == blob


def test_client_error_ends_the_transfer(site, root, blob):
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        c.request("pxelinux.0", blksize=999999)
        assert c.recv()[0] == 6
        c.send_to_tid(struct.pack("!HH", 5, 8) + b"blksize refused\0")  # RFC 2347 reject
        srv.wait_idle()
        assert srv.count(END, "aborted") == 1


def test_repeated_request_does_not_start_a_second_transfer(site, root, blob):
    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        c.request("pxelinux.0", blksize=1024)
        c.recv()
        c.request("pxelinux.0", blksize=1024)  # as if our OACK had been lost
        assert c.recv()[0] == 6
        assert len(srv.worker.transfers) == 1


def test_repeat_arriving_after_the_data_started_is_ignored(site, root, blob):
    """In a storm the repeat waits in the queue behind the first request: by the time it is
    read the client has our OACK and the data flows. Neither a second transfer nor a resend."""
    with tftp_thread(site, timeout=5.0) as srv, RawClient(srv.port) as c:  # no resend by timeout
        c.request("pxelinux.0", tsize=0)
        assert c.recv()[0] == 6
        c.ack(0)
        first = c.recv()
        assert first[0] == 3 and first[1][:2] == b"\0\1"
        for _ in range(3):
            c.request("pxelinux.0", tsize=0)
        wait_for(lambda: srv.count(REQ, "duplicate") == 3, "the repeats read")
        assert len(srv.worker.transfers) == 1
        assert c.nothing_within(0.3)  # block 1 is not sent again for a repeat
        assert first[1][2:] + c.finish(1) == blob
        assert srv.count(REQ, "started") == 1


def test_random_malformed_packets_then_a_good_transfer(site, root, blob, tmp_path):
    """10,000 random datagrams at the TFTP port and at a transfer's port; serving goes on."""
    rng = random.Random(4242)
    with tftp_thread(site) as srv:
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        junk.bind((LOOPBACK, 0))
        with junk, RawClient(srv.port) as c:
            c.request("pxelinux.0")
            c.recv()  # a live transfer whose port also gets junk (from its own client)
            for i in range(10_000):
                kind = i % 4
                if kind == 0:
                    data = rng.randbytes(rng.randrange(0, 600))
                elif kind == 1:  # opcode-shaped, broken body
                    data = struct.pack("!H", rng.randrange(0, 8)) + rng.randbytes(rng.randrange(0, 40))
                elif kind == 2:  # request-shaped: no terminators, odd options, bad bytes
                    data = (struct.pack("!H", rng.choice((1, 2))) + rng.randbytes(rng.randrange(1, 64))
                            + rng.choice((b"", b"\0", b"\0octet", b"\0octet\0blksize\0")))
                else:  # junk from the client itself at its transfer's port
                    data = rng.randbytes(rng.randrange(0, 40))
                    if len(data) >= 4 and data[0] == 0 and 1 <= data[1] <= 6:
                        data = b"\xff" + data[1:]  # a well-formed TFTP packet is not junk
                    c.send_to_tid(data)
                    continue
                junk.sendto(data, (LOOPBACK, srv.port))
            assert srv.worker.transfers  # the live transfer survived its junk
        assert srv.count("dynprov_tftp_malformed_packets_total") > 0
        proc = curl_tftp(srv.port, "pxelinux.0", tmp_path / "out", 1468)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "out").read_bytes() == blob


def test_file_replaced_during_transfer_keeps_the_old_version(site, root, blob):
    """pxe.atomic renames a new version in: a running transfer finishes the old one."""
    from pxe import atomic

    with tftp_thread(site) as srv, RawClient(srv.port) as c:
        c.request("pxelinux.0")
        first = c.recv()[1][2:]
        atomic.write_bytes(root / "pxelinux.0", b"new" * 1000)
        rest = first + c.finish(1)
        assert rest == blob


def test_first_transfer_fills_the_cache_later_ones_use_it(site, root, tmp_path):
    data = os.urandom(1_500_000)  # several read chunks
    put(root, "kernel", data)
    with tftp_thread(site) as srv:
        assert srv.worker.cache.used == 0
        for _ in range(2):
            with RawClient(srv.port) as c:
                assert c.download("kernel", blksize=1468)[0] == data
            wait_for(lambda: srv.worker.cache.used == len(data), "file cached at the end")


def test_without_a_cache_files_are_read_as_they_go(site, root):
    data = os.urandom(700_000)
    put(root, "kernel", data)
    with tftp_thread(site, tftp_cache_mb=0) as srv:
        with RawClient(srv.port) as c:
            assert c.download("kernel", blksize=1024, windowsize=8)[0] == data
        srv.wait_idle()
        wait_for(lambda: srv.count(END, "complete") == 1, "transfer ended")
        assert srv.worker.cache.used == 0
