"""The commands with --server: fg-moab-image, fg-pool and pxe-stage's read-only parts talk to
the REST service (real HTTPS server, PAM users) and print what they print locally. The remote
runs get no site config at all: everything they show came over HTTPS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_api_support import PASSWORD, api_site, make_bundle, needs_root, running_server, unix_accounts

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, needs_root]


@pytest.fixture(scope="module")
def accounts():
    with unix_accounts(("image", "pool", "outsider")) as acc:
        yield acc


@pytest.fixture(scope="module")
def server(tmp_path_factory, accounts):
    site = api_site(tmp_path_factory.mktemp("remote") / "site", accounts)
    from pxe.inventory import Inventory, build

    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": f"n{i:03d}", "macs": f"52:54:00:00:02:{i:02x}"})
                        for i in range(1, 7)])
    with running_server(site) as srv:
        yield srv


MODULES = {"pxe-stage": "pxe.cli.main", "fg-pool": "pxe.cli.fg_pool",
           "fg-moab-image": "msm_plugin.fg_moab_image"}


def local(server, cmd: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DYNPROV_CONFIG": str(server.site.config_path)}
    env.pop("DYNPROV_SERVER", None)
    return subprocess.run([sys.executable, "-m", MODULES[cmd], *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def remote(server, tmp_path, user: str, cmd: str, *argv: str,
           password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DYNPROV_CONFIG": str(tmp_path / "no-such-site.toml"),
           "DYNPROV_SERVER": server.url, "DYNPROV_CA_FILE": str(server.cert),
           "DYNPROV_USER": user, "DYNPROV_PASSWORD": password,
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", MODULES[cmd], *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, stdin=subprocess.DEVNULL)


def test_read_only_commands_print_the_same(server, accounts, tmp_path):
    user = accounts.user("outsider")  # reading needs only an account
    for cmd, argv in (("pxe-stage", ("nodes", "list")), ("pxe-stage", ("nodes", "list", "--json")),
                      ("pxe-stage", ("nodes", "show", "n[002-003]")),
                      ("pxe-stage", ("images", "list", "--json")),
                      ("fg-pool", ("-list",)), ("fg-pool", ("-list", "hpc", "--json")),
                      ("fg-moab-image", ("-list", "-json"))):
        here = local(server, cmd, *argv)
        there = remote(server, tmp_path, user, cmd, *argv)
        assert here.returncode == 0 and there.returncode == 0, (argv, there.stderr)
        assert there.stdout == here.stdout, argv
    # --server on the command line works as well as $DYNPROV_SERVER.
    r = remote(server, tmp_path, user, "pxe-stage", "nodes", "list", "--server", server.url)
    assert r.returncode == 0 and "n006" in r.stdout


def test_images_through_the_service(server, accounts, tmp_path):
    user = accounts.user("image")
    bundle = make_bundle(tmp_path / "b", "remote-os")
    r = remote(server, tmp_path, user, "fg-moab-image", "-upload", "-image", str(bundle))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("uploaded image remote-os (")  # label from the manifest
    listed = json.loads(remote(server, tmp_path, user, "fg-moab-image", "-list", "-json").stdout)
    assert listed[0]["label"] == "remote-os" and listed[0]["owner"] == user
    out = tmp_path / "back.bundle"
    r = remote(server, tmp_path, user, "fg-moab-image", "-get", "-label", "remote-os",
               "-o", str(out))
    assert r.returncode == 0 and out.read_bytes() == bundle.read_bytes()
    r = remote(server, tmp_path, user, "pxe-stage", "images", "show", "remote-os", "--json")
    assert json.loads(r.stdout) == json.loads(local(server, "pxe-stage", "images", "show",
                                                    "remote-os", "--json").stdout)
    r = remote(server, tmp_path, accounts.user("outsider"), "fg-moab-image", "-delete",
               "-label", "remote-os")
    assert r.returncode == 1 and "permission denied" in r.stderr
    r = remote(server, tmp_path, user, "fg-moab-image", "-delete", "-label", "remote-os")
    assert r.returncode == 0 and r.stdout.strip() == "deleted image remote-os"


def test_pools_through_the_service(server, accounts, tmp_path):
    user = accounts.user("pool")
    r = remote(server, tmp_path, user, "fg-pool", "-create", "cloud")
    assert r.returncode == 0 and r.stdout.strip() == "created pool cloud"
    r = remote(server, tmp_path, user, "fg-pool", "-to", "cloud", "-resource", "n[001-002]")
    assert r.returncode == 0
    assert r.stdout.strip() == "moved 2 node(s) to cloud: n[001-002] from hpc"
    r = remote(server, tmp_path, user, "fg-pool", "-to", "hpc", "-resource", "n[001-002]",
               "--json")
    assert json.loads(r.stdout)["moved"] == ["n001", "n002"]
    r = remote(server, tmp_path, user, "fg-pool", "-delete", "cloud")
    assert r.returncode == 0
    fresh = tmp_path / "fresh"  # no cached token there: the password is used, and is wrong
    fresh.mkdir()
    r = remote(server, fresh, user, "fg-pool", "-create", "x", password="wrong-password")
    assert r.returncode == 1 and "wrong user name or password" in r.stderr
    r = remote(server, tmp_path, user, "fg-pool", "-to", "nowhere", "-resource", "n001")
    assert r.returncode == 1 and "unknown pool 'nowhere'" in r.stderr


def test_power_status_through_the_service_matches_local(server, accounts, tmp_path):
    user = accounts.user("pool")  # power status needs the pool group (or admin)
    here = local(server, "pxe-stage", "power", "status", "n[001-003]", "--json")
    there = remote(server, tmp_path, user, "pxe-stage", "power", "status", "n[001-003]", "--json",
                   "--server", server.url)
    # these nodes have no BMC: both fail the same way, node by node
    assert here.returncode == there.returncode == 1, there.stderr
    assert json.loads(there.stdout) == json.loads(here.stdout)
    assert {r["kind"] for r in json.loads(there.stdout)} == {"no-bmc"}
    refused = remote(server, tmp_path, user, "pxe-stage", "power", "on", "n001",
                     "--server", server.url)
    assert refused.returncode == 2 and "only for `power status`" in refused.stderr
