"""Helpers for the REST service tests: real unix users and groups (PAM), a site with an [api]
section, a real uvicorn HTTPS server on 127.0.0.1 with a generated self-signed certificate.

Traffic goes to 127.0.0.1 only; every wait is bounded; the server is stopped by its PID.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Site, fake_bzimage, make_site

PASSWORD = "Corr3ct-horse-battery"


@dataclass
class Accounts:
    """Unix groups (image, pool, admin) and users with passwords, unique to this test run."""

    suffix: str
    groups: dict[str, str] = field(default_factory=dict)  # role -> group name
    users: dict[str, str] = field(default_factory=dict)  # role -> user name

    def user(self, role: str) -> str:
        return self.users[role]


def _run(*argv: str, input: str | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, input=input, timeout=60)


@contextlib.contextmanager
def unix_accounts(roles: tuple[str, ...] = ("image", "pool", "admin", "outsider", "locked",
                                            "browser")) -> Iterator[Accounts]:
    """Create groups dpi<sfx>, dpp<sfx>, dpa<sfx> and one user per role (password PASSWORD);
    remove them all afterwards."""
    acc = Accounts(suffix=secrets.token_hex(3))
    made_users: list[str] = []
    made_groups: list[str] = []
    try:
        for role, prefix in (("image", "dpi"), ("pool", "dpp"), ("admin", "dpa")):
            name = f"{prefix}{acc.suffix}"
            _run("groupadd", name)
            made_groups.append(name)
            acc.groups[role] = name
        member_of = {"image": ["image"], "pool": ["pool"], "admin": ["admin"],
                     "browser": ["image"]}
        for role in roles:
            name = f"dpu{role[:4]}{acc.suffix}"
            extra = [acc.groups[g] for g in member_of.get(role, [])]
            argv = ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin"]
            if extra:
                argv += ["-G", ",".join(extra)]
            _run(*argv, name)
            made_users.append(name)
            _run("chpasswd", input=f"{name}:{PASSWORD}\n")
            acc.users[role] = name
        yield acc
    finally:
        for name in made_users:
            subprocess.run(["userdel", name], capture_output=True, timeout=60)
        for name in made_groups:
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api_site(root: Path, acc: Accounts | None, **api: object) -> Site:
    """A site whose [groups] are the test's groups and whose [api] uses a fresh certificate."""
    from pxe.api import tls

    site = make_site(root)
    tls.make_cert(root / "api.crt", root / "api.key", ["localhost"], ["127.0.0.1"])
    settings: dict[str, object] = {
        "address": "127.0.0.1", "port": free_port(), "workers": 1,
        "cert": str(root / "api.crt"), "key": str(root / "api.key"),
        "auth": ["pam", "file"], "password_file": str(root / "api-passwords"),
        "failure_delay": 0.0, "lockout_failures": 3, "lockout_address_failures": 1000,
        "ca_file": str(root / "api.crt"),
    }
    settings.update(api)
    settings["server"] = f"https://127.0.0.1:{settings['port']}"
    lines = ["", "[api]"] + [f"{k} = {_toml(v)}" for k, v in settings.items()]
    if acc is not None:
        lines += ["", "[groups]", f'image = "{acc.groups["image"]}"',
                  f'pool = "{acc.groups["pool"]}"']
        lines.insert(2, f'admin_group = "{acc.groups["admin"]}"')
    with open(site.config_path, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    return site


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Server:
    site: Site
    url: str
    cert: Path
    process: subprocess.Popen
    log: Path

    def client(self, **kw: object) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        return httpx.Client(base_url=self.url, verify=ctx, timeout=30.0, **kw)  # type: ignore[arg-type]

    def token(self, user: str, password: str = PASSWORD) -> str:
        with self.client() as c:
            r = c.post("/api/v1/token", auth=(user, password))
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM to the PID we started
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextlib.contextmanager
def running_server(site: Site) -> Iterator[Server]:
    cfg = site.cfg
    api = cfg.raw["api"]
    url = f"https://127.0.0.1:{api['port']}"
    log = site.root / "api-server.log"
    env = {**os.environ, "DYNPROV_CONFIG": str(site.config_path)}
    env.pop("SUDO_USER", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pxe.cli.main", "api", "serve"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = Server(site, url, Path(api["cert"]), proc, log)
    try:
        ctx = ssl.create_default_context(cafile=api["cert"])
        deadline = time.monotonic() + 30
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"api server exited {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", verify=ctx, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"api server not answering:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_bundle(tmp: Path, label: str, extra: int = 0) -> Path:
    """A small valid bundle (kernel + initrd), ``extra`` random bytes in the initrd."""
    from pxe.bundle import build_bundle

    tmp.mkdir(parents=True, exist_ok=True)
    kernel = fake_bzimage(tmp / f"{label}.vmlinuz", os.urandom(2048))
    initrd = tmp / f"{label}.initrd"
    initrd.write_bytes(os.urandom(4096 + extra))
    out = tmp / f"{label}.bundle"
    build_bundle(out, label=label, kernel=kernel, initrd=initrd)
    return out


def repository_files(site: Site) -> list[str]:
    """Every file under the image repository (bundles and anything left in .incoming)."""
    repo = site.cfg.paths.state_dir / "images"
    if not repo.exists():
        return []
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()
                  and p.name != "repository.lock")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates unix users (root only)")
