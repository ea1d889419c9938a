"""POST /report: the provisioning initramfs (and the agent of a booted image) calls home.

Contract (docs/ARCHITECTURE.md): form fields `node`, `token`, `kind`
(booting|progress|installed|ready|failed), `detail`, sent as application/x-www-form-urlencoded
(busybox `wget --post-data`). Answers: 200 `ok`, 400 bad request, 403 refused token, 404 unknown
node. The report goes through pxe.reports.record_report() (which checks the one-time token and
logs every refusal in the state database). The server only records: the run driver acts on what
was reported (next boot, power; one actor owns power). After the answer is sent,
pxe.run.notify(cfg, outcome) makes sure a driver is running to do so.
"""

from __future__ import annotations

import importlib
import logging
import sqlite3
import threading
from urllib.parse import parse_qs

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from pxe import db, reports, validate
from pxe.config import Config
from pxe.errors import DynprovError, InputError, NotFound
from pxe.serve import metrics

log = logging.getLogger("dynprov.serve.callhome")

MAX_BODY = 16 << 10
FIELDS = ("node", "token", "kind", "detail", "facts")  # facts: optional, pxe.hwfacts

_local = threading.local()


class BadReport(Exception):
    pass


def _connection(cfg: Config) -> sqlite3.Connection:
    """One state-database connection per thread of the pool."""
    conn = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "path", None) != cfg.database:
        conn = _local.conn = db.connect(cfg.database)
        _local.path = cfg.database
    return conn


def parse(body: bytes) -> dict[str, str]:
    """The form fields, each given at most once; BadReport otherwise."""
    try:
        text = body.decode("utf-8")
        pairs = parse_qs(text, keep_blank_values=True, max_num_fields=len(FIELDS) * 2)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadReport(f"not a form: {exc}") from None
    unknown = sorted(set(pairs) - set(FIELDS))
    if unknown:
        raise BadReport(f"unknown field {unknown[0]!r}")
    repeated = sorted(k for k, v in pairs.items() if len(v) > 1)
    if repeated:
        raise BadReport(f"field {repeated[0]!r} given more than once")
    fields = {k: v[0] for k, v in pairs.items()}
    for key in ("node", "kind"):
        if not fields.get(key):
            raise BadReport(f"missing field {key!r}")
    try:
        validate.hostname(fields["node"])
    except InputError as exc:
        raise BadReport(str(exc)) from None
    if fields["kind"] not in reports.KINDS:
        raise BadReport(f"unknown kind {fields['kind']!r} (expected {', '.join(reports.KINDS)})")
    return fields


async def _body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise OverflowError
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise OverflowError
    return bytes(data)


async def report(request: Request) -> PlainTextResponse:
    state = request.app.state
    cfg: Config = state.cfg
    row: metrics.Row | None = state.metrics_row
    client = request.client.host if request.client else "?"

    def answer(code: int, text: str, kind: str, result: str) -> PlainTextResponse:
        if row is not None:
            kind = kind if kind in metrics.REPORT_KINDS else "invalid"
            row.add(metrics.slot("dynprov_reports_total", kind, result))
        return PlainTextResponse(text, status_code=code)

    try:
        fields = parse(await _body(request))
    except OverflowError:
        return answer(413, "report too large\n", "invalid", "bad_request")
    except BadReport as exc:
        log.warning("report from %s: bad request: %s", client, exc)
        return answer(400, f"bad request: {exc}\n", "invalid", "bad_request")
    node, kind = fields["node"], fields["kind"]
    detail = fields.get("detail", "")
    try:
        outcome = await run_in_threadpool(_record, cfg, node, fields.get("token") or None,
                                          kind, detail, fields.get("facts", ""))
    except reports.ReportRefused as exc:
        log.warning("report from %s (%s): %s", node, client, exc)
        return answer(403, "refused\n", kind, "refused")
    except NotFound as exc:
        log.warning("report from %s: %s", client, exc)
        return answer(404, "unknown node\n", kind, "unknown_node")
    except DynprovError as exc:
        log.warning("report from %s (%s): %s", node, client, exc)
        return answer(400, f"bad request: {exc}\n", kind, "bad_request")
    except sqlite3.Error as exc:
        log.error("report from %s (%s) not recorded: state database: %s", node, client, exc)
        return answer(503, "state database unavailable, try again\n", kind, "error")
    log.info("report from %s (%s): %s%s", node, client, kind, f": {detail}" if detail else "")
    response = answer(200, "ok", kind, "ok")
    response.background = BackgroundTask(run_in_threadpool, follow_up, cfg, outcome)
    return response


def _record(cfg: Config, node: str, token: str | None, kind: str,
            detail: str, facts: str = "") -> reports.Outcome:
    conn = _connection(cfg)
    outcome = reports.record_report(conn, node, token, kind, detail)
    if facts:  # only once the token was accepted; malformed lines are dropped, never an error
        from pxe import hwfacts

        parsed = hwfacts.parse(facts)
        if not hwfacts.is_empty(parsed):
            hwfacts.store(conn, node, parsed)
    return outcome


def follow_up(cfg: Config, outcome: reports.Outcome) -> None:
    """pxe.run.notify: make sure a run driver acts on the report (this server never does)."""
    try:
        run = importlib.import_module("pxe.run")
        run.notify(cfg, outcome)
    except Exception:
        log.exception("no run driver started for %s's %s report (the next request or "
                      "`pxe-stage run wait` starts one)", outcome.node, outcome.kind)
