"""The checked-config cache (pxe.configcache): a short command skips the TOML parser and netaddr,
and never gets a config other than what a full check of the file as it is now would give."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from pxe import config, configcache
from pxe.errors import InputError

pytestmark = pytest.mark.unit


def make(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "state").mkdir(exist_ok=True)
    path = tmp_path / "dynprov.toml"
    path.write_text(config.example(tmp_path) + extra)
    return path


def cached(path: Path) -> config.Config | None:
    """What the cache alone answers for the file as it is now (None: a full check is needed)."""
    text = path.read_text()
    return configcache.lookup(path, text, os.stat(path))


def test_a_checked_config_is_cached_and_answers_as_the_full_check(tmp_path):
    path = make(tmp_path, '[serve]\nhttp_port = 8081\n[state]\n')
    assert cached(path) is None  # nothing checked yet
    full = config.load(path)
    entry = configcache.cache_path(tmp_path / "state")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600  # may hold a database URL
    again = cached(path)
    assert again is not None and again == full and again.raw == full.raw
    assert repr(again.network) == repr(full.network)  # what pxe.dhcpinputs keys the DHCP file on
    assert isinstance(again.paths.state_dir, Path) and isinstance(again.dhcp.config_file, Path)
    assert config.load(path) == full


def test_an_edit_of_the_same_size_within_the_same_mtime_is_seen(tmp_path):
    path = make(tmp_path)
    assert config.load(path).boot.http_port == 8080
    st = os.stat(path)
    text = path.read_text() + "[boot]\nhttp_port = 8081\n"
    path.write_text(text)  # warm the cache with 8081, then change one digit in place
    assert config.load(path).boot.http_port == 8081 and cached(path) is not None
    st = os.stat(path)
    path.write_text(text.replace("8081", "8082"))  # same inode, same size...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the same mtime (one clock tick)
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert cached(path) is None
    assert config.load(path).boot.http_port == 8082


def test_an_edit_with_a_new_mtime_is_seen(tmp_path):
    path = make(tmp_path, "[boot]\nhttp_port = 8081\n")
    assert config.load(path).boot.http_port == 8081
    st = os.stat(path)
    path.write_text(path.read_text().replace("8081", "8083"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert config.load(path).boot.http_port == 8083


def test_a_config_replaced_by_another_file_is_seen(tmp_path):
    path = make(tmp_path, "[boot]\nhttp_port = 8081\n")
    assert config.load(path).boot.http_port == 8081
    other = tmp_path / "new.toml"
    other.write_text(path.read_text().replace("8081", "8084"))
    os.replace(other, path)  # what an editor or a config manager does
    assert cached(path) is None
    assert config.load(path).boot.http_port == 8084


def test_a_broken_edit_is_still_an_error(tmp_path):
    path = make(tmp_path)
    config.load(path)
    path.write_text(path.read_text().replace('backend = "dnsmasq"', 'backend = "kea"'))
    with pytest.raises(InputError, match="dhcp.backend"):
        config.load(path)


def test_another_code_version_checks_again(tmp_path, monkeypatch):
    path = make(tmp_path)
    config.load(path)
    assert cached(path) is not None
    monkeypatch.setattr(configcache, "FORMAT", configcache.FORMAT + 1)
    assert cached(path) is None


@pytest.mark.parametrize("spoil", ["group-readable", "symlink", "garbage", "truncated",
                                   "elsewhere"])
def test_an_entry_that_is_not_trusted_or_not_whole_is_ignored(tmp_path, spoil):
    path = make(tmp_path, "[boot]\nhttp_port = 8081\n")
    config.load(path)
    entry = configcache.cache_path(tmp_path / "state")
    if spoil == "group-readable":
        entry.chmod(0o640)
    elif spoil == "symlink":
        moved = tmp_path / "moved.cache"
        os.replace(entry, moved)
        entry.symlink_to(moved)
    elif spoil == "garbage":
        entry.write_bytes(b"\x00not marshal at all")
    elif spoil == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    else:  # a whole entry, checked for another state folder, copied in here
        other = tmp_path / "other"
        other.mkdir()
        other_path = make(other, "[boot]\nhttp_port = 8081\n")
        config.load(other_path)
        shutil.copy2(configcache.cache_path(other / "state"), entry)
    assert cached(path) is None
    assert config.load(path).boot.http_port == 8081  # and the full check still answers


def test_no_cache_without_the_state_folder_or_for_a_state_dir_written_otherwise(tmp_path):
    path = tmp_path / "dynprov.toml"
    path.write_text(config.example(tmp_path))  # no state folder yet: nothing is created for it
    config.load(path)
    assert not (tmp_path / "state").exists()
    (tmp_path / "state").mkdir()
    text = config.example(tmp_path).replace(f'state_dir = "{tmp_path / "state"}"',
                                            f'"state_dir" = "{tmp_path / "state"}"')
    path.write_text(text)  # a quoted key: the line scan does not know it, so nothing is cached
    assert config.load(path).paths.state_dir == tmp_path / "state"
    assert not configcache.cache_path(tmp_path / "state").exists()


def test_a_state_dir_written_with_a_trailing_slash_is_cached(tmp_path):
    path = make(tmp_path)
    path.write_text(path.read_text().replace(f'state_dir = "{tmp_path / "state"}"',
                                             f'state_dir = "{tmp_path / "state"}/"'))
    full = config.load(path)
    assert cached(path) == full


def test_the_scan_finds_only_a_plainly_written_state_dir():
    scan = configcache.state_dir_of
    assert scan('[paths]\nstate_dir = "/var/lib/dynprov"  # here\n') == "/var/lib/dynprov"
    assert scan("paths.state_dir = '/srv/x'\n") == "/srv/x"
    assert scan('[other]\nstate_dir = "/a"\n') is None
    assert scan('[paths]\nstate_dir = "/a\\tb"\n') is None  # an escape: the parser's job
    assert scan('[paths]\nstate_dir = "/a"\n[paths.x]\n[paths]\nstate_dir = "/b"\n') is None
    assert scan("") is None


def test_the_bmc_secrets_never_reach_the_cache(tmp_path):
    path = make(tmp_path)
    secrets = tmp_path / "bmc-secrets"
    secrets.write_text('default = "sw0rdfish-bmc"\n')
    secrets.chmod(0o600)
    assert config.load(path).paths.secrets_file == secrets
    entry = configcache.cache_path(tmp_path / "state").read_bytes()
    assert str(secrets).encode() in entry and b"sw0rdfish-bmc" not in entry
