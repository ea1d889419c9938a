"""The node API of `pxe-stage serve` (pxe/serve/nodeapi.py) in-process: enroll with the boot
token, next image and reboot with the node key, and every refusal changing nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from test_run_support import driver_held

from pxe import db
from pxe.inventory import Inventory
from pxe.serve import app as serve_app
from pxe.serve import settings
from pxe.setboot import set_boot
from tests.conftest import Site, fake_bzimage

pytestmark = pytest.mark.unit


@pytest.fixture
def served(site: Site, tmp_path: Path) -> Iterator[tuple[TestClient, Site]]:
    kernel = fake_bzimage(tmp_path / "vmlinuz", b"k" * 64)
    for i, name in enumerate(("n001", "n002", "n003"), start=1):
        site.run("nodes", "add", name, "--mac", f"52:54:00:ab:00:{i:02x}", check=True)
    site.run("images", "add", "alpha", "--kernel", str(kernel), check=True)
    site.run("images", "add", "beta", "--kernel", str(kernel), check=True)
    site.run("images", "add", "arm1", "--kernel", str(kernel), "--arch", "aarch64", check=True)
    cfg = site.cfg
    set_boot(cfg, ["n001", "n002", "n003"], "alpha", Inventory(cfg))
    with TestClient(serve_app.create_app(cfg, settings.load(cfg))) as client:
        yield client, site


def token(site: Site, node: str) -> str | None:
    return Inventory(site.cfg).get(node).boot_token


def state(site: Site) -> list[tuple]:
    """Everything a refusal must leave alone: nodes, settings, runs (events may grow)."""
    conn = db.connect(site.cfg.database)
    try:
        return [tuple(r) for t in ("nodes", "settings", "runs", "run_nodes")
                for r in conn.execute(f"SELECT * FROM {t} ORDER BY 1")]
    finally:
        conn.close()


def enroll(client: TestClient, site: Site, node: str) -> str:
    r = client.post("/node/enroll", data={"node": node, "token": token(site, node)})
    assert r.status_code == 200, r.text
    return r.text.strip()


def test_enroll_issues_a_key_and_keeps_only_its_hash(served) -> None:
    client, site = served
    key = enroll(client, site, "n001")
    conn = db.connect(site.cfg.database)
    stored = db.get_setting(conn, "node-key:n001")
    assert stored == hashlib.sha256(key.encode()).hexdigest() and key not in stored
    # the boot token stays valid for the agent's "ready", but enrolls only once: the token is
    # in the public boot file, so whoever comes second is refused
    assert token(site, "n001")
    r = client.post("/node/enroll", data={"node": "n001", "token": token(site, "n001")})
    assert r.status_code == 403 and "enroll already done with this boot's token" in r.text
    # the next boot (a new token) enrolls again, and its key replaces the old one
    set_boot(site.cfg, ["n001"], "beta", Inventory(site.cfg))
    key2 = enroll(client, site, "n001")
    assert key2 != key
    r = client.post("/node/next-image", data={"node": "n001", "key": key, "image": "beta"})
    assert r.status_code == 403 and "wrong node key" in r.text


def test_token_only_from_the_nodes_address(served) -> None:
    client, site = served
    conn = db.connect(site.cfg.database)
    with db.transaction(conn):
        conn.execute("UPDATE nodes SET ip = '198.18.0.13' WHERE name = 'n003'")
    before = state(site)
    for route, extra in (("/node/enroll", {}), ("/node/secret", {"name": "munge.key"})):
        r = client.post(route, data={"node": "n003", "token": token(site, "n003"), **extra})
        assert r.status_code == 403 and "not the node's address" in r.text, r.text
    assert state(site) == before


@pytest.mark.parametrize("fields, code, text", [
    ({"node": "n001", "token": "nope"}, 403, "wrong token"),
    ({"node": "n009", "token": "nope"}, 404, "unknown node"),
    ({"node": "bad_name!", "token": "x"}, 400, "invalid node name"),
    ({"node": "n001"}, 400, "field 'token' missing"),
    ({"node": "n001", "token": "x", "extra": "1"}, 400, "unknown field 'extra'"),
])
def test_enroll_refusals(served, fields, code, text) -> None:
    client, site = served
    before = state(site)
    r = client.post("/node/enroll", data=fields)
    assert (r.status_code, text in r.text) == (code, True), r.text
    assert state(site) == before


def test_used_token_cannot_enroll(served) -> None:
    client, site = served
    from pxe.reports import record_report

    conn = db.connect(site.cfg.database)
    record_report(conn, "n002", token(site, "n002"), "ready")
    before = state(site)
    r = client.post("/node/enroll", data={"node": "n002", "token": "anything"})
    assert r.status_code == 403 and "token already used" in r.text
    assert state(site) == before


def test_next_image_and_reboot(served) -> None:
    client, site = served
    key = enroll(client, site, "n001")
    old = token(site, "n001")
    r = client.post("/node/next-image", data={"node": "n001", "key": key, "image": "beta"})
    assert r.status_code == 200 and "next boot beta" in r.text
    node = Inventory(site.cfg).get("n001")
    assert (node.boot_target, node.desired_os) == ("os", "beta") and node.boot_token != old
    with driver_held(site.cfg):  # the request is recorded; no driver powers anything here
        r = client.post("/node/reboot", data={"node": "n001", "key": key})
    assert r.status_code == 200 and "provisioning beta" in r.text, r.text
    conn = db.connect(site.cfg.database)
    rows = conn.execute("SELECT rn.node, rn.state, r.label FROM run_nodes rn JOIN runs r "
                        "ON r.id = rn.run_id").fetchall()
    assert [tuple(x) for x in rows] == [("n001", "requested", "beta")]


def test_refusals_change_nothing(served) -> None:
    client, site = served
    key1 = enroll(client, site, "n001")
    enroll(client, site, "n002")
    conn = db.connect(site.cfg.database)
    with db.transaction(conn):
        conn.execute("INSERT INTO pools(name, created) VALUES ('lab', 0)")
        conn.execute("UPDATE nodes SET pool = 'lab' WHERE name = 'n003'")
    key3 = enroll(client, site, "n003")
    before = state(site)
    cases = [
        ("/node/next-image", {"node": "n002", "key": key1, "image": "beta"}, 403,
         "wrong node key"),  # a node may only change itself
        ("/node/reboot", {"node": "n002", "key": key1}, 403, "wrong node key"),
        ("/node/next-image", {"node": "n001", "key": key1, "image": "gamma"}, 404,
         "unknown image 'gamma'"),
        ("/node/next-image", {"node": "n001", "key": key1, "image": "../x"}, 400,
         "invalid image label"),
        ("/node/next-image", {"node": "n001", "key": key1, "image": "arm1"}, 409,
         "for aarch64"),
        ("/node/next-image", {"node": "n003", "key": key3, "image": "beta"}, 403,
         "not the scheduler's pool"),
        ("/node/reboot", {"node": "n003", "key": key3}, 403, "not the scheduler's pool"),
        ("/node/reboot", {"node": "n001", "key": ""}, 400, "field 'key' missing"),
    ]
    for route, fields, code, text in cases:
        r = client.post(route, data=fields)
        assert (r.status_code, text in r.text) == (code, True), (route, fields, r.text)
    assert state(site) == before
    refused = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'node-api-refused'"
                           ).fetchone()[0]
    assert refused == len(cases) - 2  # the two malformed requests are refused before the db


def test_reboot_without_any_image_is_refused(served) -> None:
    client, site = served
    key = enroll(client, site, "n001")
    set_boot(site.cfg, ["n001"], None, Inventory(site.cfg))  # back to disk, nothing running
    before = state(site)
    r = client.post("/node/reboot", data={"node": "n001", "key": key})
    assert r.status_code == 409 and "no image to boot" in r.text
    assert state(site) == before


def test_node_secret_only_with_the_unused_token(served) -> None:
    client, site = served
    secrets_dir = site.cfg.paths.state_dir / "node-secrets"
    secrets_dir.mkdir(mode=0o700)
    key = bytes(range(256)) * 4
    (secrets_dir / "munge.key").write_bytes(key)
    (secrets_dir / "munge.key").chmod(0o400)
    (secrets_dir / "link").symlink_to(secrets_dir / "munge.key")
    good = {"node": "n001", "token": token(site, "n001"), "name": "munge.key"}
    r = client.post("/node/secret", data=good)
    assert r.status_code == 200 and r.content == key
    # never from the public roots
    assert client.get("/node-secrets/munge.key").status_code == 404
    before = state(site)
    for fields, code, text in [
        ({**good, "token": "wrong"}, 403, "wrong token"),
        ({**good, "node": "n002"}, 403, "wrong token"),
        ({**good, "name": "nosuch"}, 404, "no node secret"),
        ({**good, "name": "link"}, 404, "no node secret"),  # a symlink is not followed
        ({**good, "name": "../db.sqlite"}, 400, "invalid secret name"),
    ]:
        r = client.post("/node/secret", data=fields)
        assert (r.status_code, text in r.text, key not in r.content) == (code, True, True), fields
    assert state(site) == before
    r = client.post("/node/secret", data=good)  # once per boot token
    assert r.status_code == 403 and "already done" in r.text and key not in r.content
    from pxe.reports import record_report

    conn = db.connect(site.cfg.database)
    record_report(conn, "n001", good["token"], "ready")  # the token is used up
    r = client.post("/node/secret", data=good)
    assert r.status_code == 403 and "token already used" in r.text
    sent = conn.execute("SELECT node, detail FROM events WHERE kind = 'node-secret'").fetchall()
    assert [tuple(x) for x in sent] == [("n001", "munge.key")]
