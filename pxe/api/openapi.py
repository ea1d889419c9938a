"""GET /openapi.json: the service's OpenAPI 3 description, built by Starlette's SchemaGenerator
from the YAML in each handler's docstring (the description lives beside the code it describes),
plus the security schemes and the error shape every refusal uses."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.schemas import SchemaGenerator

INFO = {
    "title": "dynprov provisioning API",
    "version": "1",
    "description": "Images, nodes, pools, power status and provisioning runs of a dynprov "
                   "site. HTTPS only. Log in with HTTP Basic (PAM or the site's password file) "
                   "at POST /api/v1/token and send the token as Authorization: Bearer. Every "
                   "refusal is {\"error\": reason, \"status\": code}.",
}


def build(routes: list[Any]) -> dict[str, Any]:
    generator = SchemaGenerator({"openapi": "3.0.3", "info": INFO})
    schema = generator.get_schema(routes)
    for path, operations in schema.get("paths", {}).items():
        names = re.findall(r"{(\w+)}", path)
        for op in operations.values():
            declared = {p.get("name") for p in op.get("parameters", []) if p.get("in") == "path"}
            extra = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                     for n in names if n not in declared]
            if extra:
                op["parameters"] = extra + op.get("parameters", [])
            op["responses"] = {str(k): v for k, v in op.get("responses", {}).items()}
    schema["components"] = {
        "securitySchemes": {
            "basic": {"type": "http", "scheme": "basic"},
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "dp1 (HMAC-SHA256)"},
        },
        "schemas": {"Error": {"type": "object", "required": ["error", "status"],
                              "properties": {"error": {"type": "string"},
                                             "status": {"type": "integer"}}}},
    }
    schema["security"] = [{"bearer": []}, {"basic": []}]
    return schema


async def serve(request: Request) -> Response:
    state = request.app.state
    cached = getattr(state, "openapi", None)
    if cached is None:
        cached = state.openapi = build(request.app.routes)
    return JSONResponse(cached)
