"""Who is calling, and may they: HTTP Basic (PAM or a bcrypt password file), bearer tokens,
lockout after repeated failures, and the unix groups of the commands.

- Basic credentials are checked against the methods of ``[api] auth`` in order: "pam" (the site's
  accounts, pxe.api.pam) and "file" (``user:bcrypt-hash[:group,group]`` lines; the groups are
  added to the user's unix groups, for portal accounts that have no unix account).
- ``POST /api/v1/token`` trades Basic credentials for a bearer token: ``dp1.<payload>.<mac>``,
  the payload ``{"sub", "src", "iat", "exp", "jti"}`` in base64url, the mac HMAC-SHA256 with the
  server secret (``<state_dir>/api/secret``, 0600, made once; `pxe-stage api revoke-tokens`
  replaces it, which ends every token). A token says who, never what: groups are looked up at
  every request, so removing someone from a group takes effect at once.
- Failed logins are counted per user name and per client address in
  ``<state_dir>/api/failures.json`` (under a lock: the HTTP workers are separate processes). Too
  many within ``lockout_window`` lock that user (or address) out for ``lockout_seconds``: 429
  with Retry-After, even for the right password. Every failure also waits ``failure_delay``
  seconds (asynchronously) before it is answered.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import grp
import hashlib
import hmac
import json
import logging
import os
import pwd
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pxe import atomic, authz, validate
from pxe.api.settings import ApiSettings
from pxe.config import Groups
from pxe.errors import InputError

log = logging.getLogger("dynprov.api.auth")

TOKEN_PREFIX = "dp1"
SECRET_BYTES = 32
_dummy: list[bytes] = []  # a hash to check unknown users against, so they take as long


class AuthError(Exception):
    """A refusal: ``status`` 401 (who are you), 403 (not allowed) or 429 (locked out)."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None,
                 bearer_error: str | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.bearer_error = bearer_error


@dataclass(frozen=True)
class Identity:
    user: str
    source: str  # "pam", "file" or "token:pam" ...
    groups: frozenset[str] = field(default_factory=frozenset)

    def roles(self, cfg_groups: Groups, admin_group: str) -> list[str]:
        admin = self.user == "root" or admin_group in self.groups
        out = ["read"]
        if admin or cfg_groups.image in self.groups:
            out.append("image")
        if admin or cfg_groups.pool in self.groups:
            out.append("pool")
        if admin:
            out.append("admin")
        return out


# -- the server secret and tokens --------------------------------------------------------------
class Secret:
    """The HMAC key, read again when the file changes (revoke-tokens in another process)."""

    def __init__(self, path: Path):
        self.path = path
        self._key: bytes | None = None
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def ensure(self) -> None:
        """Create the secret (0600, in a 0700 directory) if there is none yet."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if not self.path.exists():
            with contextlib.suppress(FileExistsError):
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(secrets.token_bytes(SECRET_BYTES))
                    fh.flush()
                    os.fsync(fh.fileno())

    def rotate(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic.write_bytes(self.path, secrets.token_bytes(SECRET_BYTES), mode=0o600)

    def key(self) -> bytes:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp != self._stamp or self._key is None:
            with self._lock:
                if st.st_mode & 0o077:
                    raise RuntimeError(f"{self.path} is readable by others; refusing to use it")
                data = self.path.read_bytes()
                if len(data) < 16:
                    raise RuntimeError(f"{self.path} is too short to be a secret")
                self._key, self._stamp = data, stamp
        return self._key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(key: bytes, user: str, source: str, lifetime: int,
                now: float | None = None) -> tuple[str, int]:
    """A signed token for ``user`` and its expiry (unix time)."""
    iat = int(time.time() if now is None else now)
    exp = iat + int(lifetime)
    payload = json.dumps({"sub": user, "src": source, "iat": iat, "exp": exp,
                          "jti": secrets.token_hex(8)}, separators=(",", ":")).encode()
    body = f"{TOKEN_PREFIX}.{_b64(payload)}"
    mac = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}", exp


def check_token(key: bytes, token: str, now: float | None = None) -> tuple[str, str]:
    """(user, source) of a valid token; AuthError 401 for a forged, damaged or expired one."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or len(token) > 1024:
        raise AuthError(401, "invalid token (not a dynprov token)", bearer_error="invalid_token")
    body = f"{parts[0]}.{parts[1]}"
    try:
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise AuthError(401, "invalid token (bad signature)", bearer_error="invalid_token") \
            from None
    expected = hmac.new(key, body.encode("ascii", "replace"), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise AuthError(401, "invalid token (bad signature; forged, or issued before the "
                             "server secret was replaced)", bearer_error="invalid_token")
    try:
        data = json.loads(_unb64(parts[1]))
        user, source, exp = str(data["sub"]), str(data["src"]), int(data["exp"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise AuthError(401, "invalid token (bad payload)", bearer_error="invalid_token") \
            from None
    if (time.time() if now is None else now) >= exp:
        raise AuthError(401, "token expired: log in again (POST /api/v1/token)",
                        bearer_error="invalid_token")
    return user, source


# -- the password file ------------------------------------------------------------------------
@dataclass(frozen=True)
class FileUser:
    hash: bytes
    groups: frozenset[str]


class PasswordFile:
    """``user:bcrypt-hash[:group,group]`` per line; '#' comments. Re-read when it changes."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, FileUser] = {}
        self._lock = threading.Lock()

    def users(self) -> dict[str, FileUser]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with self._lock:
                if st.st_mode & 0o022:
                    raise RuntimeError(f"{self.path} is writable by group or others; refusing it")
                self._users = parse_password_file(self.path.read_text(), str(self.path))
                self._stamp = stamp
        return self._users

    def check(self, user: str, password: str) -> FileUser | None:
        import bcrypt

        entry = self.users().get(user)
        if entry is None and not _dummy:
            _dummy.append(bcrypt.hashpw(b"-", bcrypt.gensalt(12)))
        try:
            ok = bcrypt.checkpw(password.encode("utf-8"), entry.hash if entry else _dummy[0])
        except ValueError:
            ok = False
        return entry if ok and entry is not None else None


def parse_password_file(text: str, where: str = "password file") -> dict[str, FileUser]:
    out: dict[str, FileUser] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) not in (2, 3) or not parts[1].startswith(("$2a$", "$2b$", "$2y$")):
            raise InputError(f"{where}:{n}: expected user:bcrypt-hash[:group,group]")
        user = validate.unix_name(parts[0], "user")
        groups = [g for g in (parts[2].split(",") if len(parts) == 3 else []) if g]
        for g in groups:
            validate.unix_name(g, "group")
        out[user] = FileUser(parts[1].encode("ascii"), frozenset(groups))
    return out


def hash_password(password: str, rounds: int = 12) -> str:
    import bcrypt

    if len(password.encode("utf-8")) > 72:
        raise InputError("password longer than 72 bytes (bcrypt's limit)")
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


def set_password(path: Path, user: str, password: str | None, groups: Iterable[str] = (),
                 rounds: int = 12) -> None:
    """Add, change (``password``) or remove (None) one user of the password file, atomically."""
    validate.unix_name(user, "user")
    groups = [validate.unix_name(g, "group") for g in groups]
    with atomic.locked(path.with_name(path.name + ".lock")):
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if ln.split(":", 1)[0].strip() != user]
        if password is None and len(kept) == len(lines):
            raise InputError(f"user {user!r} is not in {path}")
        if password is not None:
            entry = f"{user}:{hash_password(password, rounds)}"
            kept.append(entry + (f":{','.join(groups)}" if groups else ""))
        atomic.write_text(path, "".join(f"{ln}\n" for ln in kept), mode=0o600)


# -- failed logins ----------------------------------------------------------------------------
class Lockout:
    """Failed-login records shared by the worker processes (a small JSON file under a lock)."""

    def __init__(self, s: ApiSettings):
        self.s = s
        self.path = s.api_dir / "failures.json"
        self.lock = s.api_dir / "failures.lock"

    def _load(self) -> dict[str, list[float]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _limit(self, key: str) -> int:
        return self.s.lockout_failures if key.startswith("user:") else \
            self.s.lockout_address_failures

    def locked(self, keys: Iterable[str], now: float | None = None) -> tuple[str, int] | None:
        """(key, seconds left) of the first locked key, else None."""
        now = time.time() if now is None else now
        if not self.path.exists():
            return None
        with atomic.locked(self.lock, shared=True):
            data = self._load()
        for key in keys:
            times = [t for t in data.get(key, []) if now - t < self.s.lockout_window]
            if len(times) >= self._limit(key):
                left = max(times) + self.s.lockout_seconds - now
                if left > 0:
                    return key, int(left) + 1
        return None

    def failed(self, keys: Iterable[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        horizon = max(self.s.lockout_window, self.s.lockout_seconds)
        self.s.api_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic.locked(self.lock):
            data = {k: [t for t in v if now - t < horizon] for k, v in self._load().items()}
            data = {k: v for k, v in data.items() if v}
            for key in keys:
                data.setdefault(key, []).append(now)
                data[key] = data[key][-1000:]
            atomic.write_text(self.path, json.dumps(data), mode=0o600)

    def succeeded(self, user_key: str) -> None:
        if not self.path.exists():
            return
        with atomic.locked(self.lock):
            data = self._load()
            if data.pop(user_key, None) is not None:
                atomic.write_text(self.path, json.dumps(data), mode=0o600)


# -- putting it together ----------------------------------------------------------------------
class Authenticator:
    def __init__(self, s: ApiSettings):
        self.s = s
        self.secret = Secret(s.api_dir / "secret")
        self.lockout = Lockout(s)
        self.password_file = PasswordFile(s.password_file) if s.password_file else None

    def groups_of(self, user: str, source: str) -> frozenset[str]:
        names = set(authz.user_groups(user))
        if source.endswith("file") and self.password_file is not None:
            entry = self.password_file.users().get(user)
            if entry is not None:
                names |= entry.groups
        return frozenset(names)

    def _account_exists(self, user: str, source: str) -> bool:
        if source.endswith("file"):
            return self.password_file is not None and user in self.password_file.users()
        try:
            pwd.getpwnam(user)
        except KeyError:
            return False
        return True

    def from_token(self, token: str) -> Identity:
        user, source = check_token(self.secret.key(), token)
        if not self._account_exists(user, source):
            raise AuthError(401, f"invalid token: account {user!r} no longer exists",
                            bearer_error="invalid_token")
        return Identity(user, f"token:{source}", self.groups_of(user, source))

    def check_password(self, user: str, password: str, client: str | None) -> str | None:
        """The method that accepted ``user``/``password`` ("pam" or "file"), else None.
        Blocking (PAM, bcrypt): call from a worker thread."""
        try:
            validate.unix_name(user, "user")
        except InputError:
            return None
        for method in self.s.auth:
            if method == "pam":
                from pxe.api import pam

                ok, reason = pam.authenticate(user, password, self.s.pam_service, client)
                if ok:
                    return "pam"
                log.debug("PAM refused %s from %s: %s", user, client or "?", reason)
            elif method == "file" and self.password_file is not None:
                if self.password_file.check(user, password) is not None:
                    return "file"
        return None

    def lockout_keys(self, user: str, client: str | None) -> list[str]:
        keys = [f"user:{user}"]
        if client:
            keys.append(f"addr:{client}")
        return keys

    def issue(self, identity: Identity) -> tuple[str, int]:
        source = identity.source.removeprefix("token:")
        return issue_token(self.secret.key(), identity.user, source, self.s.token_lifetime)


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
