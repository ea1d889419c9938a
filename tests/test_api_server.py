"""The REST service for real: uvicorn over HTTPS on 127.0.0.1 with a self-signed certificate,
logins checked by PAM against unix users created here (useradd/chpasswd, removed afterwards),
authorization by their unix groups. Plus the remote client (pxe.remote) against it."""

from __future__ import annotations

import io
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_api_support import (
    PASSWORD,
    api_site,
    make_bundle,
    needs_root,
    repository_files,
    running_server,
    unix_accounts,
)

from pxe import audit, remote
from pxe.api import auth, settings

pytestmark = [pytest.mark.integration, needs_root]


@pytest.fixture(scope="module")
def accounts():
    with unix_accounts() as acc:
        yield acc


@pytest.fixture(scope="module")
def server(tmp_path_factory, accounts):
    site = api_site(tmp_path_factory.mktemp("api") / "site", accounts,
                    max_upload_bytes=256 << 10)
    with running_server(site) as srv:
        yield srv


def bearer(server, role_user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(role_user)}"}


def test_pam_login_gives_a_token_and_roles(server, accounts):
    with server.client() as c:
        r = c.post("/api/v1/token", auth=(accounts.user("image"), PASSWORD))
        assert r.status_code == 201, r.text
        data = r.json()
        assert data["source"] == "pam" and data["roles"] == ["read", "image"]
        assert accounts.groups["image"] in data["groups"]
        assert data["expires"] > time.time()
        me = c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {data['token']}"}).json()
        assert me["user"] == accounts.user("image") and me["source"] == "token:pam"
        admin = c.get("/api/v1/whoami", headers=bearer(server, accounts.user("admin"))).json()
        assert admin["roles"] == ["read", "image", "pool", "admin"]


def test_no_credentials(server):
    with server.client() as c:
        for method, path in (("GET", "/api/v1/nodes"), ("GET", "/api/v1/status"),
                             ("PUT", "/api/v1/images/x"), ("POST", "/api/v1/token")):
            r = c.request(method, path)
            assert r.status_code == 401, path
            assert "no credentials" in r.json()["error"]
            assert "Basic" in r.headers["www-authenticate"]


def test_wrong_password_then_lockout(server, accounts):
    user = accounts.user("locked")
    with server.client() as c:
        for _ in range(3):  # lockout_failures = 3 in this site
            r = c.post("/api/v1/token", auth=(user, "not-the-password"))
            assert r.status_code == 401
            assert r.json()["error"] == "wrong user name or password"
        r = c.post("/api/v1/token", auth=(user, PASSWORD))  # right, but locked out
        assert r.status_code == 429
        assert f"too many failed logins for user {user}" in r.json()["error"]
        assert int(r.headers["retry-after"]) > 0
        # A wrong password for an account that does not exist reads the same.
        r = c.post("/api/v1/token", auth=("dpnosuchuser", "x"))
        assert r.json()["error"] == "wrong user name or password"


def test_expired_and_forged_tokens(server, accounts):
    api = settings.load(server.site.cfg)
    key = auth.Secret(api.api_dir / "secret").key()
    user = accounts.user("admin")
    expired, _ = auth.issue_token(key, user, "pam", 60, now=time.time() - 120)
    forged, _ = auth.issue_token(b"guessed-secret-guessed-secret-!!", user, "pam", 600)
    real = server.token(accounts.user("outsider"))
    head, payload, mac = real.split(".")
    swapped = json.loads(auth._unb64(payload)) | {"sub": user}
    tampered = f"{head}.{auth._b64(json.dumps(swapped).encode())}.{mac}"
    with server.client() as c:
        for tok, words in ((expired, "token expired"), (forged, "bad signature"),
                           (tampered, "bad signature"), ("dp1.garbage", "invalid token")):
            r = c.get("/api/v1/whoami", headers={"Authorization": f"Bearer {tok}"})
            assert r.status_code == 401 and words in r.json()["error"]
        # A token is not a password: it cannot buy another token.
        r = c.post("/api/v1/token", headers={"Authorization": f"Bearer {real}"})
        assert r.status_code == 401


def test_user_outside_the_group(server, accounts, tmp_path):
    headers = bearer(server, accounts.user("outsider"))
    bundle = make_bundle(tmp_path, "outsider1")
    with server.client() as c:
        r = c.put("/api/v1/images/outsider1", content=bundle.read_bytes(),
                  headers={**headers, "Content-Type": "application/octet-stream"})
        assert r.status_code == 403
        assert f"group {accounts.groups['image']!r}" in r.json()["error"]
        r = c.post("/api/v1/pools", json={"name": "cloud"}, headers=headers)
        assert r.status_code == 403 and accounts.groups["pool"] in r.json()["error"]
        r = c.post("/api/v1/runs", json={"nodes": "n1", "label": "x"}, headers=headers)
        assert r.status_code == 403 and accounts.groups["admin"] in r.json()["error"]
        # Reading is open to every account.
        assert c.get("/api/v1/pools", headers=headers).status_code == 200
    assert repository_files(server.site) == []


def test_plain_http_is_refused(server):
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /api/v1/nodes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(10)
        got = b""
        try:
            for _ in range(10):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert not got.startswith(b"HTTP/1.1 2")
    assert b"n001" not in got and b"nodes" not in got
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    # And an old TLS version is refused too.
    ctx = ssl.create_default_context(cafile=str(server.cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass


def test_upload_larger_than_the_maximum(server, accounts, tmp_path):
    headers = {**bearer(server, accounts.user("image")),
               "Content-Type": "application/octet-stream"}
    bundle = make_bundle(tmp_path, "toobig", extra=300 << 10)
    data = bundle.read_bytes()

    def chunks():  # no Content-Length: refused while streaming
        for i in range(0, len(data), 16 << 10):
            yield data[i:i + (16 << 10)]

    with server.client() as c:
        r = c.put("/api/v1/images/toobig", content=chunks(), headers=headers)
        assert r.status_code == 413 and "while streaming" in r.json()["error"]
        r = c.put("/api/v1/images/toobig", content=data, headers=headers)
        assert r.status_code == 413
        assert c.get("/api/v1/images", headers=headers).json() == []
    assert repository_files(server.site) == []


def test_crafted_labels_and_names(server, accounts):
    headers = bearer(server, accounts.user("admin"))
    with server.client() as c:
        for path in ("/api/v1/images/a..b", "/api/v1/images/x;rm", "/api/v1/nodes/n1%0aX",
                     "/api/v1/nodes/%24(id)", "/api/v1/pools/%27--"):
            r = c.get(path, headers=headers)
            assert r.status_code == 400 and "invalid" in r.json()["error"], path
        for path in ("/api/v1/images/..%2F..%2Fetc%2Fpasswd", "/api/v1/images/%2e%2e%2fx/bundle"):
            r = c.request("DELETE" if "bundle" not in path else "GET", path, headers=headers)
            assert r.status_code in (400, 404), path
        r = c.put("/api/v1/images/..%2Fescape", content=b"x",
                  headers={**headers, "Content-Type": "application/octet-stream"})
        assert r.status_code in (400, 404)
    state = server.site.cfg.paths.state_dir
    assert not (state / "escape").exists() and not (state / "images" / "escape").exists()


def test_body_that_is_not_json(server, accounts):
    headers = bearer(server, accounts.user("pool"))
    with server.client() as c:
        r = c.post("/api/v1/pools", content=b"name=cloud",
                   headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 400 and "not JSON" in r.json()["error"]
        r = c.post("/api/v1/pools/hpc/move", content=b"<xml/>",
                   headers={**headers, "Content-Type": "text/xml"})
        assert r.status_code == 415


def test_concurrent_uploads_of_one_label(server, accounts, tmp_path):
    """The first upload holds the label while it streams; the second gets 409 at once."""
    headers = {**bearer(server, accounts.user("image")),
               "Content-Type": "application/octet-stream"}
    data = make_bundle(tmp_path, "race").read_bytes()
    first_started, release = threading.Event(), threading.Event()
    result: dict[str, object] = {}

    def slow_body():
        yield data[:1024]
        first_started.set()
        release.wait(60)
        yield data[1024:]

    def first() -> None:
        with server.client() as c:
            result["first"] = c.put("/api/v1/images/race", content=slow_body(), headers=headers)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert first_started.wait(30)
        second = None
        with server.client() as c:
            for _ in range(50):  # until the server has the first one's lock (bounded)
                second = c.put("/api/v1/images/race", content=data, headers=headers)
                if second.status_code == 409:
                    break
                time.sleep(0.1)
        assert second is not None and second.status_code == 409
        assert "in progress" in second.json()["error"]
    finally:
        release.set()
        t.join(60)
    assert result["first"].status_code == 201, result["first"].text  # type: ignore[union-attr]
    with server.client() as c:
        r = c.put("/api/v1/images/race", content=data, headers=headers)
        assert r.status_code == 201, r.text  # once the first is done: its owner's version 2
        assert c.delete("/api/v1/images/race", headers=headers).status_code == 200


def test_remote_client_upload_get_delete(server, accounts, tmp_path):
    user = accounts.user("image")
    client = remote.Client(server.url, ca_file=str(server.cert), user=user,
                           password=lambda: PASSWORD, token_cache=tmp_path / "tokens.json")
    bundle = make_bundle(tmp_path / "b", "remote1", extra=3 << 20 >> 4)
    bar = io.StringIO()
    done = client.upload(bundle, "remote1", progress=bar)
    assert done["label"] == "remote1" and done["owner"] == user
    assert "100%" in bar.getvalue() and "upload remote1.bundle" in bar.getvalue()
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    out = tmp_path / "copy.bundle"
    sha, size = client.download("remote1", str(out))
    assert out.read_bytes() == bundle.read_bytes() and size == bundle.stat().st_size
    listed = client.get("/api/v1/images")
    assert [e["label"] for e in listed] == ["remote1"]
    # A second client finds the cached token and does not ask for the password.
    again = remote.Client(server.url, ca_file=str(server.cert), user=user,
                          password=lambda: pytest.fail("asked for the password"),
                          token_cache=tmp_path / "tokens.json")
    assert again.delete("/api/v1/images/remote1")["deleted"] == "remote1"
    records = [r for r in audit.read(server.site.cfg.paths.state_dir)
               if r.get("label") == "remote1"]
    assert [(r["user"], r["action"]) for r in records] == [(user, "image-upload"),
                                                          (user, "image-delete")]


def test_remote_client_refuses_an_untrusted_certificate(server, tmp_path):
    client = remote.Client(server.url, user="x", password=lambda: "x",
                           token_cache=tmp_path / "t.json")
    with pytest.raises(Exception, match="certificate not trusted"):
        client.login()


def test_openapi_and_status_page_are_served(server):
    with server.client() as c:
        assert c.get("/openapi.json").json()["info"]["title"].startswith("dynprov")
        page = c.get("/status")
        assert page.status_code == 200 and "frame-ancestors 'self'" in \
            page.headers["content-security-policy"]
        assert c.get("/status.js").headers["content-type"].startswith("text/javascript")


def test_server_log_has_no_password(server):
    text = Path(server.log).read_text()
    assert PASSWORD not in text and "not-the-password" not in text
