"""Liveness, readiness (the services behind the gateway answer) and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

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
    services = clients(request)
    names = ("metadata", "generation")
    answers = await asyncio.gather(services.metadata.serving(), services.generation.serving())
    checks = {name: "serving" if ok else "not_serving" for name, ok in zip(names, answers, strict=True)}
    if not all(answers):
        down = ", ".join(name for name, ok in zip(names, answers, strict=True) if not ok)
        raise Unavailable(f"Not ready: {down} not serving.", retry_after=READY_RETRY_AFTER_S)
    return json_response({"status": "ok", "checks": checks})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_SPEC_BODY, content_type="application/json")
