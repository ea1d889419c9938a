"""The virtual BMC is real IPMI: ipmitool (lanplus) and pyghmi's client both talk to it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_power_support import PASSWORD, USER, vbmc

from pxe.lab.machine import SimulatedMachine

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
