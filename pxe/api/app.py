"""The REST service's routes: one Starlette app on uvicorn, the HTTP stack of `pxe-stage serve`.

Every handler is wrapped by ``common.endpoint(role)``: the caller is identified (HTTP Basic or a
bearer token, pxe.api.auth) and checked against the role - read (any account), image
(``[groups] image``), pool (``[groups] pool``), power (pool or admin), admin
(``[api] admin_group``, or root) - and every refusal is a JSON ``{"error", "status"}`` answer
with the reason. Blocking work (SQLite, PAM, bcrypt, repository, power) runs in the thread pool.
Every change goes through the same pxe modules as the commands and is in the audit log with the
API user's name. The YAML in each docstring is the operation's OpenAPI description.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from pxe import audit, validate
from pxe.api import openapi, uploads, web
from pxe.api.auth import Authenticator, Identity
from pxe.api.common import (
    ApiError,
    Json,
    JsonCache,
    connection,
    endpoint,
    error,
    flag,
    identify,
    json_body,
    json_bytes,
    nodeset,
    typed,
)
from pxe.api.settings import ApiSettings
from pxe.config import Config

V1 = "/api/v1"


def _audit(request: Request, who: Identity, action: str, **details: Any) -> None:
    cfg: Config = request.app.state.cfg
    audit.append(cfg.paths.state_dir, who.user, action, via="api",
                 client=request.client.host if request.client else None, **details)


# -- login -------------------------------------------------------------------------------------
async def token(request: Request) -> Response:
    """
    summary: Trade HTTP Basic credentials for a short-lived bearer token
    security: [{basic: []}]
    responses:
      201: {description: "token, expiry (unix time), user, groups, roles"}
      401: {description: no or wrong credentials}
      429: {description: locked out after repeated failures (Retry-After)}
    """
    from pxe.api.common import answer_for

    try:
        who = await identify(request, basic_only=True)
        text, expires = await run_in_threadpool(request.app.state.auth.issue, who)
    except Exception as exc:  # noqa: BLE001
        return answer_for(request, exc)
    return Json(_who(request, who) | {"token": text, "expires": expires}, status_code=201)


def _who(request: Request, who: Identity) -> dict[str, Any]:
    state = request.app.state
    return {"user": who.user, "source": who.source, "groups": sorted(who.groups),
            "roles": who.roles(state.cfg.groups, state.settings.admin_group)}


@endpoint("read")
async def whoami(request: Request, who: Identity) -> Response:
    """
    summary: The caller, their groups and roles
    responses: {200: {description: user, source, groups, roles}}
    """
    return Json(_who(request, who))


# -- nodes -------------------------------------------------------------------------------------
@endpoint("read")
async def nodes_list(request: Request, who: Identity) -> Response:
    """
    summary: Nodes with OS and provisioning state (as `pxe-stage nodes list --json`)
    parameters:
      - {name: nodes, in: query, required: false, description: "node set, e.g. n[001-016]",
         schema: {type: string}}
      - {name: hardware, in: query, required: false, description: "true: each node with the
         hardware facts it reported (`hardware`, null if none yet; as `pxe-stage nodes show
         --json`)", schema: {type: boolean}}
    responses: {200: {description: list of nodes}, 404: {description: unknown node}}
    """
    from pxe.inventory import Inventory

    spec = request.query_params.get("nodes")
    names = nodeset(spec, request.app.state.cfg) if spec is not None else None
    with_facts = flag(request, "hardware")
    cfg = request.app.state.cfg

    def read() -> list[dict[str, Any]]:
        conn = connection(cfg)
        inv = Inventory(cfg, conn)
        nodes = [node_public(n) for n in (inv.select(names) if names is not None else inv.all())]
        if with_facts:
            facts = _hardware(conn, [n["name"] for n in nodes])
            for node in nodes:
                node["hardware"] = facts.get(node["name"])
        return nodes

    cache = request.app.state.cache
    key = ("nodes+hw:" if with_facts else "nodes:") + (",".join(names) if names is not None
                                                       else "*")
    return json_bytes(await run_in_threadpool(cache.get, cfg, key, read))


_NODE_FIELDS: tuple[str, ...] = ()


def node_public(node: Any) -> dict[str, Any]:
    """Node.public(), without dataclasses.asdict's deep copy (10x faster for 10,000 nodes);
    tests check it equals Node.public()."""
    global _NODE_FIELDS
    if not _NODE_FIELDS:
        from pxe.records import fields

        _NODE_FIELDS = tuple(f for f in fields(node) if f != "boot_token")
    data = {name: getattr(node, name) for name in _NODE_FIELDS}
    data["macs"] = list(node.macs)
    data["groups"] = list(node.groups)
    return data


@endpoint("read")
async def node_show(request: Request, who: Identity) -> Response:
    """
    summary: One node
    responses: {200: {description: the node}, 400: {description: invalid name},
                404: {description: unknown node}}
    """
    from pxe.inventory import Inventory

    name = validate.hostname(request.path_params["name"])
    cfg = request.app.state.cfg

    def read() -> dict[str, Any]:
        conn = connection(cfg)
        node = Inventory(cfg, conn).get(name)
        return node.public() | {"hardware": _hardware(conn, [name]).get(name)}

    return Json(await run_in_threadpool(read))


def _hardware(conn: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    """The hardware facts the nodes reported at call-home (pxe.hwfacts), by name."""
    from pxe import hwfacts

    return hwfacts.load(conn, names)


def _is_admin(request: Request, who: Identity) -> bool:
    state = request.app.state
    return "admin" in who.roles(state.cfg.groups, state.settings.admin_group)


# -- images ------------------------------------------------------------------------------------
@endpoint("read")
async def images_list(request: Request, who: Identity) -> Response:
    """
    summary: Images (view=repository, the default, as `fg-moab-image -list -json`;
      view=catalog as `pxe-stage images list --json`)
    parameters:
      - {name: view, in: query, schema: {type: string, enum: [repository, catalog]}}
    responses: {200: {description: list of images}}
    """
    from pxe.images import Catalog
    from pxe.repository import Repository

    view = request.query_params.get("view", "repository")
    cfg = request.app.state.cfg
    if view == "catalog":
        data = await run_in_threadpool(
            lambda: [i.public() for i in Catalog(cfg, connection(cfg)).all()])
    elif view == "repository":
        data = await run_in_threadpool(
            lambda: [e.public() for e in Repository(cfg, connection(cfg)).list()])
    else:
        raise ApiError(400, f"view: expected repository or catalog, got {view!r}")
    return Json(data)


@endpoint("read")
async def image_show(request: Request, who: Identity) -> Response:
    """
    summary: One image of the catalog (as `pxe-stage images show --json`)
    responses: {200: {description: the image}, 404: {description: unknown label}}
    """
    from pxe.images import Catalog

    label = validate.label(request.path_params["label"], "image label")
    cfg = request.app.state.cfg
    image = await run_in_threadpool(lambda: Catalog(cfg, connection(cfg)).get(label))
    return Json(image.public())


@endpoint("image", "uploading an image")
async def image_upload(request: Request, who: Identity) -> Response:
    """
    summary: Upload an image bundle as LABEL (the body is the bundle file); all or nothing
    parameters:
      - {name: group, in: query, required: false, description: "apply this node group's
         customization scripts too (repeatable)", schema: {type: string}}
    requestBody:
      content: {application/octet-stream: {schema: {type: string, format: binary}}}
    responses:
      201: {description: "uploaded and published (a label that exists: as its new version)"}
      400: {description: bad label or bad bundle}
      403: {description: "not in the image group, or the label is another user's"}
      409: {description: another upload of the label is in progress}
      413: {description: larger than the limit (nothing is kept)}
    """
    groups = request.query_params.getlist("group")
    result = await uploads.receive(request, request.path_params["label"], groups, who.user,
                                   admin=_is_admin(request, who))
    return Json(result, status_code=201)


@endpoint("image", "deleting an image")
async def image_delete(request: Request, who: Identity) -> Response:
    """
    summary: Delete an image and its bundle (refused while in use unless force=true)
    parameters: [{name: force, in: query, schema: {type: boolean}}]
    responses: {200: {description: deleted}, 403: {description: "not the image's owner nor an
                admin"}, 404: {description: unknown label}, 409: {description: in use}}
    """
    label = validate.label(request.path_params["label"], "image label")
    force = flag(request, "force")
    repo = uploads.ApiRepository(request.app.state.cfg, who.user, admin=_is_admin(request, who))
    still = await run_in_threadpool(repo.delete, label, force)
    return Json({"deleted": label, "forced": force, "still_used_by": still})


@endpoint("image", "retrieving an image bundle")
async def image_bundle(request: Request, who: Identity) -> Response:
    """
    summary: The uploaded bundle, byte for byte (X-Bundle-Sha256 gives its recorded sha256)
    parameters:
      - {name: version, in: query, required: false, description: "a kept version (default:
         the current one; fg-moab-image -get -version N)", schema: {type: integer}}
    responses:
      200: {description: the bundle, content: {application/octet-stream: {}}}
      400: {description: malformed version, or a version that is not kept}
      404: {description: no such image or no uploaded bundle}
    """
    from pxe import imageversions
    from pxe.errors import NotFound

    label = validate.label(request.path_params["label"], "image label")
    raw = request.query_params.get("version")
    version = None if raw is None else imageversions.parse_version(raw, "version")
    repo = uploads.ApiRepository(request.app.state.cfg, who.user)

    def meta() -> tuple[Path, dict[str, Any]]:  # the current version's, or a kept one's
        if version is not None and label in repo.catalog.labels():
            imageversions.row(repo.catalog.conn, label, version)  # kept, or 400 naming them
        path = repo.bundle_path(label, version)
        if not path.is_file():
            if label in repo.catalog.labels():
                raise NotFound(f"image {label!r} has no uploaded bundle "
                               f"{'for version ' + str(version) + ' ' if version else ''}"
                               "(it was added with `pxe-stage images add`)")
            raise NotFound(f"unknown image label {label!r}")
        return path, repo._meta(label, version)

    path, info = await run_in_threadpool(meta)
    headers = {"x-bundle-sha256": str(info.get("bundle_sha256") or "")}
    return FileResponse(path, media_type="application/octet-stream", headers=headers,
                        filename=f"{label}.bundle")


def _version_param(request: Request) -> tuple[str, int]:
    from pxe import imageversions

    label = validate.label(request.path_params["label"], "image label")
    return label, imageversions.parse_version(request.path_params["version"], "version")


@endpoint("read")
async def image_history(request: Request, who: Identity) -> Response:
    """
    summary: The kept versions of an image, oldest first (as `fg-moab-image -history -json`)
    responses:
      200: {description: "versions: version, current, created, owner, hashes, sizes, running,
            booted"}
      404: {description: unknown label}
    """
    from pxe.repository import Repository

    label = validate.label(request.path_params["label"], "image label")
    cfg = request.app.state.cfg
    versions = await run_in_threadpool(
        lambda: Repository(cfg, connection(cfg)).history(label))
    return Json([v.public() for v in versions])


@endpoint("image", "rolling back an image")
async def image_rollback(request: Request, who: Identity) -> Response:
    """
    summary: Make a kept version current again (default the previous one); the image's owner
      or an admin (fg-moab-image -rollback)
    requestBody:
      content: {application/json: {schema: {type: object, properties: {
                version: {type: integer, description: "default: the newest one older than
                the current one"}}}}}
    responses:
      200: {description: "label, previous, current"}
      400: {description: "malformed version, a version that is not kept, or the current one"}
      403: {description: "not the image's owner nor an admin (the owner is named)"}
      404: {description: unknown label}
    """
    from pxe import imageversions

    label = validate.label(request.path_params["label"], "image label")
    data = await json_body(request, ("version",))
    raw = data.get("version")
    if isinstance(raw, bool) or not isinstance(raw, (int, str, type(None))):
        raise ApiError(400, f"version: must be an integer, got {raw!r}")
    version = None if raw is None else imageversions.parse_version(raw, "version")
    repo = uploads.ApiRepository(request.app.state.cfg, who.user, admin=_is_admin(request, who))
    old, new = await run_in_threadpool(repo.rollback, label, version)
    return Json({"label": label, "previous": old, "current": new})


@endpoint("image", "deleting an image version")
async def image_version_delete(request: Request, who: Identity) -> Response:
    """
    summary: Delete one kept version that is not the current one; the image's owner or an
      admin (fg-moab-image -delete -version N; refused while in use unless force=true)
    parameters: [{name: force, in: query, schema: {type: boolean}}]
    responses:
      200: {description: "deleted, version, forced, still_used_by"}
      400: {description: "malformed version, a version that is not kept, or the current one"}
      403: {description: "not the image's owner nor an admin (the owner is named)"}
      404: {description: unknown label}
      409: {description: nodes run it or a run is booting it}
    """
    label, version = _version_param(request)
    force = flag(request, "force")
    repo = uploads.ApiRepository(request.app.state.cfg, who.user, admin=_is_admin(request, who))
    still = await run_in_threadpool(lambda: repo.delete(label, force, version=version))
    return Json({"deleted": label, "version": version, "forced": force, "still_used_by": still})


@endpoint("image", "re-publishing the OS list")
async def images_init(request: Request, who: Identity) -> Response:
    """
    summary: Re-publish the OS list and re-render every boot config (fg-moab-image -init)
    responses: {200: {description: oslist path and boot file counts}}
    """
    repo = uploads.ApiRepository(request.app.state.cfg, who.user)
    report = await run_in_threadpool(repo.init)  # the OS list goes where the hooks put it
    return Json({"oslist": None, "boot_files": report.boot_files,
                 "boot_changed": report.boot_changed})


# -- pools -------------------------------------------------------------------------------------
@endpoint("read")
async def pools_list(request: Request, who: Identity) -> Response:
    """
    summary: Pools with node counts (as `fg-pool -list --json`)
    responses: {200: {description: list of pools}}
    """
    from pxe import pools

    cfg = request.app.state.cfg
    listed = await run_in_threadpool(lambda: pools.list_pools(cfg, connection(cfg)))
    return Json([p.public() for p in listed])


@endpoint("read")
async def pool_show(request: Request, who: Identity) -> Response:
    """
    summary: The nodes of one pool (as `fg-pool -list NAME --json`)
    responses: {200: {description: pool, nodeset, count, nodes, scheduler},
                404: {description: unknown pool}}
    """
    from pxe import pools
    from pxe.nodeset import expand, fold, max_nodes

    name = validate.label(request.path_params["name"], "pool name")
    cfg = request.app.state.cfg
    names = await run_in_threadpool(lambda: pools.members(cfg, connection(cfg), name))
    ordered = expand(names, max_nodes(cfg)) if names else []
    return Json({"pool": name, "nodeset": fold(ordered) if ordered else "",
                 "count": len(ordered), "nodes": ordered,
                 "scheduler": pools.is_usable_for_scheduler(cfg, name)})


@endpoint("pool", "changing resource pools")
async def pool_create(request: Request, who: Identity) -> Response:
    """
    summary: Create a pool
    requestBody:
      content: {application/json: {schema: {type: object, required: [name],
                properties: {name: {type: string}}}}}
    responses: {201: {description: created}, 409: {description: exists}}
    """
    from pxe import pools

    data = await json_body(request, ("name",), ("name",))
    name = validate.label(typed(data, "name", str), "pool name")
    cfg = request.app.state.cfg
    await run_in_threadpool(lambda: pools.create(cfg, connection(cfg), name, user=who.user))
    return Json({"created": name}, status_code=201)


@endpoint("pool", "changing resource pools")
async def pool_delete(request: Request, who: Identity) -> Response:
    """
    summary: Delete an empty pool
    responses: {200: {description: deleted}, 409: {description: not empty}}
    """
    from pxe import pools

    name = validate.label(request.path_params["name"], "pool name")
    cfg = request.app.state.cfg
    await run_in_threadpool(lambda: pools.delete(cfg, connection(cfg), name, user=who.user))
    return Json({"deleted": name})


@endpoint("pool", "changing resource pools")
async def pool_move(request: Request, who: Identity) -> Response:
    """
    summary: Move nodes into this pool, all or nothing (fg-pool -to NAME -resource NODES)
    requestBody:
      content: {application/json: {schema: {type: object, required: [nodes], properties: {
                nodes: {type: string}, from: {type: string}, force: {type: boolean}}}}}
    responses: {200: {description: what moved}, 409: {description: busy nodes (use force)}}
    """
    from pxe import pools

    to = validate.label(request.path_params["name"], "pool name")
    data = await json_body(request, ("nodes", "from", "force"), ("nodes",))
    names = nodeset(typed(data, "nodes", str), request.app.state.cfg)
    from_pool = typed(data, "from", str)
    if from_pool is not None:
        validate.label(from_pool, "pool name")
    force = bool(typed(data, "force", bool, False))
    cfg = request.app.state.cfg
    result = await run_in_threadpool(lambda: pools.move(
        cfg, connection(cfg), names, to, user=who.user, from_pool=from_pool, force=force))
    return Json(result.public())


# -- power and provisioning runs ---------------------------------------------------------------
@endpoint("power", "asking BMCs for power status")
async def power_status(request: Request, who: Identity) -> Response:
    """
    summary: Power status of nodes through their BMCs
    parameters:
      - {name: nodes, in: query, required: true, schema: {type: string}}
    responses: {200: {description: "one result per node: node, ok, value, error, kind"}}
    """
    from pxe import power

    spec = request.query_params.get("nodes")
    if spec is None:
        raise ApiError(400, "query parameter nodes is required (a node set)")
    names = nodeset(spec, request.app.state.cfg)
    cfg = request.app.state.cfg
    from pxe.inventory import Inventory

    def run() -> list[dict[str, Any]]:
        selected = Inventory(cfg, connection(cfg)).select(names)
        return [r.as_dict() for r in power.run(cfg, selected, "status").values()]

    return Json(await run_in_threadpool(run))


@endpoint("admin", "switching nodes to another OS")
async def run_request(request: Request, who: Identity) -> Response:
    """
    summary: Switch nodes to an OS image ("these nodes, this OS"); returns at once
    requestBody:
      content: {application/json: {schema: {type: object, required: [nodes, label],
                properties: {nodes: {type: string}, label: {type: string},
                force: {type: boolean}, pool: {type: string}}}}}
    responses: {202: {description: "run_id, started, joined, current, refused"}}
    """
    from pxe import provision

    data = await json_body(request, ("nodes", "label", "force", "pool"), ("nodes", "label"))
    names = nodeset(typed(data, "nodes", str), request.app.state.cfg)
    label = validate.label(typed(data, "label", str), "OS label")
    force = bool(typed(data, "force", bool, False))
    pool = typed(data, "pool", str)
    if pool is not None:
        validate.label(pool, "pool name")
    cfg = request.app.state.cfg
    spawn: Callable[[Config], Any] = request.app.state.spawn_driver

    def go() -> Any:
        return provision.start(cfg, names, label, force=force, pool=pool, spawn=spawn,
                               conn=connection(cfg))

    req = await run_in_threadpool(go)
    result = {"label": label, "run_id": req.run_id, "started": req.started,
              "joined": req.joined, "current": req.current,
              "refused": [{"node": n, "reason": r} for n, r in req.refused]}
    await run_in_threadpool(lambda: _audit(request, who, "os-switch", nodes=names_folded(names),
                                           label=label, run_id=req.run_id, force=force,
                                           started=len(req.started),
                                           refused=len(req.refused)))
    return Json(result, status_code=202)


def names_folded(names: list[str]) -> str:
    from pxe.nodeset import fold

    return fold(names)


@endpoint("read")
async def runs_list(request: Request, who: Identity) -> Response:
    """
    summary: Provisioning runs in progress, with each node's step
    responses: {200: {description: list of runs}}
    """
    cfg = request.app.state.cfg
    return Json(await run_in_threadpool(lambda: web.active_runs(connection(cfg))))


@endpoint("read")
async def run_show(request: Request, who: Identity) -> Response:
    """
    summary: One provisioning run with its nodes and events
    responses: {200: {description: the run}, 404: {description: unknown run}}
    """
    from pxe import run as prun
    from pxe.errors import NotFound

    raw = request.path_params["run_id"]
    if not raw.isdigit() or len(raw) > 12:
        raise ApiError(400, f"invalid run id {raw!r}")
    run_id = int(raw)
    cfg = request.app.state.cfg

    def read() -> dict[str, Any]:
        conn = connection(cfg)
        runs = web.active_runs(conn, run_id=run_id)
        if not runs:
            raise NotFound(f"unknown run {run_id}")
        events = [{"ts": r["ts"], "node": r["node"], "kind": r["kind"], "detail": r["detail"]}
                  for r in prun.history(conn, run_id)]
        return runs[0] | {"events": events}

    return Json(await run_in_threadpool(read))


# -- the status page -----------------------------------------------------------------------------
async def status_json(request: Request) -> Response:
    """
    summary: Everything the status page shows (nodes, images, pools, runs in progress)
    responses: {200: {description: status snapshot}, 401: {description: login needed}}
    """
    state = request.app.state
    if state.settings.public_status:
        return await _status(request, None)
    return await _status_auth(request)


@endpoint("read")
async def _status_auth(request: Request, who: Identity) -> Response:
    return await _status(request, who)


async def _status(request: Request, who: Identity | None) -> Response:
    cfg = request.app.state.cfg
    body = await run_in_threadpool(request.app.state.status_cache.get, cfg, "status",
                                   lambda: web.status(connection(cfg), cfg.groups.scheduler_pool))
    return json_bytes(body)


async def healthz(request: Request) -> Response:
    """
    summary: Liveness (no login)
    security: []
    responses: {200: {description: ok}}
    """
    return PlainTextResponse("ok\n")


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi.serve, methods=["GET"], include_in_schema=False),
        Route("/", lambda r: Response(status_code=307, headers={"location": "/status"}),
              methods=["GET"], include_in_schema=False),
        Route("/status", web.page, methods=["GET"], include_in_schema=False),
        Route("/status.js", web.script, methods=["GET"], include_in_schema=False),
        Route(f"{V1}/token", token, methods=["POST"]),
        Route(f"{V1}/whoami", whoami, methods=["GET"]),
        Route(f"{V1}/status", status_json, methods=["GET"]),
        Route(f"{V1}/nodes", nodes_list, methods=["GET"]),
        Route(f"{V1}/nodes/{{name}}", node_show, methods=["GET"]),
        Route(f"{V1}/images", images_list, methods=["GET"]),
        Route(f"{V1}/images/init", images_init, methods=["POST"]),
        Route(f"{V1}/images/{{label}}", image_show, methods=["GET"]),
        Route(f"{V1}/images/{{label}}", image_upload, methods=["PUT"]),
        Route(f"{V1}/images/{{label}}", image_delete, methods=["DELETE"]),
        Route(f"{V1}/images/{{label}}/bundle", image_bundle, methods=["GET"]),
        Route(f"{V1}/images/{{label}}/versions", image_history, methods=["GET"]),
        Route(f"{V1}/images/{{label}}/versions/{{version}}", image_version_delete,
              methods=["DELETE"]),
        Route(f"{V1}/images/{{label}}/rollback", image_rollback, methods=["POST"]),
        Route(f"{V1}/pools", pools_list, methods=["GET"]),
        Route(f"{V1}/pools", pool_create, methods=["POST"]),
        Route(f"{V1}/pools/{{name}}", pool_show, methods=["GET"]),
        Route(f"{V1}/pools/{{name}}", pool_delete, methods=["DELETE"]),
        Route(f"{V1}/pools/{{name}}/move", pool_move, methods=["POST"]),
        Route(f"{V1}/power", power_status, methods=["GET"]),
        Route(f"{V1}/runs", runs_list, methods=["GET"]),
        Route(f"{V1}/runs", run_request, methods=["POST"]),
        Route(f"{V1}/runs/{{run_id}}", run_show, methods=["GET"]),
    ]


class HttpsOnly:
    """ASGI middleware: refuse anything that did not arrive over TLS (403 with the reason), and
    add the headers every answer carries (HSTS, no sniffing, no caching of API data)."""

    HEADERS = [(b"strict-transport-security", b"max-age=31536000"),
               (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer")]

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("scheme") != "https":
            body = b'{"error":"HTTPS required: this service refuses plain HTTP","status":403}'
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        is_api = scope["path"].startswith(V1)

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + self.HEADERS
                if is_api:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(cfg: Config, settings: ApiSettings,
               spawn_driver: Callable[[Config], Any] | None = None) -> Any:
    """The ASGI app. ``spawn_driver`` starts the provisioning run's driver (tests pass a stub)."""
    # The repository acts "as the caller" when SUDO_USER is set (seteuid): never in a server.
    os.environ.pop("SUDO_USER", None)
    if spawn_driver is None:
        from pxe import run as prun

        spawn_driver = prun.spawn_driver
    app = Starlette(routes=routes(), exception_handlers={
        HTTPException: lambda request, exc: error(exc.status_code, str(exc.detail))})
    app.state.cfg = cfg
    app.state.settings = settings
    app.state.auth = Authenticator(settings)
    app.state.auth.secret.ensure()
    app.state.spawn_driver = spawn_driver
    app.state.jinja = None
    app.state.cache = JsonCache(max_age=30.0)
    app.state.status_cache = JsonCache(max_age=2.0, entries=1)
    app.state.started = time.time()
    return HttpsOnly(app)
