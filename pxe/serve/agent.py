"""POST /agent: a booted image's agent polls (heartbeat) and learns whether to reboot now.

Form fields ``node``, ``token`` (this boot's call-home token, adopted at ``ready``), ``seq`` (an
integer that grows with every poll). Answers: 200 ``ok`` or ``reboot``, 400 bad request, 403
refused (wrong token, replayed or old ``seq``), 404 unknown node. See pxe/power/agent.py.
"""

from __future__ import annotations

import logging
import sqlite3
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from pxe import validate
from pxe.errors import InputError, NotFound
from pxe.power import agent
from pxe.serve.callhome import _body, _connection

log = logging.getLogger("dynprov.serve.agent")
FIELDS = ("node", "token", "seq")


def parse(body: bytes) -> tuple[str, str, int]:
    try:
        pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=8)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"not a form: {exc}") from None
    if set(pairs) != set(FIELDS) or any(len(v) != 1 for v in pairs.values()):
        raise InputError(f"expected the fields {', '.join(FIELDS)} once each")
    node = validate.hostname(pairs["node"][0])
    token, seq = pairs["token"][0], pairs["seq"][0]
    if not token or len(token) > 200 or not seq.isdigit() or len(seq) > 18:
        raise InputError("token must be given; seq must be a non-negative integer")
    return node, token, int(seq)


async def poll(request: Request) -> PlainTextResponse:
    cfg = request.app.state.cfg
    client = request.client.host if request.client else "?"
    try:
        node, token, seq = parse(await _body(request))
    except OverflowError:
        return PlainTextResponse("too large\n", status_code=413)
    except InputError as exc:
        log.warning("agent poll from %s: bad request: %s", client, exc)
        return PlainTextResponse(f"bad request: {exc}\n", status_code=400)

    def work() -> str:
        return agent.poll(_connection(cfg), node, token, seq)

    try:
        answer = await run_in_threadpool(work)
    except agent.AgentRefused as exc:
        log.warning("%s (%s)", exc, client)
        return PlainTextResponse("refused\n", status_code=403)
    except NotFound:
        return PlainTextResponse("unknown node\n", status_code=404)
    except sqlite3.Error as exc:
        log.error("agent poll from %s not recorded: %s", node, exc)
        return PlainTextResponse("state database unavailable\n", status_code=503)
    if answer == "reboot":
        log.info("agent of %s (%s): told to reboot into the network", node, client)
    return PlainTextResponse(answer)
