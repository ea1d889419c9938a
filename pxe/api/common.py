"""What every API handler shares: JSON answers, refusals with reasons, the caller's identity,
bounded JSON bodies and node sets, per-thread database connections, HTTPS-only middleware."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from pxe import db
from pxe.api.auth import AuthError, Identity
from pxe.authz import PermissionDenied
from pxe.config import Config
from pxe.errors import DynprovError, InputError, NotFound

MAX_JSON = 1 << 20
REALM = "dynprov"
log = logging.getLogger("dynprov.api")
WEB_CLIENT = "x-dynprov-client"  # the status page sends it: no Basic challenge (no browser popup)

Handler = Callable[[Request, Any], Awaitable[Response]]


class ApiError(Exception):
    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class Json(JSONResponse):
    """Compact JSON, never cached (the data are live and may be private)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> Json:
    return Json({"error": reason, "status": status}, status_code=status, headers=headers)


# -- per-thread state database connections -----------------------------------------------------
_local = threading.local()


def connection(cfg: Config) -> sqlite3.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "path", None) != cfg.database:
        conn = _local.conn = db.connect(cfg.database)
        _local.path = cfg.database
    return conn


class JsonCache:
    """Serialized answers of the big reads (node list, status), per worker process, reused until
    the state database's content changes (its change stamp, db.content_stamp: every content
    commit of any process moves it; heartbeats, leases and agent polls, which no answer shows,
    do not) or ``max_age`` passes (the status derives "timed out" from the clock)."""

    def __init__(self, max_age: float, entries: int = 16):
        self.max_age = max_age
        self.size = entries
        self.entries: dict[str, tuple[str, float, bytes]] = {}
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None
        self.path: Any = None

    def _version(self, cfg: Config) -> str:
        with self.lock:
            if self.conn is None or self.path != cfg.database:
                connection(cfg)  # makes the schema on first use
                if db.is_url(cfg.database):  # the stamp row moves with every commit, ours too
                    self.conn = db.connect(cfg.database)
                else:
                    self.conn = sqlite3.connect(cfg.db_path, timeout=30.0, isolation_level=None,
                                                check_same_thread=False)
                self.path = cfg.database
            return db.content_stamp(self.conn)

    def get(self, cfg: Config, key: str, build: Callable[[], Any]) -> bytes:
        """Blocking: call from a worker thread."""
        version = self._version(cfg)  # before the read: a commit during it shows next time
        now = time.monotonic()
        hit = self.entries.get(key)
        if hit is not None and hit[0] == version and now - hit[1] < self.max_age:
            return hit[2]
        body = dumps(build())
        with self.lock:
            if len(self.entries) >= self.size:
                self.entries.pop(min(self.entries, key=lambda k: self.entries[k][1]))
            self.entries[key] = (version, now, body)
        return body


def dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def json_bytes(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


# -- who is calling ----------------------------------------------------------------------------
def client_of(request: Request) -> str | None:
    return request.client.host if request.client else None


async def identify(request: Request, *, basic_only: bool = False) -> Identity:
    state = request.app.state
    header = request.headers.get("authorization", "")
    if not header:
        raise AuthError(401, "no credentials: send HTTP Basic credentials (user name and "
                             "password, e.g. to POST /api/v1/token) or Authorization: Bearer TOKEN")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and not basic_only:
        return state.auth.from_token(value.strip())
    if scheme != "basic":
        raise AuthError(401, f"unsupported authorization scheme {scheme!r} "
                             f"(use Basic{'' if basic_only else ' or Bearer'})")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8") \
            .partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise AuthError(401, "malformed Basic credentials") from None
    if not sep or not user:
        raise AuthError(401, "malformed Basic credentials (expected user:password)")
    auth = state.auth
    client = client_of(request)
    keys = auth.lockout_keys(user, client)
    locked = await run_in_threadpool(auth.lockout.locked, keys)
    if locked is not None:
        key, left = locked
        who = f"user {user}" if key.startswith("user:") else f"address {client}"
        raise AuthError(429, f"too many failed logins for {who}: locked out, try again in "
                             f"{left} s", retry_after=left)
    method = await run_in_threadpool(auth.check_password, user, password, client)
    if method is None:
        log.info("failed login of %r from %s", user, client or "?")
        await run_in_threadpool(auth.lockout.failed, keys)
        if state.settings.failure_delay > 0:
            await asyncio.sleep(state.settings.failure_delay)
        raise AuthError(401, "wrong user name or password")
    await run_in_threadpool(auth.lockout.succeeded, keys[0])
    groups = await run_in_threadpool(auth.groups_of, user, method)
    return Identity(user, method, groups)


ROLE_NEEDS = {"image": "image", "pool": "pool"}


def require(request: Request, who: Identity, role: str, action: str) -> None:
    """403 with the reason unless ``who`` has ``role`` (read, image, pool, admin, power)."""
    state = request.app.state
    cfg: Config = state.cfg
    admin = state.settings.admin_group
    roles = who.roles(cfg.groups, admin)
    if role == "power":
        if "pool" in roles or "admin" in roles:
            return
        raise AuthError(403, f"permission denied: {action} needs membership of group "
                             f"{cfg.groups.pool!r} or {admin!r} (user {who.user} is in neither)")
    if role in roles:
        return
    group = {"image": cfg.groups.image, "pool": cfg.groups.pool}.get(role)
    needed = f"group {group!r} or {admin!r}" if group else f"the admin group {admin!r}"
    raise AuthError(403, f"permission denied: {action} needs membership of {needed} "
                         f"(user {who.user} is not a member)")


def endpoint(role: str | None, action: str = "") -> Callable[[Handler], Callable[..., Any]]:
    """Wrap a handler: identify the caller (unless ``role`` is None), check the role, and turn
    every refusal into a JSON answer with the reason."""

    def wrap(fn: Handler) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            try:
                who = None
                if role is not None:
                    who = await identify(request)
                    if role != "read":
                        require(request, who, role, action)
                    request.state.user = who.user
                return await fn(request, who)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
                return answer_for(request, exc)

        return handler

    return wrap


def answer_for(request: Request, exc: Exception) -> Response:
    if isinstance(exc, AuthError):
        headers: dict[str, str] = {}
        if exc.status == 401:
            challenges = []
            if WEB_CLIENT not in request.headers:
                challenges.append(f'Basic realm="{REALM}", charset="UTF-8"')
            bearer = f'Bearer realm="{REALM}"'
            if exc.bearer_error:
                bearer += f', error="{exc.bearer_error}"'
            challenges.append(bearer)
            headers["www-authenticate"] = ", ".join(challenges)
        if exc.retry_after is not None:
            headers["retry-after"] = str(exc.retry_after)
        return error(exc.status, exc.reason, headers)
    if isinstance(exc, ApiError):
        return error(exc.status, exc.reason, exc.headers)
    if isinstance(exc, PermissionDenied):
        return error(403, str(exc))
    if isinstance(exc, InputError):
        return error(400, str(exc))
    if isinstance(exc, NotFound):
        return error(404, str(exc))
    if isinstance(exc, DynprovError):
        return error(409, str(exc))
    if isinstance(exc, sqlite3.Error):
        return error(503, f"state database unavailable: {exc}")
    if isinstance(exc, ClientDisconnect):
        return error(400, "client went away")
    log.exception("%s %s failed", request.method, request.url.path)
    return error(500, f"internal error: {type(exc).__name__}")


# -- request bodies and arguments --------------------------------------------------------------
async def json_body(request: Request, known: tuple[str, ...], required: tuple[str, ...] = ()
                    ) -> dict[str, Any]:
    """The request's JSON object: 415 if not declared JSON, 413 if too big, 400 if not JSON,
    not an object, with an unknown key or without a required one."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), "
                            f"not {ctype or 'nothing'!r}")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_JSON):
        raise ApiError(413, f"request body larger than {MAX_JSON} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON:
            raise ApiError(413, f"request body larger than {MAX_JSON} bytes")
    try:
        data = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ApiError(400, f"unknown key {unknown[0]!r} (known: {', '.join(known)})")
    for key in required:
        if key not in data:
            raise ApiError(400, f"missing key {key!r}")
    return data


def typed(data: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = data.get(key, default)
    if value is default:
        return value
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"{key}: must be a {kind.__name__}, got {value!r}")
    return value


def flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ApiError(400, f"query parameter {name}: expected true or false, got {value!r}")


def nodeset(spec: str, cfg: Config | None = None) -> list[str]:
    """Expand a node set, refusing (400) one that would name more than the site's cap
    (pxe.nodeset: counted before expanding) and any name that is not a valid node name."""
    if not isinstance(spec, str) or not spec.strip():
        raise ApiError(400, "empty node list")
    from pxe.nodeset import expand, max_nodes

    try:
        return expand(spec, max_nodes(cfg))
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
