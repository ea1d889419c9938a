"""The virtual BMC is real IPMI: ipmitool (lanplus) and pyghmi's client both talk to it."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from test_power_support import PASSWORD, USER, vbmc

from lab import vbmc as vbmc_module
from lab.machine import SimulatedMachine
from pxe.power import ipmi as ipmi_actions
from pxe.power import rmcp

pytestmark = pytest.mark.integration
needs_ipmitool = pytest.mark.skipif(shutil.which("ipmitool") is None, reason="needs ipmitool")


def ipmitool(port: int, *args: str, password: str = PASSWORD, user: str = USER,
             retries: int = 2) -> subprocess.CompletedProcess:
    # The password goes through the environment (-E), never the command line.
    env = {**os.environ, "IPMI_PASSWORD": password}
    return subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port),
                           "-U", user, "-E", "-R", str(retries), "-N", "1", *args],
                          capture_output=True, text=True, env=env, timeout=60)


@needs_ipmitool
def test_ipmitool_power_and_bootdev_with_uefi_flag(tmp_path: Path):
    with vbmc(tmp_path, "v[1-2]", 2) as bmc:
        port = bmc.base_port
        out = ipmitool(port, "chassis", "power", "status")
        assert out.returncode == 0, out.stderr
        assert "Chassis Power is off" in out.stdout
        assert ipmitool(port, "chassis", "power", "on").returncode == 0
        assert "Chassis Power is on" in ipmitool(port, "chassis", "power", "status").stdout
        out = ipmitool(port, "chassis", "bootdev", "pxe", "options=efiboot")
        assert out.returncode == 0, out.stderr
        out = ipmitool(port, "chassis", "bootparam", "get", "5")
        assert "Force PXE" in out.stdout and "BIOS EFI boot" in out.stdout
        # The second BMC was not touched.
        assert "Chassis Power is off" in ipmitool(port + 1, "chassis", "power",
                                                  "status").stdout
        sets = [e for e in bmc.events() if e["event"] == "set-boot"]
        assert sets[-1]["bmc"] == "v1" and sets[-1]["device"] == "network"
        assert sets[-1]["efi"] is True and sets[-1]["persistent"] is False
        # A cycle uses the one-time override: the valid bit reads back clear.
        assert ipmitool(port, "chassis", "power", "cycle").returncode == 0
        assert "Boot Flag Invalid" in ipmitool(port, "chassis", "bootparam", "get", "5").stdout


@needs_ipmitool
def test_ipmitool_password_from_file_and_wrong_password(tmp_path: Path):
    with vbmc(tmp_path, "v1", 1) as bmc:
        port = bmc.base_port
        pwfile = tmp_path / "ipmi-pw"
        pwfile.write_text(PASSWORD + "\n")
        pwfile.chmod(0o600)
        out = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port),
                              "-U", USER, "-f", str(pwfile), "chassis", "power", "status"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "off" in out.stdout
        bad = ipmitool(port, "chassis", "power", "status", password="wrong-one")
        assert bad.returncode != 0
        unknown = ipmitool(port, "chassis", "power", "status", user="mallory")
        assert unknown.returncode != 0
        assert any(e["event"] == "login-refused" for e in bmc.events())


def test_pyghmi_client_interoperates(tmp_path: Path):
    """pyghmi's client proposes suite 17 first; the fixed server says 0x11 and it falls back."""
    from pyghmi.ipmi import command

    with vbmc(tmp_path, "p[1-2]", 2) as bmc:
        port = bmc.base_port
        c = command.Command("127.0.0.1", USER, PASSWORD, port=port)
        assert c.get_power()["powerstate"] == "off"
        c.set_power("on", wait=False)
        assert c.get_power()["powerstate"] == "on"
        c.set_bootdev("network", persist=False, uefiboot=True)
        boot = c.get_bootdev()
        assert boot["bootdev"] == "network" and boot["uefimode"] is True
        assert boot["persistent"] is False
        sets = [e for e in bmc.events() if e["event"] == "set-boot"]
        assert sets[-1]["efi"] is True and sets[-1]["raw"][0] == 0xA0  # valid | EFI


def test_pyghmi_wrong_password_is_refused(tmp_path: Path):
    from pyghmi import exceptions
    from pyghmi.ipmi import command

    with vbmc(tmp_path, "w1", 1) as bmc:
        with pytest.raises(exceptions.IpmiException, match="password"):
            command.Command("127.0.0.1", USER, "not-it",
                            port=bmc.base_port).get_power()


@needs_ipmitool
def test_many_bmcs_over_several_processes_and_drop_first(tmp_path: Path):
    with vbmc(tmp_path, "m[01-12]", 12, processes=3, drop_first=2) as bmc:
        base = bmc.base_port
        for port in (base, base + 5, base + 11):  # ipmitool retransmits past the drops
            out = ipmitool(port, "chassis", "power", "status", retries=6)
            assert out.returncode == 0 and "off" in out.stdout, out.stderr
        dropped = {e["bmc"] for e in bmc.events() if e["event"] == "dropped"}
        assert dropped == {"m01", "m06", "m12"}


@pytest.mark.unit
def test_simulated_machine_next_boot_is_used_once():
    m = SimulatedMachine("n1", persistent_device="disk")
    m.set_boot_device("network")
    assert m.boot_device() == ("network", False)
    m.power_on()
    assert [b.device for b in m.boots] == ["network"]
    assert m.boot_device() == ("disk", True)
    m.reset()
    assert [b.device for b in m.boots] == ["network", "disk"]
    m.power_off()
    m.reset()  # a node that is off stays off
    assert m.power_state() == "off" and len(m.boots) == 2
    with pytest.raises(ValueError):
        m.set_boot_device("cdrom")  # type: ignore[arg-type]


@needs_ipmitool
def test_cipher_suite_17_with_ipmitool_and_pyghmi(tmp_path: Path):
    """Suite 17 (HMAC-SHA256) when the BMC offers it: two independent clients agree."""
    from pyghmi.ipmi import command

    with vbmc(tmp_path, "t[1-2]", 2, cipher_suites=(3, 17)) as bmc:
        port = bmc.base_port
        for suite in ("3", "17"):
            out = ipmitool(port, "-C", suite, "chassis", "power", "status")
            assert out.returncode == 0 and "off" in out.stdout, (suite, out.stderr)
        listed = ipmitool(port, "channel", "getciphers", "ipmi").stdout
        assert "hmac_sha256" in listed and "hmac_sha1" in listed
        c = command.Command("127.0.0.1", USER, PASSWORD, port=port + 1)
        assert c.get_power()["powerstate"] == "off"
        assert c.ipmi_session.integrityalgo == 256  # pyghmi stayed on SHA-256


def _presession(ptype: int, payload: bytes) -> bytes:
    return rmcp.RMCP + bytes([0x06, ptype]) + b"\x00" * 8 + struct.pack("<H", len(payload)) + payload


def _payload(sock: socket.socket, ptype: int) -> bytes:
    for _ in range(10):
        pkt = sock.recv(4096)
        if len(pkt) > 16 and pkt[5] & 0x3F == ptype:
            return pkt[16:]
    raise AssertionError(f"no payload type 0x{ptype:02x}")


@pytest.mark.parametrize("spacing", ["back-to-back", "after-the-answer"])
def test_resent_open_session_request_keeps_its_session_and_rakp2_verifies(tmp_path: Path,
                                                                         spacing: str):
    """A resent Open Session Request (same bytes) gets the same session id, and RAKP2 is signed
    for the id the client holds (pyghmi switched ids: "wrong password (RAKP2 check)")."""
    with vbmc(tmp_path, "r1", 1) as bmc:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5.0)
        sock.connect(("127.0.0.1", bmc.base_port))
        try:
            sidm = os.urandom(4)
            open_rq = _presession(0x10, bytes([1, 0, 0, 0]) + sidm + bytes(
                [0, 0, 0, 8, 1, 0, 0, 0, 1, 0, 0, 8, 1, 0, 0, 0, 2, 0, 0, 8, 1, 0, 0, 0]))
            ids = []
            if spacing == "back-to-back":
                sock.send(open_rq)
                sock.send(open_rq)
                ids = [_payload(sock, 0x11)[8:12] for _ in range(2)]
            else:
                for _ in range(2):
                    sock.send(open_rq)
                    ids.append(_payload(sock, 0x11)[8:12])
            assert ids[0] == ids[1]
            sidc, rm, role, user = ids[0], os.urandom(16), 0x14, USER.encode()
            rakp1 = _presession(0x12, bytes([2, 0, 0, 0]) + sidc + rm
                                + bytes([role, 0, 0, len(user)]) + user)
            sock.send(rakp1)
            first = _payload(sock, 0x13)
            sock.send(rakp1)  # a resent RAKP1 gets the same RAKP2
            assert _payload(sock, 0x13) == first
            assert first[1] == 0 and first[4:8] == sidm
            rc, guid, code = first[8:24], first[24:40], first[40:60]
            expect = hmac.new(PASSWORD.encode(), sidm + sidc + rm + rc + guid
                              + bytes([role, len(user)]) + user, hashlib.sha1).digest()
            assert hmac.compare_digest(code, expect)
            # A RAKP1 for a session id this BMC did not hand out: "invalid session ID".
            sock.send(_presession(0x12, bytes([3, 0, 0, 0]) + b"\x01\x02\x03\x04" + rm
                                  + bytes([role, 0, 0, len(user)]) + user))
            assert _payload(sock, 0x13)[1] == 0x02
        finally:
            sock.close()


def test_vbmc_socket_io_never_changes_a_sockets_blocking_mode():
    """pyghmi flipped each shared socket's mode per call; a flip between the I/O thread's
    setblocking(0) and its read left the read blocked: the whole process deaf."""
    import pyghmi.ipmi.private.session as ipmisession

    getattr(vbmc_module, "quiet_io", lambda: None)()  # what ``serve`` sets up first
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        a.setblocking(False)
        b.setblocking(True)
        ipmisession._io_sendto(a, b"ping", b.getsockname())
        assert a.getblocking() is False
        assert ipmisession._io_recvfrom(b, 100)[0] == b"ping"
        assert ipmisession._io_recvfrom(b, 100) is None  # empty: returns, does not block
        assert b.getblocking() is True
    finally:
        a.close()
        b.close()


def test_vbmc_processes_keep_answering_many_sessions(tmp_path: Path):
    """Rounds of 256 concurrent logins into 2 processes, no retries: not one node is lost.
    Before the I/O and login fixes, a round now and then lost all of a process's nodes at once
    (deaf) or some logins ("wrong password"); this caught it in about half the runs."""
    with vbmc(tmp_path, "l[1-256]", 256, processes=2) as bmc:
        for _ in range(10):
            out: list[rmcp.Outcome] = []
            targets = [rmcp.Target(key=str(i), host="127.0.0.1", port=bmc.base_port + i,
                                   user=USER, password=PASSWORD, action=ipmi_actions.status,
                                   privilege=rmcp.PRIV_USER) for i in range(256)]
            rmcp.Engine(timeout=5.0, retries=0, window=256, done=out.append).run(targets)
            failed = [o for o in out if not o.ok]
            assert len(out) == 256 and not failed, (len(failed), failed[:3])
