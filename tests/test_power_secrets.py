"""BMC secrets: a private file or per-node files, refused when loose, never shown."""

from __future__ import annotations

import pytest
from test_power_support import PASSWORD, add_nodes, power_config, write_secret_file

from pxe import power
from pxe.power.secrets import SecretError, SecretStore

pytestmark = pytest.mark.unit


def test_lookup_by_key_default_and_file(tmp_path):
    f = write_secret_file(tmp_path / "secrets", 'default = "d-pw"\nrack7 = "r7-pw"\n')
    node_file = write_secret_file(tmp_path / "n001", "n1-pw\nignored\n")
    store = SecretStore(f)
    assert store.lookup(None) == "d-pw"
    assert store.lookup("rack7") == "r7-pw"
    assert store.lookup(f"file:{node_file}") == "n1-pw"
    with pytest.raises(SecretError, match="no key 'rack9'") as exc:
        store.lookup("rack9")
    assert not exc.value.fatal


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o610])
def test_loose_permissions_are_refused(tmp_path, mode):
    f = write_secret_file(tmp_path / "secrets", 'default = "pw"\n', mode)
    with pytest.raises(SecretError, match="chmod 600") as exc:
        SecretStore(f).lookup(None)
    assert exc.value.fatal
    per_node = write_secret_file(tmp_path / "n1", "pw\n", mode)
    with pytest.raises(SecretError, match="refusing"):
        SecretStore(tmp_path / "unused").lookup(f"file:{per_node}")


def test_symlink_and_bad_toml_do_not_leak(tmp_path):
    real = write_secret_file(tmp_path / "real", 'default = "pw"\n')
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(SecretError, match="cannot open"):
        SecretStore(tmp_path / "link").lookup(None)
    broken = write_secret_file(tmp_path / "broken", 'default = "hunter2\n')
    with pytest.raises(SecretError) as exc:
        SecretStore(broken).lookup(None)
    assert "hunter2" not in str(exc.value) and "line 1" in str(exc.value)


def test_loose_secrets_file_refuses_the_whole_call(site):
    cfg = power_config(site)
    add_nodes(cfg, [{"name": "s001", "mac": "52:54:00:30:00:01", "bmc_type": "ipmi",
                     "bmc_address": "127.0.0.1", "bmc_port": 9, "bmc_user": "admin"}])
    (site.root / "bmc-secrets").chmod(0o644)
    with pytest.raises(SecretError, match="mode 0644"):
        power.run(cfg, "s001", "on")


def test_missing_key_fails_that_node_only(site):
    cfg = power_config(site, timeout=0.5, retries=0)
    add_nodes(cfg, [{"name": "s002", "mac": "52:54:00:30:00:02", "bmc_type": "ipmi",
                     "bmc_address": "127.0.0.1", "bmc_port": 9, "bmc_user": "admin",
                     "bmc_secret": "nokey"},
                    {"name": "s003", "mac": "52:54:00:30:00:03", "bmc_type": "none"}])
    res = power.run(cfg, "s[002-003]", "status")
    assert (res["s002"].kind, res["s003"].kind) == ("auth", "no-bmc")
    assert "nokey" in (res["s002"].error or "") and PASSWORD not in repr(res)
