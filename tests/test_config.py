"""The site config: every mistake is one line naming the file and the key."""

import pytest

from pxe import config
from pxe.errors import InputError

pytestmark = pytest.mark.unit


def write(tmp_path, text):
    path = tmp_path / "dynprov.toml"
    path.write_text(text)
    return path


def test_example_loads(tmp_path):
    cfg = config.load(write(tmp_path, config.example(tmp_path)))
    assert cfg.network.subnet == "198.18.0.0/24"
    assert cfg.dhcp.backend == "dnsmasq"
    assert cfg.paths.state_dir == tmp_path / "state"
    # iPXE over HTTP by default: TFTP carries only the first loader, iPXE itself.
    assert cfg.boot.ipxe_http and cfg.boot.write_files is False
    assert (cfg.boot.bios_loader, cfg.boot.uefi_loader) == ("undionly.kpxe", "ipxe.efi")
    tftp_only = config.load(write(tmp_path, config.example(tmp_path) + "[boot]\nipxe_http = false\n"))
    assert (tftp_only.boot.bios_loader, tftp_only.boot.uefi_loader) == ("pxelinux.0", "grubx64.efi")


def test_env_variable_is_used(tmp_path, monkeypatch):
    path = write(tmp_path, config.example(tmp_path))
    monkeypatch.setenv("DYNPROV_CONFIG", str(path))
    assert config.load().path == path


@pytest.mark.parametrize("edit,key", [
    (lambda t: t.replace('subnet = "198.18.0.0/24"\n', ""), "network.subnet: missing key"),
    (lambda t: t.replace('backend = "dnsmasq"', 'backend = "kea"'), "dhcp.backend"),
    (lambda t: t.replace('server = "198.18.0.1"', 'server = "10.9.9.9"'), "network.server"),
    (lambda t: t.replace('reload_command = ["/bin/true"]', 'reload_command = "systemctl reload"'),
     "dhcp.reload_command"),
    (lambda t: t + "\n[boot]\nbios_loadr = 'x'\n", "boot.bios_loadr: unknown key"),
    (lambda t: t.replace("[paths]", "[pathz]"), "pathz"),
    (lambda t: t.replace('tftp_root = "', 'tftp_root = "relative'), "paths.tftp_root"),
    (lambda t: t + "\n[boot]\nbios_loader = '../etc/passwd'\n", "boot.bios_loader"),
])
def test_errors_name_file_and_key(tmp_path, edit, key):
    path = write(tmp_path, edit(config.example(tmp_path)))
    with pytest.raises(InputError) as err:
        config.load(path)
    message = str(err.value)
    assert str(path) in message and key in message and "\n" not in message


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(InputError, match="not found"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(InputError, match="not valid TOML"):
        config.load(write(tmp_path, "[network\n"))
