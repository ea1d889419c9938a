"""Strict input checks: what may reach a config, a path or an argv."""

import pytest

from pxe import validate
from pxe.errors import InputError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("given", ["AA-BB-CC-DD-EE-01", "aabb.ccdd.ee01", "AA:BB:CC:DD:EE:01",
                                   "aabbccddee01", " aa:bb:cc:dd:ee:01 "])
def test_mac_spellings_are_normalised(given):
    assert validate.mac(given) == "aa:bb:cc:dd:ee:01"


@pytest.mark.parametrize("bad", ["aa:bb:cc:dd:ee", "gg:bb:cc:dd:ee:ff", "aa:bb:cc:dd:ee:ff:00",
                                 "", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "a:b:c:d:e:f0",
                                 "aa:bb\n:cc:dd:ee:ff"])
def test_bad_macs_are_refused(bad):
    with pytest.raises(InputError, match="invalid MAC"):
        validate.mac(bad)


@pytest.mark.parametrize("bad", ["n/01", "..", "n 01", "n'01", 'n"1', "n\n1", "{{x}}", "-n1",
                                 "n1-", "", "a" * 64, "n.1", "n1\n"])
def test_bad_node_names(bad):
    with pytest.raises(InputError, match="invalid node name"):
        validate.hostname(bad)


@pytest.mark.parametrize("bad", ["a/b", "..", "a..b", ".hidden", "a b", "a'b", "{{x}}", "a\nb", "",
                                 "x" * 65])
def test_bad_labels(bad):
    with pytest.raises(InputError, match="invalid label"):
        validate.label(bad)


def test_good_labels():
    for good in ("centos5", "sles11", "rhel-8.6_hpc", "Debian12"):
        assert validate.label(good) == good


def test_ip_checks():
    assert validate.ipv4("10.0.0.1") == "10.0.0.1"
    for bad in ("10.0.0", "10.0.0.256", "1.2.3.4/24", "::1", "ten", "010.0.0.1 x"):
        with pytest.raises(InputError):
            validate.ipv4(bad)
    with pytest.raises(InputError, match="host bits"):
        validate.ipv4_network("10.0.0.1/24")


def test_cmdline_refuses_metacharacters():
    assert validate.cmdline("console=ttyS0,115200 quiet") == "console=ttyS0,115200 quiet"
    for bad in ("a\nb", "x={{y}}", "a;b", "$(reboot)", "a'b"):
        with pytest.raises(InputError):
            validate.cmdline(bad)


def test_secret_reference_is_not_a_password():
    assert validate.secret_ref("rack1") == "rack1"
    assert validate.secret_ref("file:/etc/dynprov/bmc/n001") == "file:/etc/dynprov/bmc/n001"
    for bad in ("pass word", "file:relative", "file:/etc/../shadow", "p@ss!"):
        with pytest.raises(InputError):
            validate.secret_ref(bad)


@pytest.mark.parametrize("name", ["eth0", "eno1np0", "eth0.100", "br_ib", "ib0", "bond0.4094",
                                  "enp0s31f6-prov"])
def test_everyday_interface_names_are_taken(name):
    assert validate.interface(name) == name


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "eth0/1", "eth0:1", "a" * 16, "eth 0",
                                 "-eth0", "eth0\n", "eth'0"])
def test_bad_interface_names_are_refused(bad):
    with pytest.raises(InputError, match="interface name"):
        validate.interface(bad)


def test_a_vlan_interface_is_a_valid_network_interface(tmp_path):
    """An admin's `interface = "eth0.100"` (a VLAN) loads; a path does not."""
    from pxe import config

    text = config.example(tmp_path, interface="eth0.100")
    (tmp_path / "site.toml").write_text(text)
    assert config.load(tmp_path / "site.toml").network.interface == "eth0.100"
    (tmp_path / "site.toml").write_text(text.replace("eth0.100", "../etc"))
    with pytest.raises(InputError, match="interface"):
        config.load(tmp_path / "site.toml")
