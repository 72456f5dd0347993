"""Renders: submit (the fast path), get, list, a chain's renders in order, cancel."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from typing import Any

from aiohttp import web
from renderflow.v1 import generation_pb2, metadata_pb2

from gateway.auth import principal
from gateway.clients import GenerationClient
from gateway.resources import KINDS, STATUSES, page, render_json
from gateway.routes import ID, clients, page_args, phase, query
from gateway.schemas import SCHEMAS
from gateway.state import TIMER, TRACEPARENT
from gateway.validation import read_json
from shared.errors import NotFound, ValidationFailed

routes = web.RouteTableDef()

PARAM_DEFAULTS: dict[str, Any] = {
    name: schema["default"]
    for name, schema in SCHEMAS["RenderParamsInput"]["properties"].items()
    if "default" in schema
}
SEED_LIMIT = 2**32
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_IDEMPOTENT_RENDERS = uuid.UUID("5f1c0a53-2d55-4c4e-9a51-7d1f3c1e0b6a")


def idempotency_key(request: web.Request) -> str:
    """The `Idempotency-Key` header (1..255 visible ASCII characters), or "" without one."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return ""
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationFailed.field("Idempotency-Key", "must be 1 to 255 visible ASCII characters")
    return key


def request_hash(document: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a request body: equal for equal requests."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def render_params(kind: str, given: dict[str, Any]) -> generation_pb2.RenderParams:
    """The render's parameters: the given ones, defaults for the rest, a random seed if none."""
    values = {**PARAM_DEFAULTS, **given}
    params = generation_pb2.RenderParams(
        width=int(values["width"]),
        height=int(values["height"]),
        steps=int(values["steps"]),
        seed=int(values["seed"]) if "seed" in values else secrets.randbelow(SEED_LIMIT),
    )
    if kind == "video":
        params.duration_s = float(values["duration_s"])
        params.fps = int(values["fps"])
    return params


def reference(given: dict[str, Any] | None) -> generation_pb2.Reference | None:
    """The reference image's source (a URL or another render), if the request names one."""
    if not given:
        return None
    ref = generation_pb2.Reference(required=bool(given.get("required", False)))
    if "url" in given:
        ref.url = given["url"]
    else:
        ref.render_id = given["render_id"]
    return ref


def render_id_for(user_id: str, key: str, body_hash: str) -> str:
    """The id of a new render: random, or for a request with an idempotency key, derived from the
    user, the key and the body, so that a repeat finds its render before allocating anything."""
    if not key:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_IDEMPOTENT_RENDERS, f"{user_id}\n{key}\n{body_hash}"))


def render_spec(
    render_id: str, fields: dict[str, Any], prepared: metadata_pb2.PrepareRenderResponse
) -> generation_pb2.RenderSpec:
    """What generation.Submit queues: the request, placed by PrepareRender in its chain."""
    return generation_pb2.RenderSpec(
        render_id=render_id,
        project_id=prepared.project.id,
        project=prepared.project.slug,
        chain_id=prepared.chain.id,
        position=prepared.first_position,
        kind=KINDS[fields["kind"]],
        prompt=fields["prompt"],
        negative_prompt=fields.get("negative_prompt") or "",
        params=render_params(fields["kind"], fields.get("params", {})),
        rules=prepared.rules,
        reference=reference(fields.get("reference")),
    )


@routes.post("/v1/renders")
async def submit_render(request: web.Request) -> web.Response:
    user = principal(request)
    timer = request[TIMER]
    services = clients(request)
    with phase(request, "validation"):
        fields = await read_json(request, "RenderRequest")
        key = idempotency_key(request)
        body_hash = request_hash(fields)
        # Chosen here, so that a retried Submit cannot queue the render twice.
        render_id = render_id_for(user.user_id, key, body_hash)
    with phase(request, "db"):
        if key and (repeat := await _existing(services.generation, user.user_id, render_id)):
            # A repeat of a request already queued: answer as then, without taking a new position.
            return _accepted(repeat, replayed=True)
        prepared = await services.metadata.prepare_render(
            user.user_id, fields["project"], fields.get("chain_id")
        )
    submitted = generation_pb2.SubmitRequest(
        user_id=user.user_id,
        render=render_spec(render_id, fields, prepared),
        idempotency_key=key,
        request_hash=body_hash,
        traceparent=request[TRACEPARENT],
        timings=generation_pb2.Timings(
            auth_ms=timer.phases.get("auth", 0.0),
            validation_ms=timer.phases.get("validation", 0.0),
            db_ms=timer.phases.get("db", 0.0),
        ),
    )
    with phase(request, "enqueue"):
        render = await services.generation.submit(submitted)
    return _accepted(render)


async def _existing(
    generation: GenerationClient, user_id: str, render_id: str
) -> generation_pb2.Render | None:
    try:
        return await generation.get_render(user_id, render_id)
    except NotFound:
        return None


def _accepted(render: generation_pb2.Render, replayed: bool = False) -> web.Response:
    headers = {"Location": f"/v1/renders/{render.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(render_json(render), status=202, headers=headers)


@routes.get(f"/v1/renders/{ID}")
async def get_render(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        render = await clients(request).generation.get_render(user.user_id, request.match_info["id"])
    return web.json_response(render_json(render))


@routes.get("/v1/renders")
async def list_renders(request: web.Request) -> web.Response:
    user = principal(request)
    services = clients(request)
    params = query(request, "listRenders")
    page_size, page_token = page_args(params)
    with phase(request, "db"):
        project_id = ""
        if "project" in params:
            project_id = (await services.metadata.get_project(user.user_id, params["project"])).id
        answer = await services.generation.list_renders(
            user.user_id,
            project_id=project_id,
            chain_id=params.get("chain_id", ""),
            status=STATUSES.get(params.get("status", ""), generation_pb2.RENDER_STATUS_UNSPECIFIED),
            page_size=page_size,
            page_token=page_token,
        )
    return web.json_response(
        page("renders", [render_json(r) for r in answer.renders], answer.next_page_token)
    )


@routes.get("/v1/projects/{slug}/chains/{chain_id}/renders")
async def list_chain_renders(request: web.Request) -> web.Response:
    user = principal(request)
    services = clients(request)
    page_size, page_token = page_args(query(request, "listChainRenders"))
    with phase(request, "db"):
        chain = await services.metadata.get_chain(
            user.user_id, request.match_info["slug"], request.match_info["chain_id"]
        )
        answer = await services.generation.list_renders(
            user.user_id,
            project_id=chain.project_id,
            chain_id=chain.id,
            page_size=page_size,
            page_token=page_token,
            by_position=True,
        )
    return web.json_response(
        page("renders", [render_json(r) for r in answer.renders], answer.next_page_token)
    )


@routes.post(f"/v1/renders/{ID}:cancel")
async def cancel_render(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        render = await clients(request).generation.cancel(user.user_id, request.match_info["id"])
    return web.json_response(render_json(render), status=202)
