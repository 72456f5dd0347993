"""Liveness, readiness (the services behind the gateway answer) and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from gateway.auth import principal
from gateway.openapi import SPEC
from gateway.resources import json_response
from gateway.routes import clients
from shared.errors import Unavailable

routes = web.RouteTableDef()

READY_RETRY_AFTER_S = 5.0
_SPEC_BODY = json.dumps(SPEC).encode()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """503 while a service the gateway calls is not serving; `degraded` (still 200) while only the
    image fetcher is not: renders are accepted, and those with a reference URL wait for it."""
    services = clients(request)
    names = ("metadata", "generation", "imagefetch")
    answers = await asyncio.gather(*(getattr(services, name).serving() for name in names))
    serving = dict(zip(names, answers, strict=True))
    checks = {name: "serving" if ok else "not_serving" for name, ok in serving.items()}
    down = [name for name in ("metadata", "generation") if not serving[name]]
    if down:
        raise Unavailable(f"Not ready: {', '.join(down)} not serving.", retry_after=READY_RETRY_AFTER_S)
    return json_response({"status": "ok" if all(answers) else "degraded", "checks": checks})


@routes.get("/v1")
@routes.get("/v1/")  # alike: a client that joins paths either way finds the same root
async def api_root(request: web.Request) -> web.Response:
    """The API's root: who the key is, and where the API is described."""
    return json_response(
        {
            "api": "v1",
            "user_id": principal(request).user_id,
            "openapi": "/openapi.json",
            "docs": "/docs",
            "renders": "/v1/renders",
            "projects": "/v1/projects",
        }
    )


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_SPEC_BODY, content_type="application/json")
