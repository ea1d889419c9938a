"""The REST service in-process (Starlette's test client over "https"): settings, tokens,
lockout, refusals with reasons, bad input, uploads, audit. Users come from a bcrypt password
file with their groups (no unix accounts needed here; PAM is in test_api_server.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from test_api_support import api_site, basic, make_bundle, repository_files

from pxe import audit, db
from pxe.api import auth, settings, tls
from pxe.api.app import create_app
from pxe.config import Config
from pxe.errors import InputError

pytestmark = pytest.mark.unit

PW = "unit-test-password"
GROUPS = {"imager": "fgimage", "pooler": "fgpool", "boss": "fgadmin", "nobody": ""}


@pytest.fixture
def site(tmp_path: Path):
    s = api_site(tmp_path / "site", None, auth=["file"], max_upload_bytes=64 << 10,
                 failure_delay=0.0, lockout_failures=3, lockout_address_failures=5)
    api = settings.load(s.cfg)
    assert api.password_file is not None
    for user, group in GROUPS.items():
        auth.set_password(api.password_file, user, PW, [group] if group else [], rounds=4)
    return s


class Spawned(list):
    def __call__(self, cfg: Config) -> None:
        self.append(cfg)


@pytest.fixture
def spawned() -> Spawned:
    return Spawned()


@pytest.fixture
def client(site, spawned):
    cfg = site.cfg
    app = create_app(cfg, settings.load(cfg), spawn_driver=spawned)
    with TestClient(app, base_url="https://testserver") as c:
        yield c


def token(client: TestClient, user: str) -> dict[str, str]:
    r = client.post("/api/v1/token", headers={"Authorization": basic(user, PW)})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def add_nodes(site, *names: str) -> None:
    from pxe.inventory import Inventory, build

    cfg = site.cfg
    start = len(Inventory(cfg).names())
    Inventory(cfg).add([build(cfg, {"name": n, "macs": f"52:54:00:00:01:{i:02x}"})
                        for i, n in enumerate(names, start + 1)])


# -- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("port", 0, "api.port: must be between"),
    ("port", "x", "api.port: must be a int"),
    ("address", "example.org", "api.address: not an IP address"),
    ("auth", ["kerberos"], "api.auth: must be a non-empty list"),
    ("token_lifetime", 5, "api.token_lifetime: must be between 30"),
    ("frame_ancestors", ["javascript:x"], "api.frame_ancestors"),
    ("cert", "relative.pem", "api.cert: must be an absolute path"),
    ("bogus", 1, "api.bogus: unknown key"),
    ("server", "http://x", "api.server: must be an https:// URL"),
])
def test_settings_name_the_key(site, key, value, words):
    cfg = site.cfg
    raw = {**cfg.raw, "api": {**cfg.raw["api"], key: value}}
    bad = Config(**{**cfg.__dict__, "raw": raw})
    with pytest.raises(InputError, match=words.replace("(", r"\(")):
        settings.load(bad)


def test_file_auth_needs_a_password_file(site):
    cfg = site.cfg
    raw = {**cfg.raw, "api": {"auth": ["file"]}}
    with pytest.raises(InputError, match="api.password_file: missing key"):
        settings.load(Config(**{**cfg.__dict__, "raw": raw}))


def test_tls_files_are_checked(site, tmp_path):
    cfg = site.cfg
    api = settings.load(cfg)
    assert settings.require_tls_files(cfg, api)
    other = tmp_path / "other"
    other.mkdir()
    tls.make_cert(other / "c.pem", other / "k.pem")
    mixed = settings.load(cfg, key=str(other / "k.pem"))
    with pytest.raises(InputError, match="do not load as a certificate and its key"):
        settings.require_tls_files(cfg, mixed)
    with pytest.raises(InputError, match="exists; use --force"):
        tls.make_cert(other / "c.pem", other / "k.pem")


# -- tokens ----------------------------------------------------------------------------------
def test_tokens_forged_expired_damaged():
    key, other = b"k" * 32, b"o" * 32
    good, exp = auth.issue_token(key, "alice", "pam", 60, now=1000)
    assert exp == 1060
    assert auth.check_token(key, good, now=1059) == ("alice", "pam")
    with pytest.raises(auth.AuthError, match="token expired"):
        auth.check_token(key, good, now=1060)
    with pytest.raises(auth.AuthError, match="bad signature"):
        auth.check_token(other, good, now=1000)
    head, payload, mac = good.split(".")
    forged_payload = auth._b64(json.dumps({"sub": "root", "src": "pam", "iat": 1000,
                                           "exp": 9999999999, "jti": "x"}).encode())
    with pytest.raises(auth.AuthError, match="bad signature"):
        auth.check_token(key, f"{head}.{forged_payload}.{mac}", now=1000)
    for junk in ("", "abc", "dp1.x", "dp2.a.b", f"{head}.{payload}.!!!"):
        with pytest.raises(auth.AuthError) as info:
            auth.check_token(key, junk, now=1000)
        assert info.value.status == 401


def test_expired_and_forged_tokens_over_http(client, site):
    api = settings.load(site.cfg)
    key = auth.Secret(api.api_dir / "secret").key()
    old, _ = auth.issue_token(key, "imager", "file", 60, now=time.time() - 3600)
    r = client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {old}"})
    assert r.status_code == 401 and "token expired" in r.json()["error"]
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    forged, _ = auth.issue_token(b"not-the-server-secret-at-all!!!!", "boss", "file", 600)
    r = client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401 and "bad signature" in r.json()["error"]


def test_revoke_tokens_ends_every_token(client, site):
    headers = token(client, "imager")
    assert client.get("/api/v1/whoami", headers=headers).status_code == 200
    r = site.run("api", "revoke-tokens")
    assert r.returncode == 0, r.stderr
    assert client.get("/api/v1/whoami", headers=headers).status_code == 401
    assert audit.read(site.cfg.paths.state_dir)[-1]["action"] == "api-revoke-tokens"


def test_secret_is_private(client, site):
    api = settings.load(site.cfg)
    assert (api.api_dir / "secret").stat().st_mode & 0o777 == 0o600
    assert api.api_dir.stat().st_mode & 0o777 == 0o700


# -- login refusals ---------------------------------------------------------------------------
def test_no_credentials_wrong_password_and_lockout(client):
    r = client.get("/api/v1/nodes")
    assert r.status_code == 401 and "no credentials" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith('Basic realm="dynprov"')
    r = client.get("/api/v1/nodes", headers={"X-Dynprov-Client": "web"})
    assert "Basic" not in r.headers["www-authenticate"]  # no browser popup for the page
    for _ in range(3):
        r = client.post("/api/v1/token", headers={"Authorization": basic("imager", "nope")})
        assert r.status_code == 401 and r.json()["error"] == "wrong user name or password"
    r = client.post("/api/v1/token", headers={"Authorization": basic("imager", PW)})
    assert r.status_code == 429 and "locked out" in r.json()["error"]
    assert int(r.headers["retry-after"]) > 0
    # Others are not locked out by imager's failures (address limit is 5 here: 3 used).
    assert client.post("/api/v1/token",
                       headers={"Authorization": basic("pooler", PW)}).status_code == 201


def test_unknown_user_and_malformed_credentials(client):
    r = client.post("/api/v1/token", headers={"Authorization": basic("ghost", PW)})
    assert r.status_code == 401 and r.json()["error"] == "wrong user name or password"
    for header in ("Basic !!!", "Basic " + "bm9jb2xvbg==", "Digest x", "Bearer"):
        r = client.post("/api/v1/token", headers={"Authorization": header})
        assert r.status_code == 401, header


def test_lockout_counts_per_user_and_address(site):
    api = settings.load(site.cfg, lockout_failures=2, lockout_address_failures=3,
                        lockout_window=60.0, lockout_seconds=30.0)
    lock = auth.Lockout(api)
    lock.failed(["user:a", "addr:1.2.3.4"], now=100)
    assert lock.locked(["user:a", "addr:1.2.3.4"], now=101) is None
    lock.failed(["user:a", "addr:1.2.3.4"], now=102)
    assert lock.locked(["user:a"], now=103) == ("user:a", 30)
    assert lock.locked(["user:b", "addr:1.2.3.4"], now=103) is None
    lock.failed(["user:b", "addr:1.2.3.4"], now=104)
    assert lock.locked(["user:c", "addr:1.2.3.4"], now=105)[0] == "addr:1.2.3.4"
    assert lock.locked(["user:a"], now=140) is None  # lockout over
    lock.succeeded("user:b")
    assert "user:b" not in json.loads(lock.path.read_text())


def test_plain_http_is_refused(site, spawned):
    app = create_app(site.cfg, settings.load(site.cfg), spawn_driver=spawned)
    with TestClient(app, base_url="http://testserver") as c:
        r = c.get("/api/v1/nodes", headers={"Authorization": basic("imager", PW)})
    assert r.status_code == 403 and "HTTPS required" in r.json()["error"]


# -- authorization ----------------------------------------------------------------------------
def test_roles_and_refusals_name_the_group(client, site):
    assert client.get("/api/v1/whoami", headers=token(client, "nobody")).json()["roles"] == \
        ["read"]
    assert client.get("/api/v1/whoami", headers=token(client, "boss")).json()["roles"] == \
        ["read", "image", "pool", "admin"]
    nobody = token(client, "nobody")
    r = client.post("/api/v1/pools", json={"name": "cloud"}, headers=nobody)
    assert r.status_code == 403
    assert "group 'fgpool' or 'fgadmin'" in r.json()["error"] and "nobody" in r.json()["error"]
    r = client.put("/api/v1/images/x", content=b"x", headers=nobody)
    assert r.status_code == 403 and "fgimage" in r.json()["error"]
    r = client.post("/api/v1/runs", json={"nodes": "n1", "label": "x"},
                    headers=token(client, "imager"))
    assert r.status_code == 403 and "admin group 'fgadmin'" in r.json()["error"]
    r = client.get("/api/v1/power", params={"nodes": "n1"}, headers=nobody)
    assert r.status_code == 403


def test_pool_changes_are_audited_with_the_api_user(client, site):
    add_nodes(site, "n1", "n2")
    headers = token(client, "pooler")
    assert client.post("/api/v1/pools", json={"name": "cloud"}, headers=headers).status_code == 201
    r = client.post("/api/v1/pools/cloud/move", json={"nodes": "n[1-2]"}, headers=headers)
    assert r.status_code == 200 and r.json()["moved"] == ["n1", "n2"]
    r = client.get("/api/v1/pools/cloud", headers=headers)
    assert r.json() == {"pool": "cloud", "nodeset": "n[1-2]", "count": 2, "nodes": ["n1", "n2"],
                        "scheduler": False}
    assert client.delete("/api/v1/pools/cloud", headers=headers).status_code == 409  # not empty
    records = audit.read(site.cfg.paths.state_dir)
    assert [(r["user"], r["action"]) for r in records][-2:] == \
        [("pooler", "pool-create"), ("pooler", "pool-move")]


def test_switch_nodes_to_an_os(client, site, spawned):
    add_nodes(site, "n1", "n2")
    headers = token(client, "boss")
    r = client.post("/api/v1/runs", json={"nodes": "n[1-3]", "label": "none"}, headers=headers)
    assert r.status_code == 202
    assert {x["reason"] for x in r.json()["refused"]} == {"unknown node",
                                                          "unknown OS label 'none'"}
    assert not spawned
    record = audit.read(site.cfg.paths.state_dir)[-1]
    assert (record["user"], record["action"], record["nodes"]) == ("boss", "os-switch", "n[1-3]")


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [
    "/api/v1/nodes/a;b", "/api/v1/nodes/$(id)", "/api/v1/nodes/-x", "/api/v1/images/a..b",
    "/api/v1/images/-rf", "/api/v1/images/a%00b", "/api/v1/pools/x'--", "/api/v1/runs/1;2",
    "/api/v1/images/%3Cscript%3E",
])
def test_crafted_names_are_refused(client, path):
    r = client.get(path, headers=token(client, "boss"))
    assert r.status_code == 400, (path, r.text)
    assert "invalid" in r.json()["error"]


def test_traversal_does_not_reach_a_file(client, site):
    add_nodes(site, "n1")
    headers = token(client, "boss")
    for path in ("/api/v1/images/..%2F..%2Fetc%2Fpasswd/bundle", "/api/v1/nodes/..%2F..%2Fetc",
                 "/api/v1/images/%2e%2e/bundle"):
        r = client.get(path, headers=headers)
        assert r.status_code in (400, 404), path
        assert "root:" not in r.text
        assert r.headers["content-type"].startswith("application/json")
    r = client.delete("/api/v1/images/..%2Fdynprov.db", headers=headers)
    assert r.status_code == 404
    assert site.cfg.state.url or site.cfg.db_path.exists()  # (PostgreSQL: no file to reach)


def test_node_sets_are_bounded_and_checked(client):
    headers = token(client, "boss")
    started = time.monotonic()
    r = client.get("/api/v1/nodes", params={"nodes": "n[1-100000000]"}, headers=headers)
    assert r.status_code == 400 and "more than" in r.json()["error"]
    assert time.monotonic() - started < 60  # a bound on the test, not a timing check
    for bad in ("n[1-", "a;b", "$(reboot)", ""):
        r = client.get("/api/v1/nodes", params={"nodes": bad}, headers=headers)
        assert r.status_code == 400, bad


@pytest.mark.parametrize("body, ctype, status, words", [
    (b"name=cloud", "application/x-www-form-urlencoded", 415, "must be JSON"),
    (b"{not json", "application/json", 400, "not JSON"),
    (b"\xff\xfe", "application/json", 400, "not JSON"),
    (b"[1, 2]", "application/json", 400, "must be a JSON object"),
    (b'{"name": 5}', "application/json", 400, "name: must be a str"),
    (b'{"name": "c", "x": 1}', "application/json", 400, "unknown key 'x'"),
    (b"{}", "application/json", 400, "missing key 'name'"),
    (b'{"name": "../x"}', "application/json", 400, "invalid pool name"),
    (b'{"name": "' + b"a" * (2 << 20) + b'"}', "application/json", 413, "larger than"),
])
def test_bodies_that_are_not_the_expected_json(client, body, ctype, status, words):
    r = client.post("/api/v1/pools", content=body,
                    headers={**token(client, "pooler"), "Content-Type": ctype})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


# -- uploads ----------------------------------------------------------------------------------
def test_upload_list_show_get_delete(client, site, tmp_path):
    bundle = make_bundle(tmp_path / "b", "centos7")
    headers = token(client, "imager")
    r = client.put("/api/v1/images/centos7", content=bundle.read_bytes(),
                   headers={**headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert r.json()["owner"] == "imager" and r.json()["bundle_bytes"] == bundle.stat().st_size
    listed = client.get("/api/v1/images", headers=headers).json()
    assert [e["label"] for e in listed] == ["centos7"] and listed[0]["owner"] == "imager"
    assert client.get("/api/v1/images/centos7", headers=headers).json()["label"] == "centos7"
    r = client.get("/api/v1/images/centos7/bundle", headers=headers)
    assert r.content == bundle.read_bytes()
    assert r.headers["x-bundle-sha256"] == listed[0]["bundle_sha256"]
    r = client.put("/api/v1/images/centos7", content=bundle.read_bytes(),
                   headers={**headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text  # the owner's second upload: version 2
    assert client.get("/api/v1/images/centos7", headers=headers).json()["version"] == 2
    assert client.delete("/api/v1/images/centos7", headers=headers).status_code == 200
    actions = [(a["user"], a["action"]) for a in audit.read(site.cfg.paths.state_dir)]
    assert ("imager", "image-upload") in actions and ("imager", "image-delete") in actions
    assert repository_files(site) == []


def test_upload_over_the_limit_leaves_nothing(client, site, tmp_path):
    bundle = make_bundle(tmp_path / "b", "big", extra=80 << 10)
    headers = {**token(client, "imager"), "Content-Type": "application/octet-stream"}
    r = client.put("/api/v1/images/big", content=bundle.read_bytes(), headers=headers)
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]

    def chunks():
        data = bundle.read_bytes()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    r = client.put("/api/v1/images/big", content=chunks(), headers=headers)  # chunked
    assert r.status_code == 413 and "while streaming" in r.json()["error"]
    assert repository_files(site) == []
    assert client.get("/api/v1/images", headers=headers).json() == []


def test_bad_bundle_and_wrong_type(client, site):
    headers = token(client, "imager")
    r = client.put("/api/v1/images/junk", content=b"not a tar archive" * 10,
                   headers={**headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400
    r = client.put("/api/v1/images/junk", json={"a": 1}, headers=headers)
    assert r.status_code == 415
    assert repository_files(site) == []


# -- reads, status, OpenAPI -------------------------------------------------------------------
def test_node_list_status_and_runs(client, site):
    add_nodes(site, "n1", "n2")
    conn = db.connect(site.cfg.database)
    with db.transaction(conn):
        db.log_event(conn, "report", node="n2", detail="<b>booting</b>")
    headers = token(client, "nobody")
    nodes = client.get("/api/v1/nodes", headers=headers).json()
    assert [n["name"] for n in nodes] == ["n1", "n2"] and "boot_token" not in nodes[0]
    assert client.get("/api/v1/nodes/n9", headers=headers).status_code == 404
    status = client.get("/api/v1/status", headers=headers).json()
    assert status["nodes"][1]["last_event"]["detail"] == "<b>booting</b>"
    # set-boot logs one event per command (node NULL): the node's own line shows it from boot_set.
    from pxe.setboot import set_boot

    set_boot(site.cfg, "n[1-2]", None)
    status = client.get("/api/v1/status", headers=headers).json()
    for node in status["nodes"]:
        assert node["last_event"] == {"ts": node["boot_set"], "kind": "set-boot", "detail": "local"}
    with db.transaction(conn):
        db.log_event(conn, "report", node="n2", detail="later")
    status = client.get("/api/v1/status", headers=headers).json()
    assert status["nodes"][1]["last_event"]["detail"] == "later"
    assert status["nodes"][0]["last_event"]["kind"] == "set-boot"
    assert status["pools"] == [{"name": "hpc", "nodes": 2, "scheduler": True}]
    assert client.get("/api/v1/runs", headers=headers).json() == []
    assert client.get("/api/v1/runs/42", headers=headers).status_code == 404


def test_openapi_describes_every_route(client):
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for route in ("/api/v1/token", "/api/v1/nodes", "/api/v1/images/{label}",
                  "/api/v1/pools/{name}/move", "/api/v1/power", "/api/v1/runs", "/api/v1/status"):
        assert route in paths
    assert set(paths["/api/v1/images/{label}"]) == {"get", "put", "delete"}
    for path, ops in paths.items():
        for op in ops.values():
            assert op.get("summary") and op.get("responses"), path
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(__import__("re").findall(r"{(\w+)}", path)), path


def test_password_file_format_and_groups(site, tmp_path):
    with pytest.raises(InputError, match=":1: expected user:bcrypt-hash"):
        auth.parse_password_file("alice:plaintext\n")
    with pytest.raises(InputError, match="invalid user name"):
        auth.parse_password_file("Bad User:$2b$04$abc\n")
    path = tmp_path / "pw"
    auth.set_password(path, "carol", "secret-one", ["fgpool"], rounds=4)
    auth.set_password(path, "carol", "secret-two", [], rounds=4)  # replaces
    pf = auth.PasswordFile(path)
    assert pf.check("carol", "secret-one") is None
    assert pf.check("carol", "secret-two") is not None
    assert path.stat().st_mode & 0o777 == 0o600
    auth.set_password(path, "carol", None)
    assert auth.PasswordFile(path).users() == {}


def test_node_list_is_node_public_and_follows_changes(client, site):
    from pxe.inventory import Inventory

    add_nodes(site, "n1", "n2")
    headers = token(client, "nobody")
    first = client.get("/api/v1/nodes", headers=headers).json()
    assert first == [n.public() for n in Inventory(site.cfg).all()]
    assert client.get("/api/v1/nodes", headers=headers).json() == first  # from the cache
    add_nodes(site, "n3")  # another connection commits: the cached answer is stale now
    assert [n["name"] for n in client.get("/api/v1/nodes", headers=headers).json()] == \
        ["n1", "n2", "n3"]
    assert client.get("/api/v1/nodes", params={"nodes": "n[2-3]"}, headers=headers).json() == \
        [n.public() for n in Inventory(site.cfg).select("n[2-3]")]
