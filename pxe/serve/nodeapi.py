"""The node API of `pxe-stage serve`: a booted node asks for its own next image or a reboot.

Used by a scheduler's node-side helper (the Slurm face's `dynprov-slurm helper` and `reboot`),
never by users. Every route is a form POST (application/x-www-form-urlencoded, like /report, so
busybox wget can send it) and answers one line of text.

Authentication. The one-time boot token (kernel command line) is consumed by the node's "ready"
report, so it cannot authenticate a node for the rest of its life. Instead the node enrolls once
per boot, before "ready", with that token and receives a random node key; the server keeps only
its SHA-256 (settings key ``node-key:<node>``). A new enrollment replaces the key, so a re-imaged
node's old key dies with the old system. A node only ever holds its own key: it can change only
itself.

    POST /node/enroll      node, token        -> 200 <key>        (token still unused)
    POST /node/secret      node, token, name  -> 200 <bytes>      (token still unused)
    POST /node/next-image  node, key, image   -> 200 ok ...       (next network boot = image)
    POST /node/reboot      node, key          -> 200 ok run N     (a provisioning run power-
                                                                   cycles the node into it)

Node secrets. Files an admin puts into ``<state_dir>/node-secrets/`` (root only; e.g. Slurm's
munge key as ``munge.key``) reach a booted node only through /node/secret with its unused boot
token, never through the public HTTP/TFTP roots. The token itself sits in the node's boot file,
which those roots serve: so enroll and each secret work once per boot token, and only from the
node's inventory address when it has one; a second request is refused and logged.

Answers: 200 ok, 400 malformed request, 403 refused (wrong/used token, wrong key, node outside
the scheduler's pool), 404 unknown node or image, 409 refused by the run (e.g. in a run for
another image), 503 state database unavailable. Every refusal is an ``events`` row
(``node-api-refused``) and changes nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import stat
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from pxe import db, validate
from pxe.config import Config
from pxe.errors import DynprovError, InputError
from pxe.serve import callhome

log = logging.getLogger("dynprov.serve.nodeapi")

KEY_SETTING = "node-key:"
ONCE_SETTING = "node-once:"  # <what>:<node> -> SHA-256 of the boot token it was done with
MAX_BODY = 4 << 10
SECRETS_DIR = "node-secrets"
MAX_SECRET = 64 << 10


class Answer(Exception):
    """A refusal: HTTP status and the one line the node sees."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


def _fields(body: bytes, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True,
                         max_num_fields=len(allowed) * 2)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Answer(400, f"bad request: not a form: {exc}") from None
    unknown = sorted(set(pairs) - set(allowed))
    if unknown:
        raise Answer(400, f"bad request: unknown field {unknown[0]!r}")
    out = {}
    for key in allowed:
        values = pairs.get(key, [])
        if len(values) != 1 or not values[0]:
            raise Answer(400, f"bad request: field {key!r} missing or repeated")
        out[key] = values[0]
    try:
        validate.hostname(out["node"])
        if "image" in out:
            validate.label(out["image"], "image label")
        if "name" in out:
            validate.label(out["name"], "secret name")
    except InputError as exc:
        raise Answer(400, f"bad request: {exc}") from None
    return out


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _refuse(conn: sqlite3.Connection, node: str | None, status: int, why: str) -> Answer:
    with db.transaction(conn):
        db.log_event(conn, "node-api-refused", node, why)
    return Answer(status, f"refused: {why}" if status == 403 else why)


def _node(conn: sqlite3.Connection, node: str) -> sqlite3.Row:
    row = conn.execute("SELECT name, ip, arch, pool, boot_token, boot_target, desired_os, current_os "
                       "FROM nodes WHERE name = ?", (node,)).fetchone()
    if row is None:
        raise _refuse(conn, None, 404, f"unknown node {node!r}")
    return row


def _check_key(conn: sqlite3.Connection, node: str, key: str) -> None:
    stored = db.get_setting(conn, KEY_SETTING + node)
    if not stored or not hmac.compare_digest(stored, key_digest(key)):
        why = "node not enrolled" if not stored else "wrong node key"
        raise _refuse(conn, node, 403, f"{node}: {why}")


def _check_pool(cfg: Config, conn: sqlite3.Connection, row: sqlite3.Row) -> None:
    from pxe.pools import scheduler_pool

    pool = scheduler_pool(cfg)
    if row["pool"] != pool:
        raise _refuse(conn, row["name"], 403,
                      f"{row['name']} is in pool {row['pool']}, not the scheduler's pool {pool}")


# -- the actions (run in the thread pool) ----------------------------------------------------------
def _check_token(conn: sqlite3.Connection, node: str, token: str, client: str, what: str
                 ) -> None:
    """The node's unused boot token, from the node's own address (when the inventory has one),
    and only once per boot for ``what``: the token is in the boot file, which the TFTP/HTTP
    roots serve to anyone on the provisioning network; whoever comes second is refused, so a
    thief cannot use it unnoticed (the node's own request fails and is logged)."""
    row = _node(conn, node)
    expected = row["boot_token"]
    if not expected or not hmac.compare_digest(token, expected):
        raise _refuse(conn, node, 403, f"{node}: " + ("token already used" if not expected
                                                      else "wrong token"))
    if row["ip"] and client != row["ip"]:
        raise _refuse(conn, node, 403, f"{node}: request from {client}, not the node's address")
    once = f"{ONCE_SETTING}{what}:{node}"
    if db.get_setting(conn, once) == key_digest(token):
        raise _refuse(conn, node, 403, f"{node}: {what} already done with this boot's token")


def _used_once(conn: sqlite3.Connection, node: str, token: str, what: str) -> None:
    db.set_setting(conn, f"{ONCE_SETTING}{what}:{node}", key_digest(token))


def enroll(cfg: Config, conn: sqlite3.Connection, node: str, token: str, client: str = "") -> str:
    """A new node key for a node presenting its still unused boot token (once per boot)."""
    _check_token(conn, node, token, client, "enroll")
    key = secrets.token_urlsafe(32)
    with db.transaction(conn):
        db.set_setting(conn, KEY_SETTING + node, key_digest(key))
        _used_once(conn, node, token, "enroll")
        db.log_event(conn, "node-enrolled", node)
    return key


def secret(cfg: Config, conn: sqlite3.Connection, node: str, token: str, name: str,
           client: str = "") -> bytes:
    """A node secret (``<state_dir>/node-secrets/<name>``) for a node with its unused token
    (each secret once per boot)."""
    _check_token(conn, node, token, client, f"secret-{name}")
    path = cfg.paths.state_dir / SECRETS_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise _refuse(conn, node, 404, f"no node secret {name!r}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SECRET:
            raise _refuse(conn, node, 404, f"no node secret {name!r}")
        data = os.read(fd, MAX_SECRET + 1)
    finally:
        os.close(fd)
    with db.transaction(conn):
        _used_once(conn, node, token, f"secret-{name}")
        db.log_event(conn, "node-secret", node, name)
    return data


def next_image(cfg: Config, conn: sqlite3.Connection, node: str, key: str, image: str) -> str:
    """Point the node's next network boot at ``image`` (boot files + a new call-home token)."""
    from pxe.inventory import Inventory
    from pxe.setboot import set_boot

    row = _node(conn, node)
    _check_key(conn, node, key)
    _check_pool(cfg, conn, row)
    img = conn.execute("SELECT arch FROM images WHERE label = ?", (image,)).fetchone()
    if img is None:
        raise _refuse(conn, node, 404, f"unknown image {image!r}")
    if img["arch"] != row["arch"]:
        raise _refuse(conn, node, 409, f"image {image} is for {img['arch']}, {node} is "
                                       f"{row['arch']}")
    try:
        set_boot(cfg, [node], image, Inventory(cfg, conn))
    except DynprovError as exc:
        raise _refuse(conn, node, 409, f"cannot set the next boot of {node}: {exc}") from None
    with db.transaction(conn):
        db.log_event(conn, "node-next-image", node, image)
    return f"ok {node} next boot {image}"


def reboot(cfg: Config, conn: sqlite3.Connection, node: str, key: str) -> str:
    """Start a provisioning run into the node's next image (else the one it runs): the run
    driver power-cycles it through its BMC, so a node that cannot reboot itself still does."""
    from pxe import run
    from pxe.pools import scheduler_pool

    row = _node(conn, node)
    _check_key(conn, node, key)
    _check_pool(cfg, conn, row)
    label = row["desired_os"] if row["boot_target"] == "os" and row["desired_os"] \
        else row["current_os"]
    if not label:
        raise _refuse(conn, node, 409, f"{node}: no image to boot (none requested, none running)")
    req = run.request(cfg, conn, [node], label, force=True, pool=scheduler_pool(cfg))
    if req.refused:
        raise _refuse(conn, node, 409, req.refused[0].reason)
    run.spawn_driver(cfg)
    run_id = req.run_id if req.started else req.joined.get(node)
    with db.transaction(conn):
        db.log_event(conn, "node-reboot", node, label, run_id)
    return f"ok {node} provisioning {label} (run {run_id})"


# -- the routes ------------------------------------------------------------------------------------
async def _handle(request: Request, allowed: tuple[str, ...], action: str) -> Response:
    cfg: Config = request.app.state.cfg
    client = request.client.host if request.client else "?"
    try:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise Answer(413, "request too large")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise Answer(413, "request too large")
        fields = _fields(body, allowed)
        result = await run_in_threadpool(_act, cfg, action, fields, client)
    except Answer as exc:
        log.warning("node api %s from %s: %s", action, client, exc.text)
        return PlainTextResponse(exc.text + "\n", status_code=exc.status)
    except sqlite3.Error as exc:
        log.error("node api %s from %s: state database: %s", action, client, exc)
        return PlainTextResponse("state database unavailable, try again\n", status_code=503)
    if isinstance(result, bytes):  # a secret: never logged
        log.info("node api %s from %s (%s): %s sent", action, fields["node"], client,
                 fields["name"])
        return Response(result, media_type="application/octet-stream")
    log.info("node api %s from %s (%s): %s", action, fields["node"], client,
             "key issued" if action == "enroll" else result)
    return PlainTextResponse(result + "\n")


def _act(cfg: Config, action: str, fields: dict[str, str], client: str) -> str | bytes:
    conn = callhome._connection(cfg)
    if action == "secret":
        return secret(cfg, conn, fields["node"], fields["token"], fields["name"], client)
    if action == "enroll":
        return enroll(cfg, conn, fields["node"], fields["token"], client)
    if action == "next-image":
        return next_image(cfg, conn, fields["node"], fields["key"], fields["image"])
    return reboot(cfg, conn, fields["node"], fields["key"])


async def enroll_route(request: Request) -> Response:
    return await _handle(request, ("node", "token"), "enroll")


async def secret_route(request: Request) -> Response:
    return await _handle(request, ("node", "token", "name"), "secret")


async def next_image_route(request: Request) -> Response:
    return await _handle(request, ("node", "key", "image"), "next-image")


async def reboot_route(request: Request) -> Response:
    return await _handle(request, ("node", "key"), "reboot")


ROUTES = [
    Route("/node/enroll", enroll_route, methods=["POST"]),
    Route("/node/secret", secret_route, methods=["POST"]),
    Route("/node/next-image", next_image_route, methods=["POST"]),
    Route("/node/reboot", reboot_route, methods=["POST"]),
]
