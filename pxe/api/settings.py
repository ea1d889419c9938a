"""The `[api]` section of the site config, read and checked key by key.

Every problem is an InputError naming the file and the key. Keys (all optional until the
service is started; `cert` and `key` are then required):

    address, port, workers          where the HTTPS service listens (default 127.0.0.1:8443)
    cert, key                        PEM certificate chain and private key (HTTPS only)
    auth                             ["pam"], ["file"] or both, tried in that order
    pam_service                      PAM service name (default "dynprov"; /etc/pam.d/other if absent)
    password_file                    "user:bcrypt-hash[:group,group]" lines (`pxe-stage api passwd`)
    token_lifetime                   seconds a bearer token is valid (default 900)
    max_upload_bytes                 largest image upload (default: [images] max_bundle_bytes)
    lockout_failures, lockout_window, lockout_seconds
                                     N failed logins of one user within WINDOW s lock that user
                                     out for SECONDS s (default 5, 300, 300)
    lockout_address_failures         the same per client address (default 50)
    failure_delay                    seconds every failed login waits before its answer (1.0)
    admin_group                      unix group of the admins (default "fgadmin"); root is one
    public_status                    status page and its JSON readable without login (false)
    frame_ancestors                  origins that may embed the status page (CSP), ["'self'"]
    access_log                       log every request (false)
    timeout                          seconds a client may take to send a request's headers, and
                                     may stay silent in the middle of a body (default 10)
    max_per_client                   open connections one client address may hold, per worker (64)
    server, ca_file                  for the remote CLI on this host: the service's URL and the
                                     CA file that verifies its certificate
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pxe.config import Config
from pxe.errors import InputError

AUTH_METHODS = ("pam", "file")
_ORIGIN = re.compile(r"^(?:'self'|'none'|https?://[A-Za-z0-9.-]+(?::\d{1,5})?|\*\.[A-Za-z0-9.-]+)$")


@dataclass(frozen=True)
class ApiSettings:
    address: str = "127.0.0.1"
    port: int = 8443
    workers: int = 2
    cert: Path | None = None
    key: Path | None = None
    auth: tuple[str, ...] = ("pam",)
    pam_service: str = "dynprov"
    password_file: Path | None = None
    token_lifetime: int = 900
    max_upload_bytes: int | None = None
    lockout_failures: int = 5
    lockout_window: float = 300.0
    lockout_seconds: float = 300.0
    lockout_address_failures: int = 50
    failure_delay: float = 1.0
    admin_group: str = "fgadmin"
    public_status: bool = False
    frame_ancestors: tuple[str, ...] = ("'self'",)
    access_log: bool = False
    timeout: float = 10.0
    max_per_client: int = 64
    server: str | None = None
    ca_file: Path | None = None
    state_dir: Path = Path("/var/lib/dynprov")

    @property
    def api_dir(self) -> Path:
        """Our own corner of the state dir: token secret, failed-login records, upload locks."""
        return self.state_dir / "api"


_KEYS = {f.name for f in fields(ApiSettings)} - {"state_dir"}


def load(cfg: Config, **overrides: Any) -> ApiSettings:
    """Check `[api]`; ``overrides`` (command-line flags, None = not given) win."""
    raw = cfg.raw.get("api", {})
    if not isinstance(raw, dict):
        raise InputError(f"{cfg.path}: [api]: must be a table")
    where = f"{cfg.path}: api"
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    data = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    d = ApiSettings()

    def fail(key: str, problem: str) -> InputError:
        return InputError(f"{where}.{key}: {problem}")

    def get(key: str, kind: type, default: Any) -> Any:
        value = data.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise fail(key, f"must be a {kind.__name__}, got {value!r}")
        return value

    def number(key: str, kind: type, default: Any, low: float, high: float) -> Any:
        value = get(key, kind, default)
        if not low <= value <= high:
            raise fail(key, f"must be between {low} and {high}, got {value!r}")
        return value

    def path(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.startswith("/"):
            raise fail(key, f"must be an absolute path, got {value!r}")
        return Path(value)

    address = get("address", str, d.address)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise fail("address", f"not an IP address: {address!r}") from None
    auth = data.get("auth", list(d.auth))
    if (not isinstance(auth, list) or not auth or len(set(auth)) != len(auth)
            or not all(a in AUTH_METHODS for a in auth)):
        raise fail("auth", f"must be a non-empty list of {' and/or '.join(map(repr, AUTH_METHODS))}, "
                           f"got {auth!r}")
    password_file = path("password_file")
    if "file" in auth and password_file is None:
        raise fail("password_file", "missing key (auth includes \"file\")")
    pam_service = get("pam_service", str, d.pam_service)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", pam_service):
        raise fail("pam_service", f"not a PAM service name: {pam_service!r}")
    admin_group = get("admin_group", str, d.admin_group)
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", admin_group):
        raise fail("admin_group", f"not a unix group name: {admin_group!r}")
    ancestors = data.get("frame_ancestors", list(d.frame_ancestors))
    if not isinstance(ancestors, list) or not ancestors or not all(
            isinstance(a, str) and _ORIGIN.fullmatch(a) for a in ancestors):
        raise fail("frame_ancestors", "must be a list of origins such as \"https://portal.example\" "
                                      f"or \"'self'\", got {ancestors!r}")
    server = data.get("server")
    if server is not None and (not isinstance(server, str) or not server.startswith("https://")):
        raise fail("server", f"must be an https:// URL, got {server!r}")
    max_upload = data.get("max_upload_bytes")
    if max_upload is not None:
        max_upload = number("max_upload_bytes", int, 0, 1, 1 << 50)
    return ApiSettings(
        address=address,
        port=number("port", int, d.port, 1, 65535),
        workers=number("workers", int, max(1, min(os.cpu_count() or 1, 4)), 1, 64),
        cert=path("cert"),
        key=path("key"),
        auth=tuple(auth),
        pam_service=pam_service,
        password_file=password_file,
        token_lifetime=number("token_lifetime", int, d.token_lifetime, 30, 86400),
        max_upload_bytes=max_upload,
        lockout_failures=number("lockout_failures", int, d.lockout_failures, 1, 1000),
        lockout_window=number("lockout_window", float, d.lockout_window, 1.0, 86400.0),
        lockout_seconds=number("lockout_seconds", float, d.lockout_seconds, 1.0, 86400.0),
        lockout_address_failures=number("lockout_address_failures", int,
                                        d.lockout_address_failures, 1, 100000),
        failure_delay=number("failure_delay", float, d.failure_delay, 0.0, 10.0),
        admin_group=admin_group,
        public_status=get("public_status", bool, d.public_status),
        frame_ancestors=tuple(ancestors),
        access_log=get("access_log", bool, d.access_log),
        timeout=number("timeout", float, d.timeout, 0.1, 3600.0),
        max_per_client=number("max_per_client", int, d.max_per_client, 1, 100_000),
        server=server,
        ca_file=path("ca_file"),
        state_dir=cfg.paths.state_dir,
    )


def require_tls_files(cfg: Config, s: ApiSettings) -> tuple[Path, Path]:
    """The certificate and key, checked loadable: the service speaks HTTPS only."""
    import ssl

    where = f"{cfg.path}: api"
    if s.cert is None:
        raise InputError(f"{where}.cert: missing key (the service is HTTPS only; "
                         "`pxe-stage api make-cert` makes a self-signed pair for a test site)")
    if s.key is None:
        raise InputError(f"{where}.key: missing key (the private key of api.cert)")
    for key, p in (("cert", s.cert), ("key", s.key)):
        if not p.is_file():
            raise InputError(f"{where}.{key}: {p}: no such file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(s.cert), str(s.key))
    except ssl.SSLError as exc:
        raise InputError(f"{where}.cert/key: {s.cert} and {s.key} do not load as a "
                         f"certificate and its key: {exc.reason or exc}") from None
    except OSError as exc:
        raise InputError(f"{where}.key: {s.key}: {exc.strerror or exc}") from None
    if s.key.stat().st_mode & 0o077:
        raise InputError(f"{where}.key: {s.key} is readable by group or others; chmod 600 it")
    return s.cert, s.key
