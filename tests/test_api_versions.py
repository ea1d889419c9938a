"""Image versions and hardware facts through the REST service (issue 20): history, rollback and
delete of one version over HTTPS with the CLI's owner/admin rules, an admin's upload to another
user's label, the remote faces of fg-moab-image / pxe-stage images, and `nodes show --server`
with the facts a node reported. Real uvicorn over HTTPS on 127.0.0.1, real PAM users."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_api_support import PASSWORD, api_site, make_bundle, needs_root, running_server, unix_accounts

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, needs_root]

MODULES = {"pxe-stage": "pxe.cli.main", "fg-moab-image": "msm_plugin.fg_moab_image"}


@pytest.fixture(scope="module")
def accounts():
    # image and browser: two members of the image group; admin: [api] admin_group only
    with unix_accounts(("image", "browser", "admin", "outsider")) as acc:
        yield acc


@pytest.fixture(scope="module")
def server(tmp_path_factory, accounts):
    site = api_site(tmp_path_factory.mktemp("versions") / "site", accounts)
    from pxe.inventory import Inventory, build

    cfg = site.cfg
    Inventory(cfg).add([build(cfg, {"name": f"n{i:03d}", "macs": f"52:54:00:00:03:{i:02x}"})
                        for i in range(1, 4)])
    with running_server(site) as srv:
        yield srv


def bearer(server, user: str, json_body: bool = False) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {server.token(user)}"}
    if json_body:
        headers["Content-Type"] = "application/json"
    return headers


def put(server, user: str, label: str, bundle) -> object:
    headers = {**bearer(server, user), "Content-Type": "application/octet-stream"}
    with server.client() as c:
        return c.put(f"/api/v1/images/{label}", content=bundle.read_bytes(), headers=headers)


def local(server, cmd: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DYNPROV_CONFIG": str(server.site.config_path)}
    env.pop("DYNPROV_SERVER", None)
    env.pop("SUDO_USER", None)
    return subprocess.run([sys.executable, "-m", MODULES[cmd], *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def remote(server, tmp_path, user: str, cmd: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DYNPROV_CONFIG": str(tmp_path / "no-such-site.toml"),
           "DYNPROV_SERVER": server.url, "DYNPROV_CA_FILE": str(server.cert),
           "DYNPROV_USER": user, "DYNPROV_PASSWORD": PASSWORD,
           "XDG_CACHE_HOME": str(tmp_path / f"cache-{user}"), "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", MODULES[cmd], *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, stdin=subprocess.DEVNULL)


def history(server, user: str, label: str) -> list[dict]:
    with server.client() as c:
        r = c.get(f"/api/v1/images/{label}/versions", headers=bearer(server, user))
    assert r.status_code == 200, r.text
    return r.json()


def test_history_rollback_and_version_delete_over_rest(server, accounts, tmp_path):
    owner, other, admin = accounts.user("image"), accounts.user("browser"), accounts.user("admin")
    for n in (1, 2, 3):
        assert put(server, owner, "vrest", make_bundle(tmp_path / f"b{n}", "vrest")).status_code \
            == 201
    kept = history(server, accounts.user("outsider"), "vrest")  # reading needs an account only
    assert [(v["version"], v["current"], v["owner"]) for v in kept] == [
        (1, False, owner), (2, False, owner), (3, True, owner)]
    with server.client() as c:
        # another member of the image group: 403 naming the owner, nothing changes
        r = c.post("/api/v1/images/vrest/rollback", json={},
                   headers=bearer(server, other, True))
        assert r.status_code == 403 and f"belongs to {owner}" in r.json()["error"]
        r = c.delete("/api/v1/images/vrest/versions/1", headers=bearer(server, other))
        assert r.status_code == 403 and f"belongs to {owner}" in r.json()["error"]
        # bad input: 400 with the reason, nothing changes
        for body in ({"version": "2x"}, {"version": 0}, {"version": True}, {"versio": 1}):
            r = c.post("/api/v1/images/vrest/rollback", json=body,
                       headers=bearer(server, owner, True))
            assert r.status_code == 400, (body, r.text)
        r = c.post("/api/v1/images/vrest/rollback", json={"version": 9},
                   headers=bearer(server, owner, True))
        assert r.status_code == 400 and "kept versions: 1, 2, 3" in r.json()["error"]
        r = c.delete("/api/v1/images/vrest/versions/x1", headers=bearer(server, owner))
        assert r.status_code == 400 and "not a version number" in r.json()["error"]
        r = c.delete("/api/v1/images/vrest/versions/3", headers=bearer(server, owner))
        assert r.status_code == 400 and "current version" in r.json()["error"]
        r = c.get("/api/v1/images/nosuch/versions", headers=bearer(server, owner))
        assert r.status_code == 404 and "nosuch" in r.json()["error"]
        r = c.post("/api/v1/images/nosuch/rollback", json={},
                   headers=bearer(server, owner, True))
        assert r.status_code == 404
        assert [v["current"] for v in history(server, owner, "vrest")] == [False, False, True]
        # the owner: default rollback (the previous version); an admin: any version
        r = c.post("/api/v1/images/vrest/rollback", json={},
                   headers=bearer(server, owner, True))
        assert r.status_code == 200 and r.json() == {"label": "vrest", "previous": 3,
                                                     "current": 2}
        r = c.post("/api/v1/images/vrest/rollback", json={"version": 1},
                   headers=bearer(server, admin, True))
        assert r.status_code == 200 and r.json()["current"] == 1, r.text
        r = c.get("/api/v1/images/vrest", headers=bearer(server, owner))
        assert r.json()["version"] == 1
        r = c.delete("/api/v1/images/vrest/versions/3", headers=bearer(server, admin))
        assert r.status_code == 200 and r.json() == {"deleted": "vrest", "version": 3,
                                                     "forced": False, "still_used_by": []}
        # -get -version: the bundle of a kept version, byte for byte
        r = c.get("/api/v1/images/vrest/bundle", params={"version": "2"},
                  headers=bearer(server, owner))
        assert r.status_code == 200 and r.content == (tmp_path / "b2" / "vrest.bundle").read_bytes()
        r = c.get("/api/v1/images/vrest/bundle", params={"version": "3"},
                  headers=bearer(server, owner))
        assert r.status_code == 400 and "kept versions: 1, 2" in r.json()["error"]
        assert c.delete("/api/v1/images/vrest", headers=bearer(server, owner)).status_code == 200
    from pxe import audit  # every change in the audit log under the API user's name

    done = [(r["user"], r["action"], r.get("version")) for r in
            audit.read(server.site.cfg.paths.state_dir) if r.get("label") == "vrest"
            and r["action"] in ("image-rollback", "image-delete")]
    assert done == [(owner, "image-rollback", 2), (admin, "image-rollback", 1),
                    (admin, "image-delete", 3), (owner, "image-delete", None)]


def test_admin_adds_a_version_to_another_users_label(server, accounts, tmp_path):
    owner, other, admin = accounts.user("image"), accounts.user("browser"), accounts.user("admin")
    assert put(server, owner, "vadm", make_bundle(tmp_path / "b1", "vadm")).status_code == 201
    r = put(server, other, "vadm", make_bundle(tmp_path / "b2", "vadm"))
    assert r.status_code == 403 and f"belongs to {owner}" in r.json()["error"]
    r = put(server, admin, "vadm", make_bundle(tmp_path / "b3", "vadm"))
    assert r.status_code == 201, r.text
    assert (r.json()["version"], r.json()["owner"], r.json()["uploaded_by"]) == (2, owner, admin)
    kept = history(server, owner, "vadm")
    assert [(v["version"], v["owner"], v["current"]) for v in kept] == [
        (1, owner, False), (2, admin, True)]
    with server.client() as c:  # the label stays its owner's
        listed = c.get("/api/v1/images", headers=bearer(server, owner)).json()
        assert [e["owner"] for e in listed if e["label"] == "vadm"] == [owner]
        assert c.delete("/api/v1/images/vadm", headers=bearer(server, owner)).status_code == 200


def test_fg_moab_image_and_pxe_stage_versions_through_the_service(server, accounts, tmp_path):
    owner, other = accounts.user("image"), accounts.user("browser")
    b1, b2 = make_bundle(tmp_path / "b1", "vcli"), make_bundle(tmp_path / "b2", "vcli")
    r = remote(server, tmp_path, owner, "fg-moab-image", "-upload", "-image", str(b1))
    assert r.returncode == 0, r.stderr
    r = remote(server, tmp_path, owner, "fg-moab-image", "-upload", "-image", str(b2))
    assert r.returncode == 0 and r.stdout.startswith("uploaded image vcli version 2 ("), r.stderr
    for cmd, argv in (("fg-moab-image", ("-history", "-label", "vcli")),
                      ("fg-moab-image", ("-history", "-label", "vcli", "-json")),
                      ("pxe-stage", ("images", "history", "vcli")),
                      ("pxe-stage", ("images", "history", "vcli", "--json"))):
        here, there = local(server, cmd, *argv), remote(server, tmp_path, other, cmd, *argv)
        assert here.returncode == 0 and there.returncode == 0, (argv, there.stderr)
        assert there.stdout == here.stdout, argv
    # another user's label: exit 1 with the owner named; a malformed or unknown version: exit 2
    r = remote(server, tmp_path, other, "fg-moab-image", "-rollback", "-label", "vcli")
    assert r.returncode == 1 and f"belongs to {owner}" in r.stderr
    r = remote(server, tmp_path, owner, "fg-moab-image", "-rollback", "-label", "vcli",
               "-version", "one")
    assert r.returncode == 2 and "not a version number" in r.stderr
    r = remote(server, tmp_path, owner, "pxe-stage", "images", "rollback", "vcli",
               "--version", "7")
    assert r.returncode == 2 and "kept versions: 1, 2" in r.stderr
    r = remote(server, tmp_path, owner, "fg-moab-image", "-rollback", "-label", "vcli", "-init")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("image vcli: version 1 is current again (was 2)")
    assert "re-published the OS list; boot configs: " in r.stdout
    r = remote(server, tmp_path, owner, "pxe-stage", "images", "rollback", "vcli",
               "--version", "2")
    assert r.returncode == 0 and "version 2 is current again (was 1)" in r.stdout, r.stderr
    out = tmp_path / "v1.bundle"
    r = remote(server, tmp_path, owner, "fg-moab-image", "-get", "-label", "vcli",
               "-version", "1", "-o", str(out))
    assert r.returncode == 0 and out.read_bytes() == b1.read_bytes(), r.stderr
    r = remote(server, tmp_path, owner, "fg-moab-image", "-delete", "-label", "vcli",
               "-version", "1")
    assert r.returncode == 0 and r.stdout.strip() == "deleted version 1 of image vcli", r.stderr
    assert [v["version"] for v in history(server, owner, "vcli")] == [2]
    r = remote(server, tmp_path, owner, "fg-moab-image", "-delete", "-label", "vcli")
    assert r.returncode == 0, r.stderr


def test_nodes_show_through_the_service_has_the_hardware_facts(server, accounts, tmp_path):
    from pxe import db, hwfacts

    conn = db.connect(server.site.cfg.database)
    hwfacts.store(conn, "n002", hwfacts.parse(
        "cpus 16\nmemory_kib 67108864\ncpu_model Test CPU 9000\nserial SN-42\n"
        "disk vda 10737418240\nnic eth0 52:54:00:00:03:02\n"))
    conn.close()
    user = accounts.user("outsider")
    for argv in (("nodes", "show", "n[001-002]"), ("nodes", "show", "n[001-002]", "--json")):
        here, there = local(server, "pxe-stage", *argv), remote(server, tmp_path, user,
                                                                 "pxe-stage", *argv)
        assert here.returncode == 0 and there.returncode == 0, (argv, there.stderr)
        assert there.stdout == here.stdout, argv
    shown = json.loads(there.stdout)
    assert shown[0]["hardware"] is None
    assert shown[1]["hardware"]["cpus"] == 16 and shown[1]["hardware"]["memory_mib"] == 65536
    with server.client() as c:
        one = c.get("/api/v1/nodes/n002", headers=bearer(server, user)).json()
        assert one["hardware"]["serial"] == "SN-42"
        listed = c.get("/api/v1/nodes", headers=bearer(server, user)).json()
        assert "hardware" not in listed[0]  # the plain list stays as `nodes list --json`
