"""The [power] section is checked key by key; every complaint names the key."""

from __future__ import annotations

import pytest
from test_power_support import power_config

from pxe.errors import InputError
from pxe.power import settings
from pxe.power.settings import soft_off_argv

pytestmark = pytest.mark.unit


def test_defaults(site):
    s = settings.load(site.cfg)
    assert (s.workers, s.timeout, s.retries, s.wol_port) == (64, 5.0, 2, 9)
    assert s.wol_broadcast == "198.18.0.255"  # the provisioning subnet's broadcast address
    assert s.soft_off_command is None and s.ipmi_cipher_suite == 3


@pytest.mark.parametrize("key,value,words", [
    ("workers", 0, "power.workers"), ("workers", "8", "power.workers"),
    ("timeout", -1, "power.timeout"), ("retries", 11, "power.retries"),
    ("wol_port", 70000, "power.wol_port"), ("wol_broadcast", "10.0.0.300", "power.wol_broadcast"),
    ("soft_off_command", "ssh {ip} poweroff", "power.soft_off_command"),
    ("soft_off_command", ["{ip}"], "power.soft_off_command"),
    ("ipmi_cipher_suite", 2, "power.ipmi_cipher_suite"),
    ("redfish_scheme", "ftp", "power.redfish_scheme"), ("fanout", 3, "power.fanout"),
])
def test_bad_values_name_the_key(site, key, value, words):
    power_config(site, **{key: value})
    with pytest.raises(InputError, match=words) as exc:
        settings.load(site.cfg)
    assert str(site.config_path) in str(exc.value)


def test_overrides_are_checked_too(site):
    s = settings.load(site.cfg)
    assert s.with_overrides(workers=4, timeout=1, retries=0).workers == 4
    with pytest.raises(InputError, match="power.workers"):
        s.with_overrides(workers=0)


def test_soft_off_argv_substitution():
    argv = ("ssh", "root@{ip}", "echo {node} {ip}")
    assert soft_off_argv(argv, "n1", "10.0.0.1") == ["ssh", "root@10.0.0.1", "echo n1 10.0.0.1"]
    with pytest.raises(InputError, match="no IP"):
        soft_off_argv(argv, "n1", None)


def test_importing_power_stays_light():
    """The scheduler polls commands that may import pxe.power: no pyghmi, sushy, cryptography."""
    import subprocess
    import sys

    code = ("import sys, pxe.power, pxe.power.fanout, pxe.power.ipmi, pxe.power.rmcp, "
            "pxe.cli.power\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pyghmi', 'sushy', 'cryptography', 'requests'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_ipmi_wire_format_known_bytes():
    from pxe.power import rmcp

    # Get Channel Authentication Capabilities, as ipmitool sends it (rqSeq 0).
    assert rmcp.auth_capabilities_request(0).hex() == (
        "0600ff07" "00" "00000000" "00000000" "09" "2018c8" "81" "00" "38" "8e04" "b5")
    # A reply: rqAddr, netFn 7 (response to 6), checksum, rsAddr, seq, command, code, data, sum.
    msg = bytes.fromhex("811c632000380001") + bytes([(-sum(b"\x20\x00\x38\x00\x01")) & 0xFF])
    parsed = rmcp.parse_ipmi_response(msg)
    assert parsed is not None and parsed[2] == 0x38 and parsed[3].code == 0
    assert rmcp.parse_ipmi_response(msg[:-1] + b"\x00") is None  # bad checksum refused


def test_session_aes_is_cbc_with_the_ipmi_pad():
    # Our CBC (chained over one AES block context a session) against cryptography's own CBC, both
    # ways, for every payload length a packet can have (0-47 bytes: 1 to 3 blocks).
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from pxe.power import rmcp

    key = bytes(range(16))
    aes = rmcp._Aes(key)
    for size in range(48):
        plain = bytes((7 * i + size) & 0xFF for i in range(size))
        blob = aes.encrypt(plain)
        assert len(blob) % 16 == 0 and len(blob) >= 32
        dec = Cipher(algorithms.AES(key), modes.CBC(blob[:16])).decryptor()
        padded = dec.update(blob[16:]) + dec.finalize()
        pad = padded[-1]
        assert padded == plain + bytes(range(1, pad + 1)) + bytes([pad])
        iv = bytes([size]) * 16
        enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        assert aes.decrypt(iv + enc.update(padded) + enc.finalize()) == plain
        assert aes.decrypt(blob) == plain
    assert aes.decrypt(b"\x00" * 31) is None  # shorter than IV + one block
