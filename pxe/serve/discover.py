"""POST /discover: a machine with an unknown MAC, booted into the discovery image, reports its
hardware (form fields `mac`, `facts`). pxe.discovery decides and bounds what is kept.

Answers: 200 `ok` (stored), 400 bad request, 403 discovery is off, 409 the MAC is a node's,
429 reported too recently (nothing written), 507 the discovered table is full. The image
treats every answer but 200/429 as final and keeps waiting for the admin either way.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from pxe import db, discovery, validate
from pxe.config import Config
from pxe.errors import InputError

log = logging.getLogger("dynprov.serve.discover")

MAX_BODY = 16 << 10
_ANSWERS = {discovery.STORED: (200, "ok\n"), discovery.OFF: (403, "discovery is off\n"),
            discovery.KNOWN: (409, "known node: boot it with set-boot\n"),
            discovery.LIMITED: (429, "reported too recently\n"),
            discovery.FULL: (507, "discovered table full\n")}
_local = threading.local()
_full_warned = [0.0]  # when "table full" was last logged (at most once a minute)


def _connection(cfg: Config) -> sqlite3.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "path", None) != cfg.database:
        conn = _local.conn = db.connect(cfg.database)
        _local.path = cfg.database
    return conn


def _record(cfg: Config, settings: discovery.Settings, mac: str, client: str | None,
            facts: str) -> str:
    """In the pool's thread: its own connection (SQLite objects stay in their thread)."""
    return discovery.record(_connection(cfg), settings, mac, client, facts)


def _settings(request: Request) -> discovery.Settings:
    state = request.app.state
    if getattr(state, "discovery", None) is None:
        state.discovery = discovery.load(state.cfg)
    return state.discovery


async def report(request: Request) -> PlainTextResponse:
    cfg: Config = request.app.state.cfg
    client = request.client.host if request.client else None
    try:
        settings = _settings(request)
    except InputError as exc:
        log.error("discovery: %s", exc)
        return PlainTextResponse("discovery is misconfigured\n", status_code=503)
    if not settings.enabled:  # cheapest answer first: a flood costs no parsing
        code, text = _ANSWERS[discovery.OFF]
        return PlainTextResponse(text, status_code=code)
    length = request.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > MAX_BODY:
        return PlainTextResponse("report too large or without length\n", status_code=413)
    body = await request.body()
    if len(body) > MAX_BODY:
        return PlainTextResponse("report too large\n", status_code=413)
    try:
        pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=4)
        if set(pairs) - {"mac", "facts"} or any(len(v) != 1 for v in pairs.values()):
            raise ValueError("expected the form fields mac and facts once each")
        mac = validate.mac(pairs.get("mac", [""])[0])
    except (UnicodeDecodeError, ValueError, InputError) as exc:
        return PlainTextResponse(f"bad request: {exc}\n", status_code=400)
    facts = pairs.get("facts", [""])[0]
    try:
        outcome = await run_in_threadpool(_record, cfg, settings, mac, client, facts)
    except sqlite3.Error as exc:
        log.error("discovery report of %s not recorded: state database: %s", mac, exc)
        return PlainTextResponse("state database unavailable, try again\n", status_code=503)
    if outcome == discovery.STORED:
        log.info("discovered %s (%s)", mac, client)
    elif outcome == discovery.FULL and time.monotonic() - _full_warned[0] > 60:
        _full_warned[0] = time.monotonic()
        log.warning("discovery: the table holds max_machines=%d machines; %s and others are "
                    "not recorded (adopt some, or drop them: pxe-stage nodes discovered "
                    "--forget MAC | --forget-all)",
                    settings.max_machines, mac)
    code, text = _ANSWERS[outcome]
    return PlainTextResponse(text, status_code=code)
