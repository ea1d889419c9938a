"""The HTTP application of `pxe-stage serve`: one Starlette app, run by uvicorn.

Routes: POST /report (call-home), POST /node/* (pxe.serve.nodeapi), GET /healthz,
GET /metrics (Prometheus text), and every other GET/HEAD path is a loader config rendered from
the database (boot.ipxe, ipxe/<mac>.ipxe: pxe.serve.bootconfigs) or a file of the HTTP root
(blobs/<sha>...).
More routes (the REST API) go in through ``routes=``; they are matched before the file
catch-all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Route

from pxe.config import Config
from pxe.serve import agent, callhome, discover, files, http, metrics, nodeapi
from pxe.serve.bootconfigs import BootConfigs
from pxe.serve.settings import ServeSettings

HEARTBEAT_STALE = 5.0  # seconds without a heartbeat before a TFTP worker counts as stuck
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class CountResponses:
    """ASGI middleware: HTTP status codes and body bytes into this process's metrics row."""

    def __init__(self, app: Any, row: metrics.Row):
        self.app = app
        self.row = row
        self.codes = {c: metrics.slot("dynprov_http_requests_total", c)
                      for c in metrics.HTTP_CODES}
        self.bytes = metrics.slot("dynprov_http_bytes_total")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        row, codes, nbytes = self.row, self.codes, self.bytes

        async def counting(message: Any) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                row.add(codes.get(str(message["status"]), codes["other"]))
            elif kind == "http.response.body":
                row.add(nbytes, len(message.get("body", b"")))
            elif kind == http.ZEROCOPY:
                count = message.get("count")
                if count is None:
                    count = os.fstat(message["file"].fileno()).st_size - (message.get("offset") or 0)
                row.add(nbytes, count)
            elif kind == http.PATHSEND:
                row.add(nbytes, os.stat(message["path"]).st_size)
            await send(message)

        await self.app(scope, receive, counting)


async def healthz(request: Request) -> PlainTextResponse:
    state = request.app.state
    cfg: Config = state.cfg
    problems = [f"{what} {path} is not a directory"
                for what, path in (("TFTP root", cfg.paths.tftp_root),
                                   ("HTTP root", cfg.paths.http_root))
                if not os.path.isdir(path)]
    counters: metrics.Counters | None = state.counters
    if counters is not None:
        for r in state.tftp_rows:
            age = counters.heartbeat_age(r)
            if age is None or age > HEARTBEAT_STALE:
                problems.append(f"TFTP worker {r} is not answering")
    try:
        await run_in_threadpool(lambda: callhome._connection(cfg).execute("SELECT 1").fetchone())
    except Exception as exc:
        problems.append(f"state database: {exc}")
    if problems:
        return PlainTextResponse("\n".join(problems) + "\n", status_code=503)
    return PlainTextResponse("ok\n")


async def prometheus(request: Request) -> PlainTextResponse:
    state = request.app.state
    counters: metrics.Counters | None = state.counters
    if counters is None:
        return PlainTextResponse("", media_type=PROMETHEUS_TEXT)
    alive = sum(1 for r in state.tftp_rows
                if (age := counters.heartbeat_age(r)) is not None and age <= HEARTBEAT_STALE)
    extra = ["# HELP dynprov_tftp_workers_alive TFTP worker processes answering.",
             "# TYPE dynprov_tftp_workers_alive gauge",
             f"dynprov_tftp_workers_alive {alive}"]
    return PlainTextResponse(counters.render(extra), media_type=PROMETHEUS_TEXT)


def _blob_cache(cfg: Config) -> Any:
    """A service node's hook for a missing blob (pxe.blobcache), or None on the primary."""
    from pxe import blobcache, segments

    seg = segments.load(cfg)
    if not seg.name or not seg.primary_url:
        return None
    roots = [cfg.paths.http_root, cfg.paths.tftp_root]
    return lambda name: blobcache.serve_missing(seg, roots, name)


def create_app(cfg: Config, settings: ServeSettings, counters: metrics.Counters | None = None,
               row_index: int | None = None, tftp_rows: Sequence[int] = (),
               routes: Sequence[BaseRoute] = ()) -> Any:
    """The ASGI app; ``counters``/``row_index`` come from the daemon (None: no metrics)."""
    app = Starlette(routes=[
        Route("/report", callhome.report, methods=["POST"]),
        Route("/agent", agent.poll, methods=["POST"]),
        Route("/discover", discover.report, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *nodeapi.ROUTES,
        *routes,
        Route("/{path:path}", http.boot_file, methods=["GET"]),  # HEAD comes with GET
    ])
    row = counters.row(row_index) if counters is not None and row_index is not None else None
    app.state.cfg = cfg
    app.state.settings = settings
    app.state.http_root = files.root_of(cfg.paths.http_root)
    app.state.boot_configs = BootConfigs(cfg)
    app.state.fill_missing = _blob_cache(cfg)
    app.state.counters = counters
    app.state.metrics_row = row
    app.state.tftp_rows = tuple(tftp_rows)
    return CountResponses(app, row) if row is not None else app
